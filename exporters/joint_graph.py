"""The torch.export joint forward-backward capture that the portable gradient graph and the
ExecuTorch training program share: the loss wrapper (loss as output 0), torch's joint graph,
the rewrite of ops no target can run, and the map from tied tensors to their one name."""
from __future__ import annotations

import contextlib
import logging
import warnings
from typing import Iterator

import torch
import torch.nn as nn

from edgepeft import names

SEP = "__"  # module attribute and buffer names cannot hold dots: "a.b" is stored as "a__b"


class WithLoss(nn.Module):
    """forward(*model inputs, labels) -> mean cross-entropy over labelled positions.

    Logits (B, C) for classification, (B, T, V) for a causal LM whose labels the data pipeline
    already shifted by one; labels equal to ``names.IGNORE_INDEX`` take no part."""

    def __init__(self, model: nn.Module, causal: bool):
        super().__init__()
        self.m = model
        self.causal = causal

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        *inputs, labels = args
        logits = self.m(*inputs)
        x = logits.reshape(-1, logits.shape[-1])
        y = labels.reshape(-1)
        # Cross-entropy spelled out (= F.cross_entropy with ignore_index): nll_loss would need
        # the slow core decomposition pass, as onnxscript's own nll_loss fakes total_weight=1.
        keep = y != names.IGNORE_INDEX
        picked = x.gather(1, torch.where(keep, y, 0).unsqueeze(1)).squeeze(1)
        per_token = (torch.logsumexp(x, dim=1) - picked) * keep
        return per_token.sum() / keep.sum()


def joint_forward_backward(ep: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """torch's joint graph of ``ep`` (a ``WithLoss`` export): outputs the loss, then the gradient
    of every parameter that requires grad; ops no target translates are rewritten."""
    import torch.export.experimental  # noqa: F401  (registers _export_forward_backward)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    # scaled_dot_product_attention (nn.MultiheadAttention, user attention) would otherwise take
    # CPU flash attention, whose backward op neither ONNX nor ExecuTorch can run; the math
    # backend spells it as matmuls and a softmax, with their own gradients.
    with sdpa_kernel([SDPBackend.MATH]):
        joint = torch.export.experimental._export_forward_backward(ep, joint_loss_index=0)
    replace_unexportable(joint.graph_module)
    return joint


def canonical_names(model: nn.Module) -> dict[str, str]:
    """Every parameter/buffer name -> the name named_parameters() reports for that tensor (tied
    weights, e.g. an LM head sharing the embedding table, have several names)."""
    first: dict[int, str] = {}
    out: dict[str, str] = {}
    for name, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        out[name] = first.setdefault(id(t), name)
    return out


def replace_unexportable(gm: torch.fx.GraphModule) -> None:
    """aten.empty_permuted (allocations in some backward formulas) has no ONNX translation and is
    not core ATen. Its contents are always written before use and neither target has strides,
    so zeros of the logical size stand in for it."""
    for node in list(gm.graph.nodes):
        if node.target is torch.ops.aten.empty_permuted.default:
            size = node.args[0]
            with gm.graph.inserting_before(node):
                new = gm.graph.call_function(torch.ops.aten.zeros.default, (size,),
                                             {"dtype": node.kwargs.get("dtype"), "device": node.kwargs.get("device")})
            new.meta = dict(node.meta)
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()


@contextlib.contextmanager
def quiet_torch_onnx() -> Iterator[None]:
    """Silence export warnings and torch.onnx's "torchvision is not installed. Skipping ..."
    notices (four per export)."""
    onnx_log = logging.getLogger("torch.onnx")
    level = onnx_log.level
    onnx_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        onnx_log.setLevel(level)
