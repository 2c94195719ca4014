"""The bundle's memory card: what the device-side memory model needs to know about the graph,
measured on the host at export so that a device can predict its memory from the manifest
alone (``edgepeft.memory_model``).

- weights: bytes of the frozen base as loaded (int8 + scales, fp32 rest), the fp32 bytes
  that DequantizeLinear materializes during a step (row-gathered tables never exist in fp32),
  and the trainable bytes;
- activations: bytes autograd keeps for backward per example, loss included, fitted as
  ``c0 + c1*seq + c2*seq**2`` over three sequence lengths (attention is quadratic in seq);
  for fixed-shape inputs (images) only c0.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from torch import nn



def _weights(forward: onnx.ModelProto, trainable: set[str]) -> dict[str, int]:
    sizes = {i.name: int(np.prod(i.dims)) * (1 if i.data_type == onnx.TensorProto.INT8 else 4)
             for i in forward.graph.initializer}
    dequant = 0
    for node in forward.graph.node:
        if node.op_type == "DequantizeLinear":
            dequant += sizes.get(node.input[0], 0) * 4  # int8 in, fp32 out
    stored = sum(v for k, v in sizes.items() if k not in trainable)
    return {"frozen_bytes": stored, "dequant_fp32_bytes": dequant,
            "trainable_bytes": sum(v for k, v in sizes.items() if k in trainable)}


@contextlib.contextmanager
def _counting_saved(exclude: set[int]) -> Iterator[dict[int, int]]:
    """Counts the bytes autograd saves for backward while active (each storage once; storages
    in ``exclude``, e.g. weights, are not activations)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in exclude:
            seen[ptr] = max(seen.get(ptr, 0), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield seen


def _storages(tensors) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in tensors}


def _saved_bytes(model: nn.Module, inputs: dict[str, torch.Tensor], causal: bool) -> int:
    """Bytes autograd saves for backward in one forward + loss (parameters excluded: they are
    weights, not activations)."""
    with _counting_saved(_storages([*model.parameters(), *model.buffers()])) as seen:
        logits = model(*inputs.values())
        if causal:
            labels = torch.zeros(logits.shape[:2], dtype=torch.int64)
            F.cross_entropy(logits.flatten(0, 1), labels.flatten())
        else:
            F.cross_entropy(logits, torch.zeros(logits.shape[0], dtype=torch.int64))
    return sum(seen.values())


def _resize(example: dict[str, torch.Tensor], axes: dict[str, dict[int, str]], seq: int) -> dict[str, torch.Tensor]:
    """Batch 1, every 'seq' axis resized to ``seq`` (token ids repeat the example's first ones)."""
    out = {}
    for k, v in example.items():
        v = v[:1]
        for dim, label in axes.get(k, {}).items():
            if dim > 0 and label != "batch":
                reps = -(-seq // v.shape[dim])
                v = v.repeat(*[reps if d == dim else 1 for d in range(v.dim())])
                v = v.narrow(dim, 0, seq)
        out[k] = v.contiguous()
    return out


def activation_fit(model: nn.Module, example: dict[str, torch.Tensor], axes: dict[str, dict[int, str]],
                   max_length: int, causal: bool) -> list[float]:
    """[c0, c1, c2]: saved bytes per example = c0 + c1*seq + c2*seq**2."""
    has_seq = any(label != "batch" for a in axes.values() for d, label in a.items() if d > 0)
    if not has_seq:
        return [float(_saved_bytes(model, _resize(example, axes, 1), causal)), 0.0, 0.0]
    lengths = sorted({max(2, max_length // 4), max(3, max_length // 2), max(4, max_length)})
    ys = [_saved_bytes(model, _resize(example, axes, s), causal) for s in lengths]
    c2, c1, c0 = np.polyfit(np.array(lengths, float), np.array(ys, float), 2)
    return [float(c0), float(c1), float(c2)]


def memory_card(model: nn.Module, forward: onnx.ModelProto, trainable: list[str], example: dict[str, torch.Tensor],
                axes: dict[str, dict[int, str]], max_length: int, causal: bool) -> dict:
    was = model.training
    model.eval()
    try:
        acts = activation_fit(model, example, axes, max_length, causal)
    finally:
        model.train(was)
    return {"version": 1, **_weights(forward, set(trainable)), "activations_per_example": acts,
            "logits_per_position": int(forward.graph.output[0].type.tensor_type.shape.dim[-1].dim_value)
            if causal else 0}


def _block_saved(block: nn.Module, h: torch.Tensor, ctx: list[torch.Tensor]) -> int:
    """Bytes autograd saves inside one block (its input excluded): what its VJP graph holds."""
    with _counting_saved(_storages([*block.parameters(), h, *ctx])) as seen:
        block(h.detach().requires_grad_(True), *ctx).sum()
    return sum(seen.values())


def lean_card(model: nn.Module, example: dict[str, torch.Tensor], axes: dict[str, dict[int, str]], max_length: int,
              quantized: dict, canonical_head: str | None) -> dict:
    """What the lean backend's memory model needs: the number of blocks and the hidden width
    (block inputs are kept for backward), one block's saved bytes per example (fitted in seq as
    the activations are), the fp32 bytes of the largest block's dequantized weights, and the LM
    head's shape (it runs in vocabulary chunks)."""
    parts = model.lean_parts()
    where = {id(m): n for n, m in model.named_modules()}
    deq = max(sum(qt.q.size * 4 for k, qt in quantized.items() if k.startswith(where[id(b)] + "."))
              for b in parts.blocks)
    ys, lengths = [], sorted({max(2, max_length // 4), max(3, max_length // 2), max(4, max_length)})
    for s in lengths:
        with torch.no_grad():
            h, *ctx = parts.pre(*_resize(example, axes, s).values())
        ys.append(max(_block_saved(b, h, ctx) for b in {id(type(b)): b for b in parts.blocks}.values()))
    c2, c1, c0 = np.polyfit(np.array(lengths, float), np.array(ys, float), 2)
    head = dict(model.named_parameters()).get(canonical_head) if canonical_head else None
    with torch.no_grad():
        h = parts.pre(*_resize(example, axes, lengths[0]).values())[0]
    return {"blocks": len(parts.blocks), "hidden": int(h.shape[-1]), "extra_positions": int(h.shape[1] - lengths[0]),
            "block_acts_per_example": [float(c0), float(c1), float(c2)], "block_dequant_fp32_bytes": int(deq),
            "head_rows": int(head.shape[0]) if head is not None else 0}
