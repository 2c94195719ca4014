"""What every PEFT method spec shares: frozen, validated at construction, JSON round-trip."""
from __future__ import annotations

import dataclasses
import re
from typing import Any, ClassVar

from edgepeft.errors import SpecError


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """Base of the per-method specs. Subclasses set ``method`` (the registry key)."""

    method: ClassVar[str] = ""

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d = {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}
        return {"method": self.method, **d}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MethodSpec":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known - {"method"}
        if unknown:
            raise SpecError(f"{cls.__name__}: unknown fields {sorted(unknown)}; known: {sorted(known)}")
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k != "method"}
        return cls(**kwargs)


def as_name_tuple(field: str, value: Any) -> tuple[str, ...]:
    """Normalise a str-or-sequence option to a tuple of non-empty names."""
    if isinstance(value, str):
        value = (value,)
    try:
        names = tuple(value)
    except TypeError:
        raise SpecError(f"`{field}` must be a name or a list of names, got {value!r}") from None
    for n in names:
        if not isinstance(n, str) or not n:
            raise SpecError(f"`{field}` must hold non-empty strings, got {n!r}")
    return names


def check_int(field: str, value, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise SpecError(f"`{field}` must be an integer >= {minimum}, got {value!r}")


def check_seed(value) -> None:
    check_int("init_seed", value, 0)


def check_choice(field: str, value, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise SpecError(f"`{field}` must be one of {list(choices)}, got {value!r}")


def check_pattern(field: str, pattern: str | None) -> None:
    if pattern is None:
        return
    if not isinstance(pattern, str):
        raise SpecError(f"`{field}` must be a string (an anchored regex) or None, got {pattern!r}")
    if not (pattern.startswith("^") and pattern.endswith("$")):
        raise SpecError(f"`{field}` must be an anchored regex (start with ^, end with $), got {pattern!r}")
    try:
        re.compile(pattern)
    except re.error as e:
        raise SpecError(f"`{field}` is not a valid regex: {e}") from None


def name_matches(module_name: str, names: tuple[str, ...], pattern: str | None) -> bool:
    """PEFT's rule, by whole dotted components (never substrings): a declared name matches a
    module whose full name equals it or ends with ``.<name>``; a pattern must match fully."""
    if pattern is not None and re.fullmatch(pattern, module_name):
        return True
    return any(module_name == n or module_name.endswith("." + n) for n in names)
