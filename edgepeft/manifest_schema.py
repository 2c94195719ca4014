"""The manifest's schema: every field's JSON type, range and known values, checked when a bundle
opens (Manifest.from_dict) so a hand-edited or crafted manifest is refused with one ManifestError
naming the field, never discovered as an OverflowError in the tokenizer or a TypeError in the
memory model. ``describe()`` renders the same schema as the table in docs/bundle-format.md
(tests/test_errors.py checks that the document shows it).

Unknown keys at the top level are dropped with a warning (a newer edgepeft may add fields);
unknown keys inside the memory card and quantization are kept (per-backend additions)."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable

from edgepeft import names
from edgepeft.errors import ManifestError

# task -> the loss trained for it (the exporter writes this pair; edgepeft.exporters.options reads it).
TASK_LOSS = {"classification": "cross_entropy", "causal-lm": "causal_lm"}
DTYPES = ("float32", "float16", "int64", "int32", "int8", "uint8", "bool")
MAX_LENGTH = 1 << 20  # tokens: far beyond any model this SDK exports
MAX_DIM = 1 << 31
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class _Bad(Exception):
    """A schema violation at a path; turned into one ManifestError by ``validate``."""

    def __init__(self, path: str, expected: str, got: Any):
        super().__init__(path, expected, got)
        self.path, self.expected, self.got = path, expected, got


@dataclass(frozen=True)
class T:
    """A schema node: ``doc`` says what it accepts, ``check(value, path)`` raises _Bad."""

    doc: str
    check: Callable[[Any, str], None]


def _fail(path: str, doc: str, v: Any) -> None:
    raise _Bad(path, doc, v)


def integer(lo: int, hi: int) -> T:
    doc = f"integer in [{lo}, {hi}]" if hi < MAX_DIM << 20 else f"integer >= {lo}"

    def check(v, path):
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            _fail(path, doc, v)
    return T(doc, check)


def number(lo: float = -math.inf) -> T:
    doc = "finite number" + (f" >= {lo:g}" if lo > -math.inf else "")

    def check(v, path):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < lo:
            _fail(path, doc, v)
    return T(doc, check)


def string(choices: tuple[str, ...] = (), pattern: re.Pattern | None = None, doc: str = "non-empty string") -> T:
    if choices:
        doc = "one of " + ", ".join(f'"{c}"' for c in choices)

    def check(v, path):
        if not isinstance(v, str) or not v or (choices and v not in choices) or (pattern and not pattern.match(v)):
            _fail(path, doc, v)
    return T(doc, check)


def array(item: T, *, min_len: int = 0, length: int | None = None, unique: Callable | None = None) -> T:
    size = f" of {length}" if length is not None else (f", at least {min_len}" if min_len else "")
    doc = f"list{size} of ({item.doc})" + (", no duplicates" if unique else "")

    def check(v, path):
        if not isinstance(v, list) or len(v) < min_len or (length is not None and len(v) != length):
            _fail(path, doc, v)
        for i, x in enumerate(v):
            item.check(x, f"{path}[{i}]")
        if unique is not None:
            keys = [unique(x) for x in v]
            dup = sorted({k for k in keys if keys.count(k) > 1})
            if dup:
                _fail(path, doc + f" (duplicates: {dup[:3]})", v)
    return T(doc, check)


def mapping(value: T, *, keys: T | None = None) -> T:
    doc = f"JSON object of {keys.doc if keys else 'name'} -> ({value.doc})"

    def check(v, path):
        if not isinstance(v, dict):
            _fail(path, doc, v)
        for k, x in v.items():
            (keys or string()).check(k, f"{path} key")
            value.check(x, f"{path}.{k}")
    return T(doc, check)


def switch(pick: Callable[[Any], T], doc: str) -> T:
    """A node whose type depends on the value (``pick(value)``), so errors name the inner field."""
    return T(doc, lambda v, path: pick(v).check(v, path))


def either(*options: T) -> T:
    doc = " or ".join(o.doc for o in options)

    def check(v, path):
        for o in options:
            try:
                o.check(v, path)
                return
            except _Bad:
                pass
        _fail(path, doc, v)
    return T(doc, check)


@dataclass(frozen=True)
class Field:
    type: T
    required: bool = True
    doc: str = ""


@dataclass(frozen=True)
class Obj:
    """A JSON object with known fields; ``extra``: whether other keys are allowed (kept as is)."""

    fields: dict[str, Field]
    extra: bool = True
    name: str = "object"
    notes: tuple[str, ...] = field(default_factory=tuple)

    def t(self) -> T:
        def check(v, path):
            if not isinstance(v, dict):
                _fail(path, f"JSON object ({self.name})", v)
            for k, f in self.fields.items():
                if k in v:
                    f.type.check(v[k], f"{path}.{k}")
                elif f.required:
                    _fail(f"{path}.{k}", f"present ({f.type.doc})", "nothing")
            if not self.extra and set(v) - set(self.fields):
                _fail(path, f"only the keys {sorted(self.fields)}", sorted(set(v) - set(self.fields)))
        return T(self.name, check)


SHAPE = array(either(integer(1, MAX_DIM), string(doc="axis name")))
IO = Obj({"name": Field(string()), "dtype": Field(string(DTYPES)), "shape": Field(SHAPE)}, extra=False,
         name="{name, dtype, shape}")
TENSOR = Obj({"name": Field(string(), doc="graph name"), "peft_key": Field(string(), doc="key in the PEFT file"),
              "shape": Field(array(integer(1, MAX_DIM))), "method": Field(string()),
              "dtype": Field(string(("float32",)), required=False)}, extra=False,
             name="{name, peft_key, shape, method, dtype}")
def _setting(v, path):
    if not (isinstance(v, str) and v) and (isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= MAX_DIM):
        _fail(path, SETTING.doc, v)


SETTING = T("string or integer >= 1 (settings are strings or integers)", _setting)
# A backend entry: typed {"members": {role: member}, "settings": {key: value}}, or the flat
# {key: value} of older manifests (edgepeft.manifest.BackendEntry.parse tells them apart).
_TYPED = Obj({"members": Field(mapping(string())), "settings": Field(mapping(SETTING), required=False)},
             extra=False, name='{"members": {role: member}, "settings": {key: value}}').t()
BACKEND = switch(lambda v: _TYPED if isinstance(v, dict) and isinstance(v.get("members"), dict) else mapping(SETTING),
                 _TYPED.doc + " (or the flat {key: value} of older bundles)")
ACTS = array(number(), length=3)
LEAN_CARD = Obj({"blocks": Field(integer(1, MAX_DIM)), "hidden": Field(integer(1, MAX_DIM)),
                 "extra_positions": Field(integer(0, MAX_DIM)), "block_acts_per_example": Field(ACTS),
                 "block_dequant_fp32_bytes": Field(number(0)), "head_rows": Field(integer(0, MAX_DIM))},
                name="lean memory card")
# An older bundle's card is {} (the memory model then says to re-export); otherwise these.
MEMORY_CARD = Obj({"version": Field(integer(1, 1 << 20), required=False),
                   "frozen_bytes": Field(number(0), doc="frozen weights as stored"),
                   "dequant_fp32_bytes": Field(number(0), doc="fp32 bytes DequantizeLinear makes per step"),
                   "trainable_bytes": Field(number(0), required=False),
                   "activations_per_example": Field(ACTS, doc="c0, c1, c2: saved bytes = c0 + c1*seq + c2*seq^2"),
                   "logits_per_position": Field(integer(0, MAX_DIM), required=False),
                   "lean": Field(LEAN_CARD.t(), required=False)}, name="memory card")
MANIFEST = Obj({
    "schema_version": Field(integer(names.SCHEMA_VERSION, names.SCHEMA_VERSION)),
    "sdk_version": Field(string(), doc="the edgepeft that wrote the bundle"),
    "model_name": Field(string()),
    "model_sha256": Field(string(), doc="hash of the source weights"),
    "task": Field(string(tuple(TASK_LOSS))),
    "loss": Field(string(tuple(TASK_LOSS.values())), doc="the task's loss (classification: cross_entropy, "
                                                         "causal-lm: causal_lm)"),
    "methods": Field(array(Obj({"method": Field(string())}, name='{"method": ..., spec fields}').t(), min_len=1),
                     doc="PEFT method specs, checked by edgepeft.specs"),
    "trainable": Field(array(TENSOR.t(), min_len=1, unique=lambda t: t.get("name")), doc="unique names"),
    "inputs": Field(array(IO.t(), unique=lambda t: t.get("name"))),
    "outputs": Field(array(IO.t(), unique=lambda t: t.get("name"))),
    "labels": Field(array(string(), unique=lambda x: x), doc="classification: one per logit"),
    "max_length": Field(integer(1, MAX_LENGTH), doc="tokens the tokenizer truncates to"),
    "quantization": Field(Obj({"scheme": Field(string())}, name='{"scheme": ..., ...}').t()),
    "base_params": Field(integer(0, 1 << 53)),
    "backends": Field(mapping(BACKEND), doc="backend name -> entry; members must be bundle members"),
    "members": Field(mapping(string(pattern=_SHA256, doc="sha256 (64 hex digits)")), required=False,
                     doc="every member file -> its sha256"),
    "memory": Field(switch(lambda v: mapping(T("", lambda *a: None)) if v == {} else MEMORY_CARD.t(),
                           "{} or the memory card"), required=False,
                    doc="the memory card, or {} (older bundles: no prediction)"),
}, name="manifest")


def validate(data: Any) -> None:
    """ManifestError naming the first field of ``data`` (parsed manifest.json) that breaks the
    schema or its cross-field rules."""
    try:
        MANIFEST.t().check(data, "manifest")
        _cross_checks(data)
    except _Bad as b:
        got = b.got if isinstance(b.got, str) else repr(b.got)
        raise ManifestError(f"manifest.json has a malformed field `{b.path[len('manifest.'):] or 'manifest'}`: it must "
                            f"be {b.expected}, got {got[:120]}; the manifest was edited or corrupted: re-export the "
                            "bundle") from None


def _cross_checks(d: dict) -> None:
    """Rules that span fields: the task's loss, one label per logit, backend members listed."""
    if TASK_LOSS[d["task"]] != d["loss"]:
        _fail("manifest.loss", f'"{TASK_LOSS[d["task"]]}" (the loss of task "{d["task"]}")', d["loss"])
    if d["task"] == "classification":
        if not d["labels"]:
            _fail("manifest.labels", "at least one label for a classification bundle", d["labels"])
        width = d["outputs"][0]["shape"][-1] if d["outputs"] and d["outputs"][0]["shape"] else None
        if isinstance(width, int) and width != len(d["labels"]):
            _fail("manifest.labels", f"{width} labels (the logits' width)", d["labels"])
    # Backend members against the member list: edgepeft.manifest, once entries are parsed.


def describe() -> str:
    """The schema as a markdown table (docs/bundle-format.md shows this)."""
    rows = ["| field | required | type | notes |", "|---|---|---|---|"]
    for k, f in MANIFEST.fields.items():
        rows.append(f"| `{k}` | {'yes' if f.required else 'no'} | {f.type.doc} | {f.doc} |")
    for obj in (TENSOR, IO, MEMORY_CARD, LEAN_CARD):
        rows.append("")
        rows.append(f"`{obj.name}`: " + "; ".join(
            f"`{k}`{'' if f.required else ' (optional)'}: {f.type.doc}" + (f" ({f.doc})" if f.doc else "")
            for k, f in obj.fields.items()))
    return "\n".join(rows)


if __name__ == "__main__":  # `python -m edgepeft.manifest_schema`: the table docs/bundle-format.md shows
    print(describe())
