"""The bundle manifest: what a device needs to know about a bundle without opening a graph."""
from __future__ import annotations

import dataclasses
import json
import warnings
from typing import Any

from edgepeft import names
from edgepeft.errors import ManifestError
from edgepeft.specs import MethodSpec, canonical_method, spec_from_dict


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """A trainable tensor: its graph name, its key in a PEFT adapter file, shape and method."""

    name: str
    peft_key: str
    shape: tuple[int, ...]
    method: str
    dtype: str = "float32"

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclasses.dataclass(frozen=True)
class IOInfo:
    """A graph input or output; symbolic dimensions are strings (``"batch"``, ``"seq"``)."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]


@dataclasses.dataclass(frozen=True)
class Manifest:
    schema_version: int
    sdk_version: str
    model_name: str
    model_sha256: str
    task: str
    loss: str
    methods: tuple[MethodSpec, ...]
    trainable: tuple[TensorInfo, ...]
    inputs: tuple[IOInfo, ...]
    outputs: tuple[IOInfo, ...]
    labels: tuple[str, ...]
    max_length: int
    quantization: dict[str, Any]
    base_params: int
    backends: dict[str, dict[str, str]]
    members: dict[str, str] = dataclasses.field(default_factory=dict)
    # The memory card the exporter measured (see edgepeft.memory_model); {} in older bundles.
    memory: dict[str, Any] = dataclasses.field(default_factory=dict)

    # -- derived -----------------------------------------------------------------------------
    @property
    def trainable_params(self) -> int:
        return sum(t.numel for t in self.trainable)

    @property
    def trainable_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.trainable)

    def tensor(self, name: str) -> TensorInfo:
        for t in self.trainable:
            if t.name == name:
                return t
        raise KeyError(name)

    def with_members(self, members: dict[str, str]) -> "Manifest":
        return dataclasses.replace(self, members=dict(sorted(members.items())))

    # -- JSON --------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["methods"] = [m.to_dict() for m in self.methods]
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)

    @classmethod
    def from_json(cls, text: str | bytes) -> "Manifest":
        try:
            data = json.loads(text)
        except (ValueError, UnicodeDecodeError) as e:
            raise ManifestError(f"manifest.json is not valid JSON ({e}); the bundle is corrupted: re-export it") from None
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: Any) -> "Manifest":
        if not isinstance(data, dict):
            raise ManifestError("manifest.json must hold a JSON object; the bundle is corrupted: re-export it")
        version = data.get("schema_version")
        if version != names.SCHEMA_VERSION:
            raise ManifestError(
                f"bundle manifest schema version {version!r} is not supported by this edgepeft "
                f"(reads version {names.SCHEMA_VERSION}): re-export the bundle with this edgepeft, "
                "or install the edgepeft that wrote it"
            )
        fields = {f.name for f in dataclasses.fields(cls)}
        extra = sorted(set(data) - fields)
        if extra:
            warnings.warn(f"manifest keys unknown to this edgepeft were ignored: {extra}", stacklevel=2)
        missing = sorted(f.name for f in dataclasses.fields(cls)
                         if f.name not in data and f.default is dataclasses.MISSING
                         and f.default_factory is dataclasses.MISSING)
        if missing:
            raise ManifestError(f"manifest.json lacks {missing}; the bundle is corrupted or truncated: re-export it")
        try:
            return cls(
                schema_version=int(data["schema_version"]),
                sdk_version=str(data["sdk_version"]),
                model_name=str(data["model_name"]),
                model_sha256=str(data["model_sha256"]),
                task=str(data["task"]),
                loss=str(data["loss"]),
                methods=tuple(spec_from_dict(m) for m in data["methods"]),
                trainable=tuple(
                    TensorInfo(name=str(t["name"]), peft_key=str(t["peft_key"]),
                               shape=tuple(int(s) for s in t["shape"]),
                               # Older bundles name bottleneck adapters' method "adapter".
                               method=canonical_method(str(t["method"])),
                               dtype=str(t.get("dtype", "float32")))
                    for t in data["trainable"]
                ),
                inputs=tuple(IOInfo(str(i["name"]), str(i["dtype"]), tuple(i["shape"])) for i in data["inputs"]),
                outputs=tuple(IOInfo(str(o["name"]), str(o["dtype"]), tuple(o["shape"])) for o in data["outputs"]),
                labels=tuple(str(x) for x in data["labels"]),
                max_length=int(data["max_length"]),
                quantization=dict(data["quantization"]),
                base_params=int(data["base_params"]),
                backends={str(k): dict(v) for k, v in dict(data["backends"]).items()},
                members={str(k): str(v) for k, v in dict(data.get("members", {})).items()},
                memory=dict(data.get("memory", {})),
            )
        except ManifestError:
            raise
        except Exception as e:  # malformed field types: one clear error, never a stray TypeError
            raise ManifestError(f"manifest.json has a malformed field ({type(e).__name__}: {e}); re-export the bundle") from None
