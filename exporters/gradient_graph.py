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
from pathlib import Path

import onnx
import torch
import torch.nn as nn

from edgepeft import names
from edgepeft.errors import ExportError
from edgepeft.exporters import onnx_graph
from edgepeft.exporters.joint_graph import SEP, WithLoss, canonical_names, joint_forward_backward, quiet_torch_onnx
from edgepeft.exporters.quantize import QuantizedTensor
from edgepeft.exporters.stages import InjectedModel

OPSET = 18


class GradientModule(nn.Module):
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
                tensor, attr = state[spec.target], name.replace(".", SEP)
            elif spec.kind == InputKind.CONSTANT_TENSOR:
                tensor, attr = joint.constants[spec.target], f"const{SEP}{spec.target}"
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


def build(injected: InjectedModel, path: Path) -> onnx.ModelProto:
    """The gradient graph of ``injected`` (left untouched), written to ``path`` on the way and
    returned with its frozen weights int8 by name. ExportError if the model cannot be turned
    into one (the exporter then leaves the portable backend out when it may)."""
    trainable = injected.trainable_names
    args = (*injected.example_inputs.values(), injected.example_labels())
    shapes = _dynamic_shapes(injected)
    params = dict(injected.model.named_parameters())
    train_values = tuple(params[n].detach().clone() for n in trainable)
    with quiet_torch_onnx():
        try:
            ep = torch.export.export(WithLoss(injected.model, injected.plan.causal), args, strict=False,
                                     prefer_deferred_runtime_asserts_over_guards=True,
                                     dynamic_shapes={"args": shapes})
            joint = joint_forward_backward(ep)
            decompose_conv_backward(joint.graph_module)
            grad_module = GradientModule(joint, trainable, canonical_names(injected.model))
            # Re-export the wrapper: exporting the joint program itself yields an empty model.
            # The joint graph carries shape guards sympy cannot discharge (e.g. min(a+bs, c+ds)
            # with a prompt): defer them to run-time asserts instead of failing the export.
            ep2 = torch.export.export(grad_module, (*args, *train_values), strict=False,
                                      prefer_deferred_runtime_asserts_over_guards=True,
                                      dynamic_shapes={"args": (*shapes, *[None] * len(trainable))})
            with contextlib.redirect_stdout(io.StringIO()):  # the exporter prints its progress
                torch.onnx.export(ep2, (*args, *train_values), str(path), dynamo=True, optimize=False,
                                  opset_version=OPSET, verbose=False,
                                  input_names=[*injected.example_inputs, names.LABELS_INPUT, *trainable],
                                  output_names=["loss", *(n + "/grad" for n in trainable)])
        except ExportError:
            raise
        except Exception as e:  # torch.export raises many kinds; say which stage failed
            raise ExportError(f"could not build the portable gradient graph: {_hint(e)}{type(e).__name__}: {e}") from e
    return _finish(onnx.load(str(path)), grad_module.renames, injected.quantized)


def _hint(e: Exception) -> str:
    """What the user can do about a capture failure torch describes in its own terms."""
    if "data-dependent" in str(e) or type(e).__name__.startswith("GuardOnDataDependent"):
        return ("the model's forward branches on tensor values, which a training graph cannot hold (e.g. "
                "nn.Transformer checking whether `tgt_mask` is causal: pass tgt_is_causal=True with it). ")
    return ""


def decompose_conv_backward(gm: torch.fx.GraphModule) -> None:
    """aten.convolution_backward has no ONNX translation: write its outputs as the convolutions
    autograd defines them (the input's gradient a transposed convolution of the output's, the
    weight's a convolution of the input by the output's gradient, the bias's a sum)."""
    aten = torch.ops.aten
    for node in list(gm.graph.nodes):
        if node.target is not aten.convolution_backward.default:
            continue
        go, x, w, _, stride, padding, dilation, transposed, _, groups, mask = node.args
        if transposed or (mask[1] and groups != 1):
            raise ExportError("the portable gradient graph cannot train a transposed or grouped convolution's "
                              "weight; leave that layer frozen (LoRA wraps only groups=1 convolutions)")
        xs, ws, gs = (a.meta["val"].shape for a in (x, w, go))
        k = len(ws) - 2
        with gm.graph.inserting_before(node):
            outs = [None, None, None]
            if mask[0]:
                pad_out = [int(xs[2 + i]) - ((int(gs[2 + i]) - 1) * stride[i] - 2 * padding[i]
                                             + dilation[i] * (int(ws[2 + i]) - 1) + 1) for i in range(k)]
                outs[0] = gm.graph.call_function(aten.convolution.default, (go, w, None, stride, padding, dilation,
                                                                            True, pad_out, groups))
            if mask[1]:
                xt = gm.graph.call_function(aten.transpose.int, (x, 0, 1))
                gt = gm.graph.call_function(aten.transpose.int, (go, 0, 1))
                full = gm.graph.call_function(aten.convolution.default, (xt, gt, None, dilation, padding, stride,
                                                                         False, [0] * k, 1))
                gw = gm.graph.call_function(aten.transpose.int, (full, 0, 1))
                for i in range(k):
                    gw = gm.graph.call_function(aten.slice.Tensor, (gw, 2 + i, 0, int(ws[2 + i])))
                outs[1] = gw
            if mask[2]:
                outs[2] = gm.graph.call_function(aten.sum.dim_IntList, (go, [0, *range(2, 2 + k)]))
        for out, val in zip(outs, node.meta["val"]):  # later rewrites read their inputs' shapes
            if out is not None:
                out.meta["val"] = val
        for user in list(node.users):
            user.replace_all_uses_with(outs[user.args[1]])
            gm.graph.erase_node(user)
        gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()


def _dynamic_shapes(injected: InjectedModel) -> tuple:
    """torch.export's dynamic shapes of (*model inputs, labels), from the declared axes."""
    dims: dict[str, torch.export.Dim] = {}
    max_length = injected.plan.source.max_length

    def dim(name: str) -> torch.export.Dim:
        # Sequences are bounded by what the model was exported for (position tables).
        return dims.setdefault(name, torch.export.Dim(name, min=1, max=max_length if name == "seq" else 1 << 16))

    axes = injected.dynamic_axes
    in_shapes = [{a: dim(n) for a, n in axes.get(k, {}).items()} or None for k in injected.example_inputs]
    # A causal LM's labels follow its first input's sequence axis (dynamic only if that one is).
    first_seq = axes.get(next(iter(injected.example_inputs)), {}).get(1)
    label_axes = {0: dim("batch")} | ({1: dim(first_seq)} if injected.plan.causal and first_seq else {})
    return (*in_shapes, label_axes)




def _finish(m: onnx.ModelProto, renames: dict[str, str], quantized: dict[str, QuantizedTensor]) -> onnx.ModelProto:
    """Frozen tensors named as in the model and stored int8; checked to be standard ONNX."""
    _rename_initializers(m, renames)
    onnx_graph.apply_int8(m, dict(quantized))
    onnx.checker.check_model(m)
    if any(n.domain not in ("", "ai.onnx") for n in m.graph.node):
        raise ExportError("gradient graph uses non-standard ONNX domains")
    return m


def _rename_initializers(m: onnx.ModelProto, renames: dict[str, str]) -> None:
    """Give frozen tensors back their model names (the int8 rewrite finds them by name)."""
    for init in m.graph.initializer:
        if init.name in renames:
            init.name = renames[init.name]
    for node in m.graph.node:
        for i, x in enumerate(node.input):
            if x in renames:
                node.input[i] = renames[x]
