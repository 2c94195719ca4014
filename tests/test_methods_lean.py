"""The methods table's lean column: block-wise graphs (exporters/lean.py, runtime/backends/lean.py)
for every PEFT method family, on bundles that also carry today's graph (ort-training), checked:
- loss, every gradient and the logits against eager PyTorch on the same weights and batch, and
  loss and gradients against today's graph (1e-5);
- 20-step training curves on lean and on today's graph agree (1e-4 relative) and fall;
- save -> swap -> swap back reproduces the loss bit for bit, and a reopened session too.
Models without lean parts (the CNN, the MLP) are refused with an error that says what to do.

Lean exports take ~20 s per case: `make test` runs one case per method family on the encoder and
LoRA, prefix and prompt tuning on the decoder; EDGEPEFT_FULL_METHODS=1 runs the whole column."""
from __future__ import annotations

import os

import numpy as np
import pytest

from test_methods import MODELS, _ce, _load_into_reference, _reference, assert_step_matches_eager, case
from edgepeft.runtime import OptimizerSpec, Session

FULL_SET = ({("encoder", k) for k in ("lora", "rslora", "lora-fa", "prompt-random", "prompt-text", "prefix", "bitfit",
                                      "bitfit-all", "houlsby", "pfeiffer", "parallel", "selective-last-layer",
                                      "lora+bitfit", "prompt+lora", "bottleneck+lora")}
            | {("decoder", k) for k in ("lora", "rslora", "lora-fa", "prompt-random", "prefix", "parallel",
                                        "selective-last-layer", "prompt+lora")})
DEFAULT = ({("encoder", k) for k in ("lora", "prompt-random", "prefix", "bitfit", "houlsby", "selective-last-layer")}
           | {("decoder", k) for k in ("lora", "prefix", "prompt-random")})
assert DEFAULT <= FULL_SET
FULL = os.environ.get("EDGEPEFT_FULL_METHODS") == "1"
CASES = [pytest.param(m, k, id=f"{m}-{k}-lean", marks=[pytest.mark.slow]) for m, k in sorted(FULL_SET if FULL else DEFAULT)]
STEPS = 20


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from edgepeft.exporters import export_bundle, load_model

    def get(model: str, method: str):
        d = tmp_path_factory.mktemp(f"lean-{model}-{method}")
        res = export_bundle(load_model(MODELS[model].factory), methods=case(model, method)[0], quant="int8",
                            out=d / "b.edgepeft", backends=("lean", "ort-training"))
        return res, d

    return get


def _open(res, d, lr, backend, adapter="a"):
    return Session.open(res.path, adapter=adapter, store=d / backend, cache_dir=d / "cache", threads=1,
                        optimizer=OptimizerSpec(lr=lr), backend=backend)


@pytest.mark.parametrize("model, method", CASES)
def test_lean_method_on_model(exported, model, method):
    res, d = exported(model, method)
    _, lr, min_drop = case(model, method)
    lean, today = _open(res, d, lr, "lean"), _open(res, d, lr, "ort-training")
    assert lean.backend.name == "lean" and today.backend.name == "ort-training"
    batch = MODELS[model].batch(lean)

    assert_trains_like(res, lean, today, batch, min_drop)

    trained = lean.evaluate([batch]).loss
    lean.save_adapter()
    lean.swap_adapter("other", create=True)
    assert lean.evaluate([batch]).loss != trained
    lean.swap_adapter("a")
    assert lean.evaluate([batch]).loss == trained
    lean.close()
    today.close()
    again = _open(res, d, lr, "lean")
    assert again.evaluate([batch]).loss == trained


def assert_trains_like(res, s, other, batch, min_drop: float, curve_rtol: float = 1e-4) -> None:
    """``s``'s step matches eager PyTorch, and ``other`` (another backend on the same bundle) in
    loss and gradients (1e-5); their 20-step curves agree (``curve_rtol``) and fall."""
    loss, grads = assert_step_matches_eager(res, s, batch)
    o_loss, o_grads = other.backend.forward_backward(batch)
    assert loss == pytest.approx(o_loss, abs=1e-5)
    for n, g in grads.items():
        np.testing.assert_allclose(g, o_grads[n], atol=1e-5, rtol=1e-3, err_msg=n)

    curve = [s.train_step(batch) for _ in range(STEPS)]
    o_curve = [other.train_step(batch) for _ in range(STEPS)]
    np.testing.assert_allclose(curve, o_curve, rtol=curve_rtol, atol=1e-5)
    assert curve[-1] < (1 - min_drop) * curve[0], curve


@pytest.mark.parametrize("model", ["cnn", "mlp"])
def test_models_without_lean_parts_are_refused(tmp_path, model):
    from edgepeft.errors import ExportError
    from edgepeft.exporters import export_bundle, load_model

    with pytest.raises(ExportError, match="declares no lean parts"):
        export_bundle(load_model(MODELS[model].factory), methods=case(model, "lora")[0], out=tmp_path / "b.edgepeft",
                      backends=("lean",))
    assert not (tmp_path / "b.edgepeft").exists()


def test_lean_evaluation_never_builds_full_logits(exported):
    """A causal LM's evaluate goes through the chunked head: same loss and accuracy as the
    full logits would give, and no (positions x vocab) array is returned or kept."""
    from edgepeft.runtime import lean_head

    res, d = exported("decoder", "lora")
    s = _open(res, d, 1e-2, "lean")
    batch = MODELS["decoder"].batch(s)
    logits = s.infer(batch.feeds)
    from edgepeft.runtime.losses import cross_entropy

    valid = batch.labels != -100
    want_acc = float(((logits.argmax(-1) == batch.labels) & valid).sum() / valid.sum())
    old = lean_head.CHUNK
    lean_head.CHUNK = 7  # many ragged chunks: the online softmax must not depend on the split
    try:
        r = s.evaluate([batch])
        loss, grad = lean_head.loss_and_grad(s.backend._head, s.backend._hidden(batch.feeds), batch.labels)
    finally:
        lean_head.CHUNK = old
    assert r.loss == pytest.approx(cross_entropy(logits, batch.labels), abs=1e-5)
    assert r.accuracy == pytest.approx(want_acc)
    assert loss == pytest.approx(r.loss, abs=1e-5) and grad.shape == s.backend._hidden(batch.feeds).shape


@pytest.mark.slow
def test_lean_gemma3_groups_blocks_by_attention_type(tmp_path):
    """Gemma 3's sliding and full-attention layers have the same parameters but not the same
    computation: they get a graph each (lean_key), and the step matches eager on a sequence
    longer than the window."""
    import json

    from edgepeft.data import Batch
    from edgepeft.exporters import export_bundle
    from edgepeft.exporters.zoo.gemma3 import tiny_gemma3
    from edgepeft.specs import LoraSpec

    res = export_bundle(tiny_gemma3(), methods=[LoraSpec(rank=4, targets=("q_proj", "v_proj"))],
                        out=tmp_path / "g.edgepeft", backends=("lean",))
    s = _open(res, tmp_path, 1e-2, "lean")
    plan = json.loads(s.bundle.path("lean/plan.json").read_text())
    assert len(plan["graphs"]) == 2 and [b["graph"] for b in plan["blocks"]] == ["block0", "block0", "block1"]
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 250, size=(2, 12))
    mask = np.ones_like(ids)
    labels = np.full(ids.shape, -100)
    labels[:, :-1] = ids[:, 1:]
    batch = Batch({"input_ids": ids, "attention_mask": mask}, labels)
    assert_step_matches_eager(res, s, batch, {n: v + 0.01 for n, v in s.parameters().items()})


@pytest.mark.slow
def test_lean_smollm2_parity_with_eager(tmp_path):
    """The real model: SmolLM2-135M with LoRA r8 on q/v over the int8 base, one lean step's loss
    and gradients against eager PyTorch on the same weights and batch (1e-4 relative), and the
    logits of the chunked head."""
    assert_smollm2_step_matches_eager(tmp_path, "lean", rows=2)


def assert_smollm2_step_matches_eager(tmp_path, backend: str, rows: int, **export_options) -> None:
    """SmolLM2-135M (max_length 32), LoRA r8 q/v, int8 base, adapter moved off its initial
    values: loss, gradients (1e-4 of each tensor's scale), logits and evaluate against eager."""
    from edgepeft.data import Batch
    from edgepeft.exporters import export_bundle, load_model
    from edgepeft.specs import LoraSpec

    res = export_bundle(load_model("smollm2-135m", max_length=32), methods=[LoraSpec(rank=8, alpha=16,
                        targets=("q_proj", "v_proj"))], out=tmp_path / "lm.edgepeft", backends=(backend,),
                        **export_options)
    s = _open(res, tmp_path, 1e-3, backend)
    rng = np.random.default_rng(0)
    start = {n: v + rng.normal(0, 0.02, v.shape).astype(np.float32) for n, v in s.parameters().items()}
    s.backend.load_parameters(start)
    _load_into_reference(res, start)
    ids = rng.integers(4, 40000, size=(rows, 24))
    mask = np.ones_like(ids)
    mask[1, 18:] = 0
    labels = np.full(ids.shape, -100)
    labels[:, :-1] = np.where(mask[:, 1:] > 0, ids[:, 1:], -100)
    batch = Batch({"input_ids": ids, "attention_mask": mask}, labels)
    ref_loss, ref_logits, ref_grads = _reference(res, batch, _ce)
    loss, grads = s.backend.forward_backward(batch)
    assert loss == pytest.approx(ref_loss, rel=1e-4)
    for n, g in grads.items():
        scale = float(np.abs(ref_grads[n]).max())
        assert float(np.abs(g - ref_grads[n]).max()) <= 1e-4 * scale + 1e-7, n
    np.testing.assert_allclose(s.infer(batch.feeds), ref_logits, atol=2e-4 * float(np.abs(ref_logits).max()))
    r = s.evaluate([batch])
    assert r.loss == pytest.approx(ref_loss, rel=1e-4)
