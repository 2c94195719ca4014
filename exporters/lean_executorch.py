"""The executorch-lean backend's programs: the lean backend's cut of a model into parts
(embeddings, repeated blocks, suffix; edgepeft.exporters.lean), each part's forward and
vector-Jacobian (VJP) written as an ExecuTorch program lowered to XNNPACK instead of an ONNX
graph. The device runs them with the native runner (no torch), one block at a time, recomputing
each block in its VJP: per-block activation checkpointing, as on the lean backend.

Frozen weights are program inputs, read from the same memory-mapped ``lean/weights.safetensors``
the lean graphs use: int8 rows + per-row scales, dequantized inside the program (an embedding
table gathers its int8 rows first, so it never exists in fp32). Blocks of one structure share
one pair of programs, so SmolLM2's 30 layers are lowered once, not 30 times. The batch is fixed
at export (ExecuTorch plans memory for it; the runtime pads and splits), the sequence is
symbolic up to the model's ``max_length``. Every program is run once against eager PyTorch on
the example batch before it goes into a bundle."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from edgepeft import names
from edgepeft.errors import ExportError
from edgepeft.exporters import executorch_export, lean
from edgepeft.exporters.quantize import QuantizedTensor

FOLDER = "lean/executorch"
_aten = torch.ops.aten


def _dequantize(g: torch.fx.Graph, at: torch.fx.Node, q: torch.fx.Node, s: torch.fx.Node, ndim: int) -> torch.fx.Node:
    with g.inserting_before(at):
        f = g.call_function(_aten._to_copy.default, (q,), {"dtype": torch.float32})
        return g.call_function(_aten.mul.Tensor, (f, g.call_function(_aten.view.default, (s, [-1, *[1] * (ndim - 1)]))))


def _replace_weight(g: torch.fx.Graph, node: torch.fx.Node, q: torch.fx.Node, s: torch.fx.Node, ndim: int) -> None:
    """Every reader of the fp32 weight ``node`` reads int8 ``q`` x per-row ``s`` instead: a row
    gather (embedding) gathers int8 rows and their scales; any other reader gets the weight
    dequantized once."""
    for user in list(node.users):
        if user.target is _aten.embedding.default and user.args[0] is node:
            ids = user.args[1]
            with g.inserting_before(user):
                rows = g.call_function(_aten.embedding.default, (q, ids))
                col = g.call_function(_aten.view.default, (s, [-1, 1]))
                scale = g.call_function(_aten.embedding.default, (col, ids))
                f = g.call_function(_aten._to_copy.default, (rows,), {"dtype": torch.float32})
                new = g.call_function(_aten.mul.Tensor, (f, scale))
            user.replace_all_uses_with(new)
            g.erase_node(user)
    if node.users:
        first = next(n for n in g.nodes if n.op != "placeholder")
        node.replace_all_uses_with(_dequantize(g, first, q, s, ndim))


def _quantized_inputs(gm: torch.fx.GraphModule, args: list[lean.Arg], quant: dict) -> list[lean.Arg]:
    """The traced part's quantized weight inputs become (int8, scale) input pairs, named as
    ``lean/weights.safetensors`` stores them; returns the program's inputs."""
    g = gm.graph
    out: list[lean.Arg] = []
    placeholders = [n for n in g.nodes if n.op == "placeholder"]
    for (name, t, ax), node in zip(args, placeholders):
        qt = quant.get(name)
        if qt is None:
            out.append((name, t, ax))
            continue
        if not isinstance(qt, QuantizedTensor):
            raise ExportError(f"executorch-lean takes int8 or fp32 weights, not {type(qt).__name__} ({name}); "
                              "export with quant='int8', or use the lean backend for int4")
        with g.inserting_before(node):
            q, s = g.placeholder(f"{node.name}_q"), g.placeholder(f"{node.name}_scale")
        _replace_weight(g, node, q, s, qt.q.ndim)
        g.erase_node(node)
        out += [(name + names.Q_SUFFIX, torch.from_numpy(qt.q.copy()), None),
                (name + names.SCALE_SUFFIX, torch.from_numpy(qt.scale.copy()), None)]
    g.lint()
    gm.recompile()
    return out


def _emit(c, fn: Callable, args: list[lean.Arg], outs: list[str], quant: dict, path: Path) -> dict:
    gm = lean.trace(fn, [t for _, t, _ in args])
    inputs = _quantized_inputs(gm, args, quant)
    tensors = [t for _, t, _ in inputs]
    with executorch_export.quiet():
        ep = lean.export_traced(gm, tensors, [ax for *_, ax in inputs], c.n_extra, max_batch=None,
                                max_seq=c.max_length)
        program = executorch_export.lower(ep)
    path.write_bytes(program)
    _check(program, gm, tensors, path.name)
    return {"inputs": [n for n, _, _ in inputs], "outputs": list(outs)}


def _check(program: bytes, gm: torch.fx.GraphModule, tensors: list[torch.Tensor], what: str) -> None:
    """The program on ExecuTorch's runtime reproduces the traced part in eager PyTorch."""
    from executorch.extension.pybindings.portable_lib import _load_for_executorch_from_buffer

    with torch.no_grad():
        want = gm(*tensors)
    got = _load_for_executorch_from_buffer(program).forward(tuple(tensors))
    for k, (w, o) in enumerate(zip(want, got)):
        err, scale = (o - w).abs().max().item(), w.abs().max().item()
        if not err <= 1e-4 * (1 + scale):
            raise ExportError(f"the ExecuTorch program {what} does not reproduce eager PyTorch (output {k}: error "
                              f"{err:.3g} at scale {scale:.3g}); export for the lean backend instead")


def build_target(injected, forward, tmp: Path):
    """The executorch-lean backend's ``BackendTarget`` (see exporters.targets)."""
    emitter = lean.Emitter(names.BACKEND_EXECUTORCH_LEAN, FOLDER, ".pte", _emit,
                           batch=injected.plan.options.executorch_batch_size)
    return lean.build_target(injected, forward, tmp, emitter)
