"""The portable gradient graph: a standard ONNX model (ai.onnx ops only) whose inputs are the
model inputs, the labels and the trainable tensors, and whose outputs are the loss and the
gradient of every trainable tensor. Any maintained onnxruntime (no training build) runs it.

How: torch.export the model with its loss, run the core ATen decompositions, take torch's
joint forward-backward graph, wrap it as a module that takes the trainable tensors as inputs
and keeps the frozen ones as named buffers, and export that with the dynamo ONNX exporter.
The frozen weights then become int8 + DequantizeLinear by name, as in the other graphs."""
from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

import onnx
import torch
import torch.nn as nn

from edgepeft import names
from edgepeft.errors import ExportError
from edgepeft.exporters import onnx_graph
from edgepeft.exporters.quantize import QuantizedTensor

OPSET = 18
_SEP = "__"  # module attribute names cannot hold dots


class _WithLoss(nn.Module):
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


class _GradientModule(nn.Module):
    """Calls the joint graph with frozen tensors from buffers and trainables from inputs."""

    def __init__(self, joint, trainable: list[str], canonical: dict[str, str]):
        super().__init__()
        from torch.export.graph_signature import InputKind, OutputKind

        self.gm = joint.graph_module
        state = {**dict(joint.named_parameters()), **dict(joint.named_buffers())}
        self.slots: list[tuple[str, object]] = []
        self.renames: dict[str, str] = {}
        for spec in joint.graph_signature.input_specs:
            if spec.kind in (InputKind.PARAMETER, InputKind.BUFFER):
                name = canonical.get(spec.target[len("m."):], spec.target[len("m."):])
                if name in trainable:
                    self.slots.append(("train", trainable.index(name)))
                    continue
                tensor, attr = state[spec.target], name.replace(".", _SEP)
            elif spec.kind == InputKind.CONSTANT_TENSOR:
                tensor, attr = joint.constants[spec.target], f"const{_SEP}{spec.target}"
            elif spec.kind == InputKind.USER_INPUT:
                self.slots.append(("user", None))
                continue
            else:
                raise ExportError(f"gradient graph: unexpected joint-graph input kind {spec.kind}")
            self.register_buffer(attr, tensor.detach().clone())
            self.renames[attr] = name if spec.kind != InputKind.CONSTANT_TENSOR else attr
            self.slots.append(("frozen", attr))
        outs = joint.graph_signature.output_specs
        got = [canonical.get(s.target[len("m."):], s.target[len("m."):]) for s in outs[1:]
               if s.kind == OutputKind.GRADIENT_TO_PARAMETER]
        if outs[0].kind != OutputKind.LOSS_OUTPUT or sorted(got) != sorted(trainable) or len(outs) != 1 + len(got):
            raise ExportError("gradient graph: the joint graph's outputs are not the loss and one gradient per "
                              f"trainable tensor; got gradients for {got[:4]}...")
        # The joint graph orders gradients as the module tree does; the graph's outputs follow
        # the manifest's trainable order.
        self.order = [1 + got.index(n) for n in trainable]

    def forward(self, *args: torch.Tensor):
        n_user = sum(1 for k, _ in self.slots if k == "user")
        users, trainables = iter(args[:n_user]), args[n_user:]
        flat = [trainables[v] if k == "train" else getattr(self, v) if k == "frozen" else next(users)
                for k, v in self.slots]
        out = self.gm(*flat)
        return (out[0], *(out[i] for i in self.order))


def build(model: nn.Module, example_inputs: dict[str, torch.Tensor], labels: torch.Tensor,
          dynamic_axes: dict[str, dict[int, str]], trainable: list[str], causal: bool,
          quantized: dict[str, QuantizedTensor], path: Path, max_length: int) -> onnx.ModelProto:
    import torch.export.experimental  # noqa: F401  (registers _export_forward_backward)

    dims: dict[str, torch.export.Dim] = {}

    def dim(name: str) -> torch.export.Dim:
        # Sequences are bounded by what the model was exported for (position tables).
        return dims.setdefault(name, torch.export.Dim(name, min=1, max=max_length if name == "seq" else 1 << 16))

    in_shapes = {k: {a: dim(n) for a, n in dynamic_axes.get(k, {}).items()} or None for k in example_inputs}
    label_axes = {0: dim("batch")} | ({1: dim("seq")} if causal else {})
    args = (*example_inputs.values(), labels)
    params = dict(model.named_parameters())
    train_values = tuple(params[n].detach().clone() for n in trainable)
    onnx_log = logging.getLogger("torch.onnx")
    level = onnx_log.level
    onnx_log.setLevel(logging.ERROR)  # "torchvision is not installed. Skipping ..." x4, every export
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ep = torch.export.export(_WithLoss(model, causal), args, strict=False,
                                     prefer_deferred_runtime_asserts_over_guards=True,
                                     dynamic_shapes={"args": (*in_shapes.values(), label_axes)})
            joint = torch.export.experimental._export_forward_backward(ep, joint_loss_index=0)
            _replace_unexportable(joint.graph_module)
            grad_module = _GradientModule(joint, trainable, _canonical_names(model))
            # Re-export the wrapper: exporting the joint program itself yields an empty model.
            # The joint graph carries shape guards sympy cannot discharge (e.g. min(a+bs, c+ds)
            # with a prompt): defer them to run-time asserts instead of failing the export.
            ep2 = torch.export.export(grad_module, (*args, *train_values), strict=False,
                                      prefer_deferred_runtime_asserts_over_guards=True,
                                      dynamic_shapes={"args": (*in_shapes.values(), label_axes,
                                                               *[None] * len(trainable))})
            with contextlib.redirect_stdout(io.StringIO()):  # the exporter prints its progress
                torch.onnx.export(ep2, (*args, *train_values), str(path), dynamo=True, optimize=False,
                                  opset_version=OPSET, verbose=False,
                                  input_names=[*example_inputs, names.LABELS_INPUT, *trainable],
                                  output_names=["loss", *(n + "/grad" for n in trainable)])
    except ExportError:
        raise
    except Exception as e:  # torch.export raises many kinds; say which stage failed
        raise ExportError(f"could not build the portable gradient graph: {type(e).__name__}: {e}") from e
    finally:
        onnx_log.setLevel(level)
    m = onnx.load(str(path))
    _rename_initializers(m, grad_module.renames)
    onnx_graph.apply_int8(m, {k: v for k, v in quantized.items()})
    onnx.checker.check_model(m)
    if any(n.domain not in ("", "ai.onnx") for n in m.graph.node):
        raise ExportError("gradient graph uses non-standard ONNX domains")
    return m


def _canonical_names(model: nn.Module) -> dict[str, str]:
    """Every parameter/buffer name -> the name named_parameters() reports for that tensor (tied
    weights, e.g. an LM head sharing the embedding table, have several names)."""
    first: dict[int, str] = {}
    out: dict[str, str] = {}
    for name, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        out[name] = first.setdefault(id(t), name)
    return out


def _replace_unexportable(gm: torch.fx.GraphModule) -> None:
    """aten.empty_permuted (allocations in some backward formulas) has no ONNX translation. Its
    contents are always written before use and ONNX has no strides, so zeros of the logical
    size stand in for it."""
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


def _rename_initializers(m: onnx.ModelProto, renames: dict[str, str]) -> None:
    """Give frozen tensors back their model names (the int8 rewrite finds them by name)."""
    for init in m.graph.initializer:
        if init.name in renames:
            init.name = renames[init.name]
    for node in m.graph.node:
        for i, x in enumerate(node.input):
            if x in renames:
                node.input[i] = renames[x]
