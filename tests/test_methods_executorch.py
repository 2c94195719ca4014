"""The methods table's ExecuTorch column: the same checks as test_methods.py (parity with eager
PyTorch at the initial and the trained adapter, a falling loss, save/swap/reload exact), on
bundles holding only the ExecuTorch programs.

ExecuTorch's export costs 40-100 s per case, so `make test` runs one case per model and the
method families whose graphs differ most (LoRA, prefix, BitFit); EDGEPEFT_FULL_METHODS=1 runs
the whole column (every case passed when it was added: see the issue note)."""
from __future__ import annotations

import os

import pytest

from test_methods import EXECUTORCH, exported  # noqa: F401 - the fixture is used by name
from test_methods import test_method_on_model as _check_case

DEFAULT = {("encoder", "lora"), ("encoder", "prefix"), ("encoder", "bitfit"), ("decoder", "lora"), ("cnn", "lora")}
FULL = os.environ.get("EDGEPEFT_FULL_METHODS") == "1"
assert DEFAULT <= EXECUTORCH
CASES = [pytest.param(m, k, "executorch", id=f"{m}-{k}-executorch", marks=[pytest.mark.slow])
         for m, k in sorted(EXECUTORCH if FULL else DEFAULT)]


@pytest.mark.parametrize("model, method, backend", CASES)
def test_method_on_model_executorch(exported, model, method, backend):  # noqa: F811
    _check_case(exported, model, method, backend)
