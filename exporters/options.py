"""ExportOptions: every option of an export in one frozen object, checked at construction."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal, Mapping, Sequence

from edgepeft import names
from edgepeft.errors import SpecError
from edgepeft.manifest_schema import TASK_LOSS

CAUSAL_LM = "causal-lm"  # the task of a next-token model (manifest "task")
# task -> the loss trained on the device (defined once, with the manifest's schema); for a
# plain nn.Module the loss chooses the task.
LOSSES = dict(TASK_LOSS)
TASKS = {loss: task for task, loss in LOSSES.items()}
QUANTS = ("int8", "int4", "none")
# The backends whose graphs take int4 weights (unpacked in the graph from uint8 codes). The
# others would need DequantizeLinear with block_size (opset 21) in graphs exported at opset
# 17/18, which ORT training's gradient builder and ExecuTorch's int8 route do not take.
INT4_BACKENDS = (names.BACKEND_LEAN,)


@dataclasses.dataclass(frozen=True)
class ExportOptions:
    """How to export; the fields are ``export_bundle``'s options (its docstring says more)."""

    # The training loss; None: the one the model's task implies. For a plain nn.Module it
    # chooses the task: "causal_lm" -> (batch, seq, vocab) logits over token-id labels.
    loss: Literal["cross_entropy", "causal_lm"] | None = None
    # "int8": frozen 2-D weights stored int8 + per-row scale; "int4": 4-bit codes in blocks of 32
    # along the input dimension with a scale and a min per block (lean backend only; a weight
    # whose input dimension is not a multiple of 32 falls back to int8); "none": fp32.
    quant: Literal["int8", "int4", "none"] = "int8"
    # For a plain nn.Module: class names (default "0".."n-1"; none for a causal LM), the
    # tokenizer.json text, the longest sequence, {input: {axis: name}} and the model's name.
    labels: tuple[str, ...] | None = None
    tokenizer_json: str | None = None
    max_length: int = 128
    dynamic_axes: Mapping[str, Mapping[int, str]] | None = None
    name: str | None = None
    # A PEFT adapter folder whose values start the bundle's initial adapter.
    init_adapter: Path | None = None
    # Training graphs to write; None: the default set, leaving out (with a warning) a portable
    # graph the model cannot be turned into.
    backends: tuple[str, ...] | None = None
    # An ed25519 private key (``edgepeft keygen``) that signs the manifest.
    sign_key: Path | None = None
    # The fixed batch of the ExecuTorch programs (the runtime pads or splits to it).
    executorch_batch_size: int = 8

    def __post_init__(self) -> None:
        if self.loss is not None and self.loss not in TASKS:
            raise SpecError(f"`loss` must be one of {list(TASKS)} or None (the model's own), got {self.loss!r}")
        if self.quant not in QUANTS:
            raise SpecError(f"`quant` must be one of {list(QUANTS)}, got {self.quant!r}")
        _check_positive("max_length", self.max_length, "the longest token sequence the model takes, e.g. 128")
        _check_positive("executorch_batch_size", self.executorch_batch_size, "the rows per ExecuTorch step, e.g. 8")
        self._set("labels", _names("labels", self.labels))
        self._set("backends", _backends(self.backends))
        _check_int4(self.quant, self.backends)
        self._set("dynamic_axes", _axes(self.dynamic_axes))
        for field in ("tokenizer_json", "name"):
            value = getattr(self, field)
            if value is not None and (not isinstance(value, str) or not value):
                raise SpecError(f"`{field}` must be a non-empty string or None, got {value!r}")
        for field in ("init_adapter", "sign_key"):
            value = getattr(self, field)
            if value is not None and not isinstance(value, (str, Path)):
                raise SpecError(f"`{field}` must be a path (str or Path) or None, got {value!r}")
            self._set(field, None if value is None else Path(value))

    def _set(self, field: str, value) -> None:
        object.__setattr__(self, field, value)

    @property
    def best_effort(self) -> bool:
        """Backends were not named: a best-effort backend the model cannot give is skipped."""
        return self.backends is None

    @property
    def export_backends(self) -> tuple[str, ...]:
        return names.DEFAULT_EXPORT_BACKENDS if self.backends is None else self.backends


def _check_positive(field: str, value, example: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SpecError(f"`{field}` must be a positive int, got {value!r}: give {example}")


def _check_int4(quant: str, backends: tuple[str, ...] | None) -> None:
    if quant != "int4":
        return
    others = sorted(set(backends or names.DEFAULT_EXPORT_BACKENDS) - set(INT4_BACKENDS))
    if others:
        raise SpecError(f"`quant` 'int4' is available on the lean backend only, got backends {others}: export "
                        f"with backends=('lean',), or use quant='int8' for {others}")


def _names(field: str, value: Sequence[str] | None) -> tuple[str, ...] | None:
    if not value:  # None or empty: the default labels
        return None
    if isinstance(value, str) or not all(isinstance(v, str) and v for v in value):
        raise SpecError(f"`{field}` must be a list of non-empty strings, got {value!r}: e.g. ['neg', 'pos']")
    dup = sorted({v for v in value if list(value).count(v) > 1})
    if dup:
        raise SpecError(f"`{field}` has duplicates {dup}: give each class one name")
    return tuple(value)


def _backends(value: Sequence[str] | None) -> tuple[str, ...] | None:
    if value is None:
        return None
    given = (value,) if isinstance(value, str) else tuple(value)
    if not given or sorted(set(given) - set(names.EXPORT_BACKENDS)):
        raise SpecError(f"`backends` must be some of {list(names.EXPORT_BACKENDS)}, got {list(given)}")
    return given


def _axes(value: Mapping[str, Mapping[int, str]] | None) -> dict[str, dict[int, str]] | None:
    if not value:
        return None
    try:
        return {str(k): {int(a): str(n) for a, n in dict(v).items()} for k, v in dict(value).items()}
    except (TypeError, ValueError):
        raise SpecError(f"`dynamic_axes` must map input names to {{axis: name}}, got {value!r}: "
                        "e.g. {'input_ids': {0: 'batch', 1: 'seq'}}") from None
