"""Specs are validated at construction (SpecError naming the field) and round-trip through
plain dicts / JSON unchanged."""
from __future__ import annotations

import dataclasses
import json
import math

import pytest

from edgepeft.errors import EdgePeftError, SpecError
from edgepeft.memory import parse_size
from edgepeft.optim import OptimizerSpec
from edgepeft.specs import METHODS, BottleneckSpec, LoraSpec, parse_method, spec_from_dict


# -- LoraSpec validation -------------------------------------------------------------------------
BAD_LORA = [
    # (kwargs, field named in the message)
    (dict(rank=0), "`rank`"),
    (dict(rank=-1), "`rank`"),
    (dict(rank=1.5), "`rank`"),
    (dict(rank=True), "`rank`"),
    (dict(rank="8"), "`rank`"),
    (dict(alpha=0), "`alpha`"),
    (dict(alpha=-2.0), "`alpha`"),
    (dict(alpha=math.nan), "`alpha`"),
    (dict(alpha=math.inf), "`alpha`"),
    (dict(alpha="16"), "`alpha`"),
    (dict(targets=()), "`targets`"),
    (dict(targets=[]), "`targets`"),
    (dict(targets=("query", "")), "`targets`"),
    (dict(targets=("query", 3)), "`targets`"),
    (dict(targets=5), "`targets`"),
    (dict(modules_to_save=("",)), "`modules_to_save`"),
    (dict(target_pattern="query"), "`target_pattern`"),               # unanchored
    (dict(target_pattern="^.*query"), "`target_pattern`"),            # no $
    (dict(target_pattern=".*query$"), "`target_pattern`"),            # no ^
    (dict(target_pattern="^(query$"), "`target_pattern`"),            # anchored but not a regex
    (dict(target_pattern="^[$"), "`target_pattern`"),
    pytest.param(dict(target_pattern=5), "`target_pattern`"),
]


@pytest.mark.parametrize("kwargs, field", BAD_LORA, ids=repr)
def test_lora_spec_rejects_bad_values(kwargs, field):
    with pytest.raises(SpecError) as exc:
        LoraSpec(**kwargs)
    assert field in str(exc.value)
    assert isinstance(exc.value, EdgePeftError) and isinstance(exc.value, ValueError)


def test_lora_spec_bad_value_message_shows_the_value():
    with pytest.raises(SpecError, match=r"`rank` must be an integer > 0, got -1"):
        LoraSpec(rank=-1)


@pytest.mark.parametrize("kwargs, check", [
    (dict(targets="query"), lambda s: s.targets == ("query",)),                   # str -> 1-tuple
    (dict(targets=["query", "key"]), lambda s: s.targets == ("query", "key")),     # list -> tuple
    (dict(alpha=16), lambda s: s.alpha == 16.0 and isinstance(s.alpha, float)),
    (dict(rank=4, alpha=8), lambda s: s.scaling == 2.0),
    (dict(targets=(), target_pattern=r"^encoder\.layer\.0\..*\.query$"), lambda s: s.targets == ()),
    (dict(modules_to_save="classifier"), lambda s: s.modules_to_save == ("classifier",)),
])
def test_lora_spec_normalises_good_values(kwargs, check):
    assert check(LoraSpec(**kwargs))


def test_lora_spec_is_frozen():
    s = LoraSpec()
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.rank = 2  # type: ignore[misc]


# -- round trip -----------------------------------------------------------------------------------
ROUND_TRIP = [
    LoraSpec(),
    LoraSpec(rank=4, alpha=8.0, targets=("query", "value"), modules_to_save=("classifier",), init_seed=7),
    LoraSpec(rank=2, targets=(), target_pattern=r"^encoder\.layer\.[01]\.attention\.self\.(query|key)$"),
]


@pytest.mark.parametrize("spec", ROUND_TRIP, ids=lambda s: f"r{s.rank}-{s.targets}-{s.target_pattern}")
def test_spec_dict_and_json_round_trip(spec):
    d = spec.to_dict()
    assert d["method"] == "lora"
    assert all(not isinstance(v, tuple) for v in d.values())  # JSON-friendly: lists, not tuples
    assert LoraSpec.from_dict(d) == spec
    again = spec_from_dict(json.loads(json.dumps(d)))
    assert again == spec and type(again) is LoraSpec
    assert again.to_dict() == d


def test_from_dict_rejects_unknown_field():
    d = LoraSpec().to_dict() | {"rnak": 4}
    with pytest.raises(SpecError, match="rnak"):
        LoraSpec.from_dict(d)


def test_from_dict_validates_values():
    with pytest.raises(SpecError, match="`rank`"):
        spec_from_dict(LoraSpec().to_dict() | {"rank": 0})


@pytest.mark.parametrize("data", [{"method": "ia3", "rank": 4}, {"rank": 4}, {"method": None}, "lora", None])
def test_spec_from_dict_unknown_method(data):
    with pytest.raises(SpecError) as exc:
        spec_from_dict(data)
    msg = str(exc.value)
    assert "unknown PEFT method" in msg
    assert all(name in msg for name in METHODS)  # says what is supported


# -- the bottleneck method and its former name "adapter" ----------------------------------------
def test_bottleneck_spec_is_the_bottleneck_method():
    assert BottleneckSpec.method == "bottleneck" and METHODS["bottleneck"] is BottleneckSpec
    assert "adapter" not in METHODS  # "adapter" means a user's trained tensors, not a method
    assert BottleneckSpec(size=8).to_dict()["method"] == "bottleneck"


@pytest.mark.parametrize("name", ["bottleneck", "adapter"])
def test_parse_method_takes_bottleneck_and_its_former_name(name):
    spec = parse_method(f"{name}:kind=pfeiffer,size=32,activation=gelu")
    assert spec == BottleneckSpec(kind="pfeiffer", size=32, activation="gelu")


def test_spec_dicts_written_with_the_former_name_still_load():
    old = BottleneckSpec(kind="parallel", size=4).to_dict() | {"method": "adapter"}
    assert spec_from_dict(old) == BottleneckSpec(kind="parallel", size=4)
    assert spec_from_dict(json.loads(json.dumps(old))).to_dict()["method"] == "bottleneck"


# -- other user-facing options --------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, field", [
    (dict(name="adam"), "`name`"),
    (dict(lr=0), "`lr`"),
    (dict(lr=-1e-3), "`lr`"),
    (dict(lr=math.nan), "`lr`"),
    (dict(lr=math.inf), "`lr`"),
    (dict(eps=0), "`eps`"),
    (dict(betas=(0.9,)), "`betas`"),
    (dict(betas=(0.9, 1.0)), "`betas`"),
    (dict(betas=(-0.1, 0.999)), "`betas`"),
    (dict(weight_decay=-0.1), "`weight_decay`"),
    (dict(momentum=-0.5), "`momentum`"),
    (dict(max_grad_norm=0), "`max_grad_norm`"),
])
def test_optimizer_spec_rejects_bad_values(kwargs, field):
    with pytest.raises(SpecError) as exc:
        OptimizerSpec(**kwargs)
    assert field in str(exc.value)


@pytest.mark.parametrize("value, expected", [
    (None, None), (1024, 1024), ("1KB", 1024), ("1kib", 1024), ("512MB", 512 << 20), ("1.5GB", 3 << 29),
    (" 2 M ", 2 << 20), ("300", 300),
])
def test_parse_size(value, expected):
    assert parse_size(value) == expected


@pytest.mark.parametrize("value", ["abc", "12 parsecs", "", "-1MB", "0", 0, -5, "0.1B", True, "1e9"])
def test_parse_size_rejects(value):
    with pytest.raises(SpecError, match="memory|size"):
        parse_size(value)
