"""The lean backend's graphs: a model cut into parts (``LeanParts``: embeddings, its repeated
blocks, the suffix), each part exported as a small standard-ONNX forward graph and a
vector-Jacobian (VJP) graph, with the frozen weights as graph INPUTS stored once in
``lean/weights.safetensors``.

Why: one whole-model gradient graph keeps every block's activations and every dequantized
fp32 weight alive from forward to backward, and a causal LM's (batch x seq x vocab) logits. The
device runtime instead runs the blocks forward keeping only each block's input, then walks them
backward recomputing one block at a time (per-block activation checkpointing, as MeBP does),
dequantizing one block's int8 weights at a time; the LM head runs in vocabulary chunks there.

Blocks of the same structure (the same parameter names, shapes, trainables and class) share one
pair of graphs: weights are inputs, so 30 Llama layers need 2 graphs, not 60. Graphs are traced
with ``make_fx`` over ``torch.func.vjp`` (core ATen decompositions) and re-exported with the
dynamo ONNX exporter; batch and sequence stay dynamic."""
from __future__ import annotations

import contextlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import torch
import torch.nn as nn
from onnx import helper

from edgepeft import names
from edgepeft.errors import ExportError
from edgepeft.exporters import onnx_graph
from edgepeft.exporters.memory_card import lean_card
from edgepeft.exporters.quantize import INT4_BLOCK, MIN_SUFFIX, Int4Tensor, QuantizedTensor
from edgepeft.exporters.zoo.parts import LeanParts

OPSET = 18
H, G = "h", "g"  # graph input names: a part's hidden-state input and the gradient of its output


@dataclass(frozen=True)
class Shapes:
    """Example sizes for tracing: primes that no weight dimension uses, so symbolic tracing
    cannot merge the batch or sequence length with a model dimension."""

    batch: int
    seq: int


def has_parts(model: nn.Module) -> bool:
    return callable(getattr(model, "lean_parts", None))


def _pick_shapes(model: nn.Module, max_length: int, n_extra: int, batch: int | None = None) -> Shapes:
    """``batch``: a fixed batch size (ExecuTorch's), kept; the sequence still avoids it."""
    used = {d for p in model.parameters() for d in p.shape} | {d for b in model.buffers() for d in b.shape}
    primes = [p for p in range(3, 512) if all(p % k for k in range(2, int(p ** 0.5) + 1))]
    free = [p for p in primes if p not in used and p + n_extra not in used and p != batch]
    seq = next((p for p in free[1:] if p <= max_length), None)
    if seq is None:
        raise ExportError(f"lean graphs: no free example sequence length <= max_length {max_length}")
    return Shapes(batch or free[0], seq)


def _resize(x: torch.Tensor, axes: dict[int, str], sh: Shapes) -> torch.Tensor:
    """``x`` with its dynamic axes repeated/cropped to the tracing sizes."""
    for axis, dim in axes.items():
        n = sh.batch if dim == "batch" else sh.seq
        reps = [1] * x.dim()
        reps[axis] = -(-n // x.shape[axis])
        x = x.repeat(*reps).narrow(axis, 0, n)
    return x.contiguous()


class _Call(nn.Module):
    """``fn`` as a module over exactly the parameters it is given (functional_call ties them)."""

    def __init__(self, gm: torch.fx.GraphModule):
        super().__init__()
        self.gm = gm

    def forward(self, *args: torch.Tensor):
        return tuple(self.gm(*args))


class _LinearAsMatmul(torch.overrides.TorchFunctionMode):
    """``F.linear`` with a bias on a 3-D input flattens it with concrete sizes (C++
    ``_flatten_nd_linear``), which would fix the batch and sequence length of a traced graph;
    matmul + add keeps them symbolic."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.linear:
            x, w, *rest = args
            b = rest[0] if rest else kwargs.get("bias")
            y = torch.matmul(x, w.t())
            return y if b is None else y + b
        return func(*args, **kwargs)


def trace(fn: Callable, args: list[torch.Tensor]) -> torch.fx.GraphModule:
    """``fn`` as a core-ATen FX graph with symbolic sizes (shared by the ONNX and ExecuTorch graphs)."""
    from torch._decomp import core_aten_decompositions
    from torch.fx.experimental.proxy_tensor import make_fx

    from edgepeft.exporters.joint_graph import replace_unexportable

    # Buffers (rotary tables) are constants of the graph: real tensors inside a symbolic trace.
    with _LinearAsMatmul():
        gm = make_fx(fn, decomposition_table=core_aten_decompositions(), tracing_mode="symbolic",
                     _allow_non_fake_inputs=True)(*args)
    replace_unexportable(gm)
    return gm


def export_traced(gm: torch.fx.GraphModule, args: list[torch.Tensor], dyn: list[dict[int, str] | None],
                  n_extra: int, *, max_batch: int | None = 1 << 16, max_seq: int = 1 << 16):
    """torch.export of a traced part; ``max_batch`` None keeps the batch at the example's size
    (ExecuTorch plans its memory for fixed sizes)."""
    seq = torch.export.Dim("seq", min=1, max=max_seq)
    # The blocks' sequence (prompt tokens included) is the input's plus a constant.
    dims = {"batch": torch.export.Dim("batch", min=1, max=max_batch) if max_batch else None, "seq": seq,
            "hseq": seq + n_extra if n_extra else seq}
    shapes = [{a: dims[d] for a, d in ax.items() if dims[d] is not None} or None if ax else None for ax in dyn]
    return torch.export.export(_Call(gm), tuple(args), strict=False, prefer_deferred_runtime_asserts_over_guards=True,
                               dynamic_shapes={"args": tuple(shapes)})


def _trace_to_onnx(fn: Callable, args: list[torch.Tensor], in_names: list[str], out_names: list[str],
                   dyn: list[dict[int, str] | None], n_extra: int, path: Path) -> onnx.ModelProto:
    from edgepeft.exporters.joint_graph import quiet_torch_onnx

    gm = trace(fn, args)
    with quiet_torch_onnx():
        ep = export_traced(gm, args, dyn, n_extra)
        with contextlib.redirect_stdout(io.StringIO()):
            torch.onnx.export(ep, tuple(args), str(path), dynamo=True, optimize=False, opset_version=OPSET,
                              verbose=False, input_names=in_names, output_names=out_names)
    return onnx.load(str(path))


def _params_to_quant_inputs(m: onnx.ModelProto, quantized: dict[str, QuantizedTensor | Int4Tensor]) -> None:
    """Float weight inputs named in ``quantized`` become their stored form's inputs: int8 +
    scale (the reused int8 rewrite: DequantizeLinear, or int8 row gathers for embedding tables),
    or int4 packed codes + scales + mins (unpacked inside the graph, gathered tables by row)."""
    g = m.graph
    present = {i.name: i for i in g.input}
    todo = {k: v for k, v in quantized.items() if k in present}
    for name in todo:
        g.input.remove(present[name])
        g.initializer.append(onnx.numpy_helper.from_array(np.zeros(1, np.float32), name))
    int4 = {k: v for k, v in todo.items() if isinstance(v, Int4Tensor)}
    onnx_graph.apply_int8(m, {k: v for k, v in todo.items() if k not in int4})
    onnx_graph.apply_int4(m, int4)
    moved = {n + sfx for n in todo for sfx in (names.Q_SUFFIX, names.SCALE_SUFFIX)}
    moved |= {n + MIN_SUFFIX for n in int4}
    for init in [i for i in g.initializer if i.name in moved]:
        g.initializer.remove(init)
        g.input.append(helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))


def _finish(m: onnx.ModelProto, quantized: dict[str, QuantizedTensor | Int4Tensor], path: Path) -> None:
    _params_to_quant_inputs(m, quantized)
    for node in m.graph.node:
        # The exporter's per-node notes (host stack traces, FX nodes: ~2/3 of a graph's bytes),
        # node names and intermediate shapes would ship in every bundle; onnxruntime needs none.
        del node.metadata_props[:]
        node.doc_string = node.name = ""
    del m.graph.value_info[:]
    onnx.checker.check_model(m)
    if any(n.domain not in ("", "ai.onnx") for n in m.graph.node):
        raise ExportError("lean graphs use non-standard ONNX domains")
    onnx.save(m, str(path))


@dataclass
class _Ctx:
    """What every part's tracing needs: the model, its trainable and quantized tensors (full
    names), the example activations, and where to write."""

    model: nn.Module
    parts: LeanParts
    trainable: set[str]
    quantized: dict[str, QuantizedTensor]
    inputs: dict[str, torch.Tensor]
    input_axes: dict[str, dict[int, str]]
    causal: bool
    tmp: Path
    shapes: Shapes
    emitter: "Emitter"
    n_extra: int = 0
    max_length: int = 1 << 16
    # member -> {"inputs": [...], "outputs": [...]}: positional programs (ExecuTorch) need them.
    signatures: dict = field(default_factory=dict)
    # Block buffers fed as inputs (full name -> tensor), stored with the frozen weights.
    buffer_inputs: dict = field(default_factory=dict)


Emit = Callable[..., "dict | None"]


@dataclass(frozen=True)
class Emitter:
    """How a traced part becomes a bundle member: ONNX graphs (the lean backend) or ExecuTorch
    programs (executorch-lean). ``emit(c, fn, args, in_names, out_names, quant, path)`` writes
    the member and returns its signature, or None where the format names its own inputs."""

    backend: str
    folder: str
    suffix: str
    emit: Emit
    batch: int | None = None  # a fixed batch (ExecuTorch plans memory for it)

    @property
    def plan_member(self) -> str:
        return f"{self.folder}/plan.json"


class _Bound(nn.Module):
    """A part that is a method of the model, callable through functional_call."""

    def __init__(self, model: nn.Module, fn: Callable):
        super().__init__()
        self.model = model
        self._fn = fn

    def forward(self, *args: torch.Tensor):
        return self._fn(*args)


def _cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean over labelled positions, as the other backends' graphs compute it."""
    x, y = logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)
    keep = y != names.IGNORE_INDEX
    picked = x.gather(1, torch.where(keep, y, 0).unsqueeze(1)).squeeze(1)
    return ((torch.logsumexp(x, dim=1) - picked) * keep).sum() / keep.sum()


def _split(params: dict[str, torch.Tensor], trainable: set[str], prefix: str) -> tuple[list[str], list[str]]:
    frozen = [n for n in params if prefix + n not in trainable]
    return frozen, [n for n in params if prefix + n in trainable]


def _vjp(call: Callable, acts: list[torch.Tensor], frozen: dict, train: dict, wrt_first: bool,
         cot: torch.Tensor | None):
    """(output, *grads): the VJP of ``call(acts, params)`` w.r.t. (acts[0] if ``wrt_first``) and the trainables;
    ``cot`` None means the output is a scalar loss (cotangent 1)."""
    def f(*xs):
        first, t = (xs[0], xs[1:]) if wrt_first else (acts[0], xs)
        return call([first, *acts[1:]], {**frozen, **dict(zip(train, t))})

    primals = ([acts[0]] if wrt_first else []) + list(train.values())
    out, pull = torch.func.vjp(f, *primals)
    grads = pull(torch.ones_like(out) if cot is None else cot)
    return (out, *grads) if cot is None else tuple(grads)


Arg = tuple[str, torch.Tensor, "dict[int, str] | None"]
HSEQ = {0: "batch", 1: "hseq"}


def _export(c: _Ctx, member: str, fn: Callable, args: list[Arg], outs: list[str],
            quant: dict[str, QuantizedTensor]) -> str:
    path = c.tmp / member
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        sig = c.emitter.emit(c, fn, args, outs, quant, path)
    except ExportError:
        raise
    except Exception as e:  # tracing and export raise many kinds; name the part that failed
        raise ExportError(f"could not build the lean graph {member}: {type(e).__name__}: {str(e)[:500]}") from e
    if sig is not None:
        c.signatures[member] = sig
    return member


def _emit_onnx(c: _Ctx, fn: Callable, args: list[Arg], outs: list[str], quant: dict, path: Path) -> None:
    m = _trace_to_onnx(fn, [t for _, t, _ in args], [n for n, _, _ in args], outs, [ax for *_, ax in args],
                       c.n_extra, path)
    _finish(m, quant, path)


ONNX = Emitter(names.BACKEND_LEAN, "lean", ".onnx", _emit_onnx)


def _graphs(c: _Ctx, tag: str, call: Callable, acts: list[Arg], params: dict[str, torch.Tensor], prefix: str,
            vjp: str) -> dict:
    """Forward and VJP graphs of one part. ``call(acts, params)`` runs it; ``vjp``: "block"
    (cotangent g of the output, gradient of acts[0] too), "loss" (labels follow the acts; the
    output is the loss), "cotangent" (as block, for a suffix), "prefix" (trainables only)."""
    frozen, train = _split(params, c.trainable, prefix)
    order = frozen + train
    quant = {n: c.quantized[prefix + n] for n in params if prefix + n in c.quantized}
    p_args: list[Arg] = [(n, params[n].detach(), None) for n in order]
    n_act = len(acts)

    def fwd(*xs):
        out = call(list(xs[:n_act]), dict(zip(order, xs[n_act:])))
        return out if isinstance(out, tuple) else (out,)

    with torch.no_grad():
        example_out = fwd(*[t for _, t, _ in acts + p_args])
    entry = {"prefix": prefix, "trainable": train,
             "fwd": _export(c, f"{c.emitter.folder}/{tag}{c.emitter.suffix}", fwd, acts + p_args,
                            [f"out{k}" for k in range(len(example_out))], quant)}
    if vjp == "prefix" and not train:
        return {**entry, "vjp": None}
    extra, wrt_first = _vjp_inputs(c, vjp, acts, example_out)

    def vjp_fn(*xs):
        a, rest = list(xs[:n_act]), xs[n_act:]
        head, w = rest[:len(extra)], rest[len(extra):]
        fz, tr = dict(zip(frozen, w[:len(frozen)])), dict(zip(train, w[len(frozen):]))
        if vjp == "loss":
            return _vjp(lambda aa, p: _cross_entropy(call(aa, p), head[0]), a, fz, tr, True, None)
        return _vjp(lambda aa, p: _first(call(aa, p)), a, fz, tr, wrt_first, head[0])

    outs = (["loss"] if vjp == "loss" else []) + (["g_h"] if wrt_first else []) + [n + "/grad" for n in train]
    entry["vjp"] = _export(c, f"{c.emitter.folder}/{tag}_vjp{c.emitter.suffix}", vjp_fn, acts + extra + p_args, outs, quant)
    return entry


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _vjp_inputs(c: _Ctx, vjp: str, acts: list[Arg], example_out: tuple) -> tuple[list[Arg], bool]:
    if vjp == "loss":
        labels = _resize(torch.zeros(c.shapes.batch, dtype=torch.int64), {0: "batch"}, c.shapes)
        return [(names.LABELS_INPUT, labels, {0: "batch"})], True
    out = example_out[0]
    axes = {0: "batch", 1: "seq" if vjp == "cotangent" and out.shape[1] == c.shapes.seq else "hseq"}
    return [(G, torch.randn_like(out), axes)], vjp != "prefix"


PLAN_MEMBER = ONNX.plan_member
# Shared by every lean plan of a bundle (ONNX graphs and ExecuTorch programs take the same inputs).
WEIGHTS_MEMBER = "lean/weights.safetensors"


def _bound_call(model: nn.Module, fn: Callable) -> Callable:
    bound = _Bound(model, fn)
    return lambda acts, p: torch.func.functional_call(bound, {"model." + k: v for k, v in p.items()}, tuple(acts))


def _block_call(block: nn.Module) -> Callable:
    return lambda acts, p: torch.func.functional_call(block, p, tuple(acts))


def _used(call: Callable, acts: list[torch.Tensor], candidates: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The parameters a part reads (a quick real-valued trace; unused placeholders have no users)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    keys = list(candidates)
    gm = make_fx(lambda *ws: call(acts, dict(zip(keys, ws))))(*[candidates[k].detach() for k in keys])
    ph = [n for n in gm.graph.nodes if n.op == "placeholder"]
    return {k: candidates[k] for k, node in zip(keys, ph) if node.users}


def _ctx_axes(t: torch.Tensor, sh: Shapes, hseq: int) -> dict[int, str] | None:
    axes = {a: "batch" if d == sh.batch else "hseq" for a, d in enumerate(t.shape) if d in (sh.batch, hseq)}
    return axes or None


def _signature(block: nn.Module, prefix: str, c: _Ctx, tensors: dict[str, torch.Tensor]) -> tuple:
    return (type(block).__qualname__, getattr(block, "lean_key", None),
            tuple((n, tuple(p.shape), prefix + n in c.trainable, prefix + n in c.quantized)
                  for n, p in tensors.items()))


def _varying_buffers(blocks) -> set[str]:
    """Names (within a block) of buffers whose values differ between blocks, such as LoRA-FA's
    frozen A matrices: a graph shared by blocks takes them as inputs. Buffers equal in every
    block (rotary tables) stay constants of the graph."""
    first: dict[str, torch.Tensor] = {}
    varying = set()
    for block in blocks:
        for n, t in block.named_buffers():
            seen = first.setdefault(n, t)
            if seen is not t and (seen.shape != t.shape or seen.dtype != t.dtype or not torch.equal(seen, t)):
                varying.add(n)
    return varying


def _block_tensors(block: nn.Module, varying: set[str]) -> dict[str, torch.Tensor]:
    return {**dict(block.named_parameters()), **{n: t for n, t in block.named_buffers() if n in varying}}


def _blocks(c: _Ctx, prefixes: list[str], h: torch.Tensor, ctx: list[torch.Tensor]) -> tuple[dict, list[dict]]:
    hseq = h.shape[1]
    acts: list[Arg] = [(H, h, HSEQ), *[(f"ctx{k}", t, _ctx_axes(t, c.shapes, hseq)) for k, t in enumerate(ctx)]]
    groups: dict[tuple, str] = {}
    graphs: dict[str, dict] = {}
    order = []
    varying = _varying_buffers(c.parts.blocks)
    for block, prefix in zip(c.parts.blocks, prefixes):
        tensors = _block_tensors(block, varying)
        c.buffer_inputs.update({prefix + n: t for n, t in block.named_buffers() if n in varying})
        sig = _signature(block, prefix, c, tensors)
        if sig not in groups:
            tag = groups[sig] = f"block{len(groups)}"
            graphs[tag] = _graphs(c, tag, _block_call(block), acts, tensors, prefix, "block")
        order.append({"prefix": prefix, "graph": groups[sig]})
    return graphs, order


def build(model: nn.Module, example_inputs: dict[str, torch.Tensor], input_axes: dict[str, dict[int, str]],
          trainable: list[str], quantized: dict[str, QuantizedTensor], causal: bool, max_length: int,
          tmp: Path, emitter: Emitter = ONNX) -> dict[str, Path]:
    """Write the lean graphs (or programs), weights and plan under ``tmp``; returns {bundle member: file}."""
    from edgepeft.exporters.joint_graph import canonical_names

    parts: LeanParts = model.lean_parts()
    head = canonical_names(model).get(parts.head, parts.head) if parts.head else None
    if head is not None and head in trainable:
        raise ExportError(f"lean graphs: the LM head {head!r} is trainable; the lean backend runs the head in "
                          "vocabulary chunks over a frozen weight: train other tensors, or use the portable backend")
    where = {id(m): n for n, m in model.named_modules()}
    prefixes = [where[id(b)] + "." for b in parts.blocks]
    with torch.no_grad():
        n_extra = parts.pre(*example_inputs.values())[0].shape[1] - _seq_len(example_inputs, input_axes)
    sh = _pick_shapes(model, max_length, n_extra, emitter.batch)
    inputs = {k: _resize(v, input_axes.get(k, {}), sh) for k, v in example_inputs.items()}
    c = _Ctx(model, parts, set(trainable), quantized, inputs, input_axes, causal, tmp, sh, emitter, n_extra,
             max_length)
    outside = {n: p for n, p in model.named_parameters() if not any(n.startswith(pf) for pf in prefixes)}
    in_args: list[Arg] = [(k, v, input_axes.get(k)) for k, v in inputs.items()]
    pre_call, post_call = _bound_call(model, parts.pre), _bound_call(model, parts.post)
    pre = _graphs(c, "pre", pre_call, in_args, _used(pre_call, list(inputs.values()), outside), "", "prefix")
    with torch.no_grad():
        h, *ctx = parts.pre(*inputs.values())
    graphs, order = _blocks(c, prefixes, h, ctx)
    post_acts = [h, *inputs.values()]
    post = _graphs(c, "post", post_call, [(H, h, HSEQ), *in_args], _used(post_call, post_acts, outside), "",
                   "cotangent" if causal else "loss")
    plan = {"version": 1, "n_ctx": len(ctx), "causal": causal, "head": head, "pre": pre, "post": post,
            "graphs": graphs, "blocks": order}
    if emitter.batch is not None:
        plan.update(batch_size=emitter.batch, signatures=c.signatures)
    return _write_plan(c, plan)


def _seq_len(inputs: dict[str, torch.Tensor], axes: dict[str, dict[int, str]]) -> int:
    for k, v in inputs.items():
        for a, d in axes.get(k, {}).items():
            if d == "seq":
                return int(v.shape[a])
    raise ExportError("lean graphs need a sequence axis named 'seq' among the model inputs' dynamic axes")


def _write_plan(c: _Ctx, plan: dict) -> dict[str, Path]:
    from safetensors.numpy import save_file

    weights: dict[str, np.ndarray] = {}
    weights.update({name: t.detach().cpu().numpy() for name, t in c.buffer_inputs.items()})
    for name, p in c.model.named_parameters():
        if name in c.trainable:
            continue
        qt = c.quantized.get(name)
        if qt is None:
            weights[name] = p.detach().cpu().numpy().astype(np.float32)
        elif isinstance(qt, Int4Tensor):
            weights.update(_int4_members(name, qt))
        else:
            weights[name + names.Q_SUFFIX], weights[name + names.SCALE_SUFFIX] = qt.q, qt.scale
    head = c.quantized.get(plan["head"]) if plan["head"] else None
    if isinstance(head, Int4Tensor):  # the runtime's chunked head unpacks these (runtime.lean_head)
        plan["head_int4"] = {"block": INT4_BLOCK, **{k: v for k, v in zip(("q", "scale", "min"),
                                                                          _int4_members(plan["head"], head))}}
    # Stored once, uncompressed and aligned, so the device can memory-map it.
    save_file(weights, str(c.tmp / WEIGHTS_MEMBER))
    plan_member = c.emitter.plan_member
    (c.tmp / plan_member).write_text(json.dumps(plan, indent=1))
    members = {plan_member, WEIGHTS_MEMBER, *(g[k] for g in [plan["pre"], plan["post"], *plan["graphs"].values()]
                                              for k in ("fwd", "vjp") if g.get(k))}
    return {m: c.tmp / m for m in sorted(members)}


def _int4_members(name: str, qt: Int4Tensor) -> dict[str, np.ndarray]:
    """The stored tensors of an int4 weight, by graph input name (what the lean graphs take)."""
    return {name + names.Q_SUFFIX: qt.packed, name + names.SCALE_SUFFIX: qt.scale, name + MIN_SUFFIX: qt.min}


def build_target(injected, forward, tmp: Path, emitter: Emitter = ONNX):
    """The lean backend's ``BackendTarget`` (export pipeline builder: see exporters.targets)."""
    from edgepeft.exporters.stages import BackendTarget

    model = injected.model
    if not has_parts(model):
        raise ExportError(f"{injected.plan.source.name!r} declares no lean parts (a `lean_parts()` method "
                          "returning edgepeft.exporters.zoo.parts.LeanParts: embeddings, blocks, suffix); the "
                          "zoo's transformers have them. Use the portable or ort-training backend for this model")
    for folder in {emitter.folder, Path(WEIGHTS_MEMBER).parent}:
        (tmp / folder).mkdir(parents=True, exist_ok=True)
    files = build(model, injected.example_inputs, injected.dynamic_axes, injected.trainable_names,
                  injected.quantized, injected.plan.causal, injected.plan.source.max_length, tmp, emitter)
    head = json.loads(files[emitter.plan_member].read_text())["head"]
    card = lean_card(model, injected.example_inputs, injected.dynamic_axes, injected.plan.source.max_length,
                     injected.quantized, head)
    entry = {"plan": emitter.plan_member, "weights": WEIGHTS_MEMBER}
    if emitter.batch is not None:
        entry[names.EXECUTORCH_BATCH_SIZE] = str(emitter.batch)
    return BackendTarget(emitter.backend, entry, files, memory={"lean": card})
