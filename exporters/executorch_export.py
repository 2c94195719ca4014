"""The ExecuTorch programs of a bundle, both over the int8 frozen base and lowered to XNNPACK:
a training program ``forward(*model inputs, labels, *adapter tensors) -> (loss, *gradients)``
and an inference program ``forward(*model inputs, *adapter tensors) -> logits``. The adapter is
an input of both, so the device runs them with ExecuTorch's plain method execution (the native
runner in edgepeft.runtime.native, no torch) and the session's optimizer updates the adapter.

How: the injected model is wrapped so that its frozen weights are int8 + per-row scale buffers
dequantized in forward (the hand-written route: no torchao tensor subclasses, no operator
workarounds), the loss is the masked cross-entropy the portable graph also uses, and
``torch.export`` -> ``joint_graph.joint_forward_backward`` -> the portable graph's wrapper that
takes the adapter as inputs -> ``torch.export`` -> ``to_edge_transform_and_lower`` (XNNPACK, run-time
weights included) -> ``to_executorch`` builds the program. The batch size is fixed at export
(ExecuTorch plans memory for it); the runtime pads a smaller batch with ignored labels and
splits a larger one."""
from __future__ import annotations

import contextlib
import copy
import warnings
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
import torch.nn as nn

from edgepeft import names
from edgepeft.errors import ExportError
from edgepeft.exporters.gradient_graph import GradientModule
from edgepeft.exporters.joint_graph import SEP, WithLoss, canonical_names, joint_forward_backward
from edgepeft.exporters.quantize import QuantizedTensor
from edgepeft.exporters.stages import InjectedModel


@dataclass(frozen=True)
class Programs:
    """The two serialized programs and the shapes they were planned for."""

    training: bytes
    inference: bytes
    batch_size: int


class _Int8Base(nn.Module):
    """The model with its quantized frozen weights held as int8 + per-row scale buffers and
    dequantized in forward; ``extra`` tensors (e.g. adapter tensors fed as program inputs)
    replace the model's own by name."""

    def __init__(self, model: nn.Module, quantized: dict[str, QuantizedTensor], drop: Sequence[str] = ()):
        super().__init__()
        canonical = canonical_names(model)
        self.aliases: dict[str, list[str]] = {}
        for name in [*quantized, *drop]:
            # Tied weights (an LM head sharing the embedding table) have several names: all go.
            self.aliases[name] = [n for n, c in canonical.items() if c == name]
            for alias in self.aliases[name]:
                owner, _, leaf = alias.rpartition(".")
                mod = model.get_submodule(owner)
                if leaf in mod._parameters:
                    del mod._parameters[leaf]
                else:
                    del mod._buffers[leaf]
        self.m = model
        self.quantized = list(quantized)
        for name, qt in quantized.items():
            attr = name.replace(".", SEP)
            self.register_buffer(attr + names.Q_SUFFIX, torch.from_numpy(qt.q.copy()))
            self.register_buffer(attr + names.SCALE_SUFFIX, torch.from_numpy(qt.scale.copy()))

    def forward(self, *inputs: torch.Tensor, extra: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        state: dict[str, torch.Tensor] = {}
        for name in self.quantized:
            attr = name.replace(".", SEP)
            q = getattr(self, attr + names.Q_SUFFIX)
            scale = getattr(self, attr + names.SCALE_SUFFIX)
            w = q.to(torch.float32) * scale.reshape(-1, *[1] * (q.dim() - 1))
            state.update({alias: w for alias in self.aliases[name]})
        for name, t in (extra or {}).items():
            state.update({alias: t for alias in self.aliases.get(name, [name])})
        return torch.func.functional_call(self.m, state, inputs, strict=False, tie_weights=False)


class _Inference(nn.Module):
    """forward(*model inputs, *adapter tensors in manifest order) -> logits."""

    def __init__(self, base: _Int8Base, trainable: Sequence[str], n_inputs: int):
        super().__init__()
        self.base = base
        self.trainable = list(trainable)
        self.n_inputs = n_inputs

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        inputs, adapter = args[:self.n_inputs], args[self.n_inputs:]
        return self.base(*inputs, extra=dict(zip(self.trainable, adapter)))


def _split_addmm(gm: torch.fx.GraphModule, ops=None) -> None:
    """addmm -> mm + add: ExecuTorch's addmm kernel is a plain loop while mm has a fast one; it
    dominated training time (a 2-layer encoder trained 5x faster with the rewrite). ``ops``:
    (addmm, mm, add) of the graph's dialect (ATen by default; edge ops after lowering)."""
    addmm_op, mm_op, add_op = ops or (torch.ops.aten.addmm.default, torch.ops.aten.mm.default,
                                      torch.ops.aten.add.Tensor)
    g = gm.graph
    for node in list(g.nodes):
        if node.target == addmm_op and not node.kwargs:
            bias, a, b = node.args[:3]
            with g.inserting_before(node):
                mm = g.call_function(mm_op, (a, b))
                add = g.call_function(add_op, (mm, bias))
            mm.meta = dict(node.meta)
            add.meta = dict(node.meta)
            node.replace_all_uses_with(add)
            g.erase_node(node)
    g.lint()
    gm.recompile()


def _slice_negative_pads(gm: torch.fx.GraphModule) -> None:
    """The backward of F.pad is a constant_pad_nd with negative pads (a crop); ExecuTorch's
    kernel refuses negative pads at run time, so crop with slices and pad the rest."""
    g = gm.graph
    for node in list(g.nodes):
        if node.target is not torch.ops.aten.constant_pad_nd.default or min(node.args[1]) >= 0:
            continue
        x, pad = node.args[0], list(node.args[1])
        value = node.args[2] if len(node.args) > 2 else node.kwargs.get("value", 0)
        shape = list(x.meta["val"].shape)
        with g.inserting_before(node):
            cur = x
            for i in range(len(pad) // 2):
                dim = len(shape) - 1 - i
                left, right = pad[2 * i], pad[2 * i + 1]
                if left < 0 or right < 0:
                    start, end = max(-left, 0), shape[dim] + min(right, 0)
                    cur = g.call_function(torch.ops.aten.slice.Tensor, (cur, dim, start, end))
            rest = [max(p, 0) for p in pad]
            if any(rest):
                cur = g.call_function(torch.ops.aten.constant_pad_nd.default, (cur, rest, value))
        cur.meta = dict(node.meta)
        node.replace_all_uses_with(cur)
        g.erase_node(node)
    g.lint()
    gm.recompile()


def _batch_of(t: torch.Tensor, batch: int) -> torch.Tensor:
    """``t`` with exactly ``batch`` rows (repeating or cutting its rows)."""
    reps = -(-batch // t.shape[0])
    return t.repeat(reps, *[1] * (t.dim() - 1))[:batch].contiguous()


def build(injected: InjectedModel, *, batch_size: int) -> Programs:
    """Both programs for ``injected`` (its model is left untouched) at ``batch_size`` rows, each
    run once on the ExecuTorch runtime against eager PyTorch before it goes into a bundle."""
    inputs = tuple(_batch_of(v, batch_size) for v in injected.example_inputs.values())
    y = _batch_of(injected.example_labels(), batch_size)
    # The batch is fixed; sequences keep their symbolic length where the model declares one.
    seq = torch.export.Dim("seq", min=1, max=injected.plan.source.max_length)
    in_shapes = tuple({a: seq for a, n in injected.dynamic_axes.get(k, {}).items() if n == "seq"} or None
                      for k in injected.example_inputs)
    label_shape = {1: seq} if injected.plan.causal and any(in_shapes) else None
    loss_model = _loss_model(injected)
    params = dict(loss_model.named_parameters())
    adapter = tuple(params[names.EXECUTORCH_PARAM_PREFIX + n].detach().clone() for n in injected.trainable_names)
    training = _training_program(injected, loss_model, (*inputs, y), (*in_shapes, label_shape), adapter)
    inf = _Inference(_Int8Base(copy.deepcopy(injected.model), injected.quantized, drop=injected.trainable_names),
                     injected.trainable_names, len(inputs)).eval()
    inference = _inference_program(injected, inf, (*inputs, *adapter), (*in_shapes, *[None] * len(adapter)))
    _check(training, inference, loss_model, inf, inputs, y, injected.trainable_names, adapter, injected.plan.what)
    return Programs(training, inference, batch_size)


def _loss_model(injected: InjectedModel) -> WithLoss:
    """The int8-base model with its loss, where only the adapter tensors require grad (and so
    get gradients in the joint graph)."""
    loss_model = WithLoss(_Int8Base(copy.deepcopy(injected.model), injected.quantized), injected.plan.causal)
    params = dict(loss_model.named_parameters())
    for p in params.values():
        p.requires_grad_(False)
    for name in injected.trainable_names:
        params[names.EXECUTORCH_PARAM_PREFIX + name].requires_grad_(True)
    return loss_model


def _partitioner():
    """XNNPACK, taking fp32 matmuls whose weights are run-time tensors too (adapter tensors,
    dequantized int8 weights, the backward's activations): on ExecuTorch's own mm kernel those
    made MiniLM's step 5x ONNX Runtime's."""
    from executorch.backends.xnnpack.partition.config import ALL_PARTITIONER_CONFIGS, ConvolutionConfig
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

    # Not convolutions: XNNPACK accepts them in the partition, then refuses a run-time weight
    # when the program loads ("Failed to create convolution node ... invalid_parameter").
    configs = [c for c in ALL_PARTITIONER_CONFIGS if c is not ConvolutionConfig]
    return XnnpackPartitioner(configs=configs, force_non_static_weights_for_f32_linear=True)


def _training_program(injected: InjectedModel, loss_model: WithLoss, args: tuple, shapes: tuple,
                      adapter: tuple) -> bytes:
    """forward(*model inputs, labels, *adapter tensors in manifest order) -> (loss, *gradients):
    the adapter is an input, so any ExecuTorch runtime's plain method execution trains (no
    training module, no torch on the device) and the session's optimizer owns the update."""
    with _stage(injected.plan.what, "training program"):
        joint = joint_forward_backward(_export(loss_model, args, shapes))
        _slice_negative_pads(joint.graph_module)
        prefix = names.EXECUTORCH_PARAM_PREFIX[len("m."):]  # GradientModule drops WithLoss's "m."
        step = GradientModule(joint, list(injected.trainable_names),
                               {prefix + n: n for n in injected.trainable_names})
        return lower(_export(step, (*args, *adapter), (*shapes, *[None] * len(adapter))))


def _inference_program(injected: InjectedModel, inf: nn.Module, args: tuple, shapes: tuple) -> bytes:
    with _stage(injected.plan.what, "inference program"):
        return lower(_export(inf, args, shapes))


def lower(ep) -> bytes:
    """An exported program, lowered to XNNPACK where it takes the ops, as .pte bytes."""
    from executorch.exir import EdgeCompileConfig, to_edge_transform_and_lower

    _slice_negative_pads(ep.graph_module)
    _infer_symbolic_reshapes(ep.graph_module)
    # Lowering re-traces the graph and re-creates any sym_min / sym_not assert: drop them
    # afterwards, with the verifier (which refuses both) off for such graphs only.
    has_min = any(n.target in _UNVERIFIABLE for n in ep.graph.nodes)
    lowered = to_edge_transform_and_lower(ep, partitioner=[_partitioner()],
                                          compile_config=EdgeCompileConfig(_check_ir_validity=not has_min))
    _drop_min_asserts(lowered.exported_program().graph_module)
    _split_leftover_addmm(lowered)
    return lowered.to_executorch().buffer


_UNVERIFIABLE = (torch.sym_min, torch.sym_not)


def _drop_min_asserts(gm: torch.fx.GraphModule) -> None:
    """Drop the run-time shape asserts built on ``sym_min`` or ``sym_not`` (a prefix's
    ``min(3 + s, 128 + s) == 3 + s``, a prompt's ``Ne(s + 3, 1)`` that sympy could not discharge
    at export): ExecuTorch's verifier has neither, and the sequence is bounded by the program's
    planned maximum anyway."""
    doomed: set[torch.fx.Node] = set()
    todo = [n for n in gm.graph.nodes if n.target in _UNVERIFIABLE]
    while todo:
        node = todo.pop()
        for user in node.users:
            if user not in doomed:
                doomed.add(user)
                todo.append(user)
    for node in [n for n in reversed(gm.graph.nodes) if _is_assert(n) and n in doomed]:
        gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code()
    gm.recompile()


def _is_assert(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and "_assert_scalar" in str(node.target)  # ATen or edge dialect


def _infer_symbolic_reshapes(gm: torch.fx.GraphModule) -> None:
    """A reshape to a shape holding one symbolic size (the sequence) takes -1 there instead:
    the same reshape, but one XNNPACK accepts. Each one it refuses splits the graph into
    another delegate, and each delegate costs seconds of lowering (MiniLM's training graph had
    351 such reshapes and 203 delegates) and a hand-over at run time."""
    views = (torch.ops.aten.view.default, torch.ops.aten.reshape.default, torch.ops.aten._unsafe_view.default)
    for node in gm.graph.nodes:
        if node.target not in views:
            continue
        shape = list(node.args[1])
        symbolic = [i for i, d in enumerate(shape) if not isinstance(d, int)]
        if len(symbolic) == 1 and -1 not in shape:
            shape[symbolic[0]] = -1
            node.args = (node.args[0], shape, *node.args[2:])
    gm.graph.eliminate_dead_code()
    gm.recompile()


def _split_leftover_addmm(lowered) -> None:
    """An addmm XNNPACK did not take stays on ExecuTorch's addmm kernel, a plain loop (MiniLM's
    inference: 47 s per 8 x 128 batch): split it into the faster mm + add after lowering
    (splitting before lowering would hide the linear from the partitioner)."""
    from executorch.exir.dialects._ops import ops as exir_ops

    edge = exir_ops.edge.aten
    _split_addmm(lowered.exported_program().graph_module, (edge.addmm.default, edge.mm.default, edge.add.Tensor))


def _export(module: nn.Module, args: tuple, shapes: tuple):
    """torch.export with guards; where sympy cannot discharge one (a prompt's min(a+bs, c+ds) on
    a decoder), with the guard deferred to a run-time assert instead, as in the portable graph.
    Not always: the XNNPACK lowering refuses the symbolic comparison such an assert holds."""
    try:
        return torch.export.export(module, args, strict=False, dynamic_shapes={"args": shapes})
    except torch._dynamo.exc.UserError:
        return torch.export.export(module, args, strict=False, dynamic_shapes={"args": shapes},
                                   prefer_deferred_runtime_asserts_over_guards=True)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """export and exir warn at length about experimental APIs."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@contextlib.contextmanager
def _stage(what: str, program: str) -> Iterator[None]:
    """Turns any failure inside into an ExportError naming the model, methods and program."""
    with quiet():
        try:
            yield
        except ExportError:
            raise
        except Exception as e:  # torch.export / exir / the runtime raise many kinds
            first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
            raise ExportError(f"ExecuTorch cannot build the {program} for {what}: {type(e).__name__}: {first}; "
                              "export this model for 'ort-training' or 'portable' instead") from e


def _check(training: bytes, inference: bytes, loss_model: nn.Module, inf: nn.Module, inputs: tuple,
           y: torch.Tensor, trainable: list[str], adapter: tuple, what: str) -> None:
    """Run both programs once on the example batch: an op ExecuTorch's kernels refuse only
    shows at run time, and a wrong result must not reach a device."""
    from executorch.extension.pybindings.portable_lib import _load_for_executorch_from_buffer

    loss_model.zero_grad()
    expected = loss_model(*inputs, y)
    expected.backward()
    params = dict(loss_model.named_parameters())
    with torch.no_grad():
        logits = inf(*inputs, *adapter)
    with _stage(what, "training program (running it)"):
        loss, *grads = _load_for_executorch_from_buffer(training).forward((*inputs, y, *adapter))
    with _stage(what, "inference program (running it)"):
        got = _load_for_executorch_from_buffer(inference).forward((*inputs, *adapter))[0]
    worst = max((g - params[names.EXECUTORCH_PARAM_PREFIX + n].grad).abs().max().item()
                for n, g in zip(trainable, grads))
    tol = 1e-4 * (1 + abs(expected.item()))
    if abs(loss.item() - expected.item()) > tol or worst > 1e-3 or (got - logits).abs().max().item() > 1e-3:
        raise ExportError(f"ExecuTorch's programs for {what} do not reproduce eager PyTorch (loss {loss.item():.6g} vs "
                          f"{expected.item():.6g}, worst gradient error {worst:.3g}, logits error "
                          f"{(got - logits).abs().max().item():.3g}); export for 'ort-training' or 'portable'")
