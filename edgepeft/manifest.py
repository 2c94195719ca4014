"""The bundle manifest: what a device needs to know about a bundle without opening a graph."""
from __future__ import annotations

import dataclasses
import json
import warnings
from typing import Any

from edgepeft import names
from edgepeft.errors import ManifestError
from edgepeft.manifest_schema import validate
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
class BackendEntry:
    """One backend's part of the manifest: its bundle members by role (``members["plan"]``)
    and its settings (``settings["batch_size"]`` of the ExecuTorch programs)."""

    members: dict[str, str]
    settings: dict[str, str | int] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        members, settings = dict(self.members), dict(self.settings)
        if not all(isinstance(k, str) and isinstance(v, str) and v for k, v in members.items()):
            raise ManifestError(f"a backend entry's members must map roles to bundle member names, got {members!r}; "
                                "re-export the bundle")
        if not all(isinstance(k, str) and isinstance(v, (str, int)) and not isinstance(v, bool)
                   for k, v in settings.items()):
            raise ManifestError(f"a backend entry's settings must be strings or integers, got {settings!r}; "
                                "re-export the bundle")
        object.__setattr__(self, "members", members)
        object.__setattr__(self, "settings", settings)

    @classmethod
    def parse(cls, backend: str, value: Any) -> "BackendEntry":
        """The entry of ``backend`` from its JSON value: the typed ``{"members": {...},
        "settings": {...}}``, or the flat ``{key: "value"}`` of manifests written before it
        (and of export builders), split by the backend's record (edgepeft.backends): its
        settings keys, of their declared type, are settings; every other key is a member.
        A backend the registry knows must have every role and setting its record lists."""
        record = _record(backend)
        if isinstance(value, BackendEntry):
            entry = value
        elif not isinstance(value, dict):
            raise ManifestError(f"the manifest's {backend!r} entry must be a JSON object, got {value!r}; "
                                "re-export the bundle")
        elif isinstance(value.get("members"), dict) and set(value) <= {"members", "settings"}:
            entry = cls(value["members"], dict(value.get("settings", {})))
        else:
            types = dict(record.settings) if record is not None else {}
            entry = cls({k: v for k, v in value.items() if k not in types},
                        {k: types[k](v) for k, v in value.items() if k in types})
        missing = [] if record is None else (
            [k for k in record.members if k not in entry.members] + [k for k in record.settings if k not in entry.settings])
        if missing:
            raise ManifestError(f"the manifest's {backend!r} entry lacks {missing}; the bundle is corrupted or "
                                "truncated: re-export it")
        return entry

    def to_dict(self) -> dict[str, dict]:
        return {"members": dict(self.members), "settings": dict(self.settings)}


def _record(backend: str):
    """``backend``'s record in the registry (edgepeft.backends); None for a name it does not
    know (the inference model's entry, a newer edgepeft's backend)."""
    # The registry reaches this module through the memory model: imported when needed.
    from edgepeft.backends import REGISTRY

    return REGISTRY.get(backend)


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
    # Backend name -> its entry (flat dicts, as older manifests hold them, are read as entries).
    backends: dict[str, BackendEntry]
    members: dict[str, str] = dataclasses.field(default_factory=dict)
    # The memory card the exporter measured (see edgepeft.memory_model); {} in older bundles.
    memory: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "backends", {str(k): BackendEntry.parse(str(k), v) for k, v in self.backends.items()})
        dup = sorted({x for x in self.labels if self.labels.count(x) > 1})
        if dup:  # an exporter given labels ("a", "a") is refused before it writes a bundle
            raise ManifestError(f"labels must be unique, got duplicates {dup}: give each class one name")

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
        validate(data)  # types, ranges, known tasks and losses, the memory card (edgepeft.manifest_schema)
        return cls._build(data)

    def check_backend_members(self) -> None:
        """ManifestError unless every backend entry's members are members of the bundle (checked
        when a bundle opens: an exporter builds the manifest before it has the member list)."""
        for name, entry in self.backends.items():
            missing = sorted(set(entry.members.values()) - set(self.members))
            if missing:
                raise ManifestError(f"the manifest's {name!r} entry names files the bundle does not hold ({missing}); "
                                    "the manifest was edited or corrupted: re-export the bundle")

    @classmethod
    def _build(cls, data: dict) -> "Manifest":
        """The Manifest of schema-checked ``data``."""
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
                backends=dict(data["backends"]),
                members={str(k): str(v) for k, v in dict(data.get("members", {})).items()},
                memory=dict(data.get("memory", {})),
            )
        except ManifestError:
            raise
        except Exception as e:  # malformed field types: one clear error, never a stray TypeError
            raise ManifestError(f"manifest.json has a malformed field ({type(e).__name__}: {e}); re-export the bundle") from None
