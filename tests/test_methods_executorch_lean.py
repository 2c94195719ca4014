"""The methods table's executorch-lean column: the lean backend's cut of a model into parts,
as ExecuTorch programs lowered to XNNPACK and run by the native runner without torch
(exporters/lean_executorch.py, runtime/backends/executorch_lean.py), at a fixed batch of 4 (the
test batches have 6 rows: one full chunk and one padded). Checked against eager PyTorch (1e-5)
and against the lean backend's ONNX graphs on the same bundle (loss, gradients, a 20-step
curve), with save -> swap -> swap back and a reopened session evaluating bit for bit; and the
real model: SmolLM2-135M's step against eager PyTorch.

ExecuTorch lowering adds ~30 s per case: make test runs one encoder and one decoder case;
EDGEPEFT_FULL_METHODS=1 runs the lean column's whole set (prompt tuning on the decoder among
them: its programs carry the shape asserts ExecuTorch's verifier refuses, dropped at lowering)."""
from __future__ import annotations

import numpy as np
import pytest

from test_methods import MODELS, case
from test_methods_lean import FULL, FULL_SET, _open, assert_smollm2_step_matches_eager, assert_trains_like

DEFAULT = {("encoder", "prefix"), ("decoder", "lora")}
CASES = [pytest.param(m, k, id=f"{m}-{k}-executorch-lean", marks=[pytest.mark.slow])
         for m, k in sorted(FULL_SET if FULL else DEFAULT)]
BATCH = 4


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from edgepeft.exporters import export_bundle, load_model

    done: dict[tuple[str, str], tuple] = {}  # the crafted-member and device tests reuse a case's bundle

    def get(model: str, method: str):
        if (model, method) not in done:
            d = tmp_path_factory.mktemp(f"et-lean-{model}-{method}")
            res = export_bundle(load_model(MODELS[model].factory), methods=case(model, method)[0], quant="int8",
                                out=d / "b.edgepeft", backends=("executorch-lean", "lean"), executorch_batch_size=BATCH)
            done[model, method] = res, d
        return done[model, method]

    return get


@pytest.mark.parametrize("model, method", CASES)
def test_executorch_lean_method_on_model(exported, model, method):
    res, d = exported(model, method)
    _, lr, min_drop = case(model, method)
    et, lean = _open(res, d, lr, "executorch-lean"), _open(res, d, lr, "lean")
    assert et.backend.name == "executorch-lean" and et.backend.batch_size == BATCH
    batch = MODELS[model].batch(et)
    assert len(batch.labels) > BATCH  # a full chunk and a padded one

    # Two engines' float32 rounding drifts apart over 20 updates: training a whole decoder layer
    # (selective-last-layer) ends 1.1e-4 apart; every step-0 check above holds at 1e-5.
    assert_trains_like(res, et, lean, batch, min_drop, curve_rtol=3e-4)

    trained = et.evaluate([batch])
    lean.backend.load_parameters(et.parameters())  # the same trained adapter on both engines
    assert trained.loss == pytest.approx(lean.evaluate([batch]).loss, abs=1e-5)
    et.save_adapter()
    et.swap_adapter("other", create=True)
    assert et.evaluate([batch]).loss != trained.loss
    et.swap_adapter("a")
    assert et.evaluate([batch]) == trained
    et.close()
    lean.close()
    again = _open(res, d, lr, "executorch-lean")
    assert again.evaluate([batch]) == trained


DEVICE = """
import json, sys
import numpy as np
from edgepeft.data import Batch
from edgepeft.runtime import OptimizerSpec, Session
path, store, cache = sys.argv[1:4]
s = Session.open(path, adapter="dev", store=store, cache_dir=cache, backend="executorch-lean", threads=1,
                 optimizer=OptimizerSpec(lr=5e-2))
ids = np.random.default_rng(0).integers(3, 250, size=(5, 12))
labels = np.full(ids.shape, -100)
labels[:, :-1] = ids[:, 1:]
b = Batch({"input_ids": ids, "attention_mask": np.ones_like(ids)}, labels)
losses = [s.train_step(b) for _ in range(8)]
s.save_adapter()
trained = s.evaluate([b]).loss
s.swap_adapter("other", create=True)
other = s.evaluate([b]).loss
s.swap_adapter("dev")
print(json.dumps({"losses": losses, "trained": trained, "other": other, "back": s.evaluate([b]).loss,
                  "logits": list(s.infer(b.feeds).shape), "torch": "torch" in sys.modules,
                  "executorch": "executorch" in sys.modules, "onnxruntime": "onnxruntime" in sys.modules}))
"""


def test_a_device_process_trains_swaps_saves_and_infers_without_torch(exported):
    """The device loop on executorch-lean in a fresh process: neither torch, nor the executorch
    Python package (its bindings link libtorch), nor onnxruntime is imported."""
    import json
    import subprocess
    import sys

    res, d = exported("decoder", "lora")
    done = subprocess.run([sys.executable, "-c", DEVICE, str(res.path), str(d / "device"), str(d / "cache")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["torch"] is False and out["executorch"] is False and out["onnxruntime"] is False
    assert out["losses"][-1] < out["losses"][0]
    assert out["back"] == out["trained"] != out["other"]
    assert out["logits"] == [5, 12, 259]


def test_int4_is_refused_with_what_to_do(tmp_path):
    from edgepeft.errors import SpecError
    from edgepeft.exporters import export_bundle, load_model

    with pytest.raises(SpecError, match="'int4' is available on the lean backend only.*quant='int8'"):
        export_bundle(load_model(MODELS["decoder"].factory), methods=case("decoder", "lora")[0], quant="int4",
                      out=tmp_path / "b.edgepeft", backends=("executorch-lean",))
    assert not (tmp_path / "b.edgepeft").exists()


@pytest.mark.slow
def test_executorch_lean_smollm2_parity_with_eager(tmp_path):
    """SmolLM2-135M, LoRA r8 on q/v over the int8 base, programs built for 2 rows and a batch of
    3 (a full chunk and a padded one): one step's loss and gradients against eager PyTorch on the
    same weights and batch (1e-4 relative), the logits of the chunked head, evaluate."""
    assert_smollm2_step_matches_eager(tmp_path, "executorch-lean", rows=3, executorch_batch_size=2)


def _recrafted(path, tmp_path, edit):
    """The bundle with members rewritten by ``edit(contents)`` and their sha256 updated in the
    manifest (crafted members that pass the bundle's integrity checks)."""
    import io
    import json
    import zipfile

    from edgepeft import names
    from edgepeft.fsutil import sha256_bytes

    with zipfile.ZipFile(path) as z:
        infos = z.infolist()
        contents = {i.filename: z.read(i) for i in infos}
    before = dict(contents)
    edit(contents)
    manifest = json.loads(contents[names.MANIFEST])
    for member, data in contents.items():
        if member != names.MANIFEST and data != before[member]:
            manifest["members"][member] = sha256_bytes(data)
    contents[names.MANIFEST] = json.dumps(manifest).encode()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for i in infos:
            z.writestr(i, contents[i.filename])
    out = tmp_path / "crafted.edgepeft"
    out.write_bytes(buf.getvalue())
    return out


def _plan_edit(fn):
    def edit(contents):
        import json

        plan = json.loads(contents["lean/executorch/plan.json"])
        fn(plan)
        contents["lean/executorch/plan.json"] = json.dumps(plan).encode()
    return edit


def _drop_first_input(plan):
    sig = plan["signatures"]["lean/executorch/block0_vjp.pte"]
    sig["inputs"] = sig["inputs"][1:]


CRAFTED = {
    "program-garbage": (lambda c: c.update({"lean/executorch/block0.pte": b"\x00" * 64}), "BundleError",
                        "lean/executorch/block0.pte"),
    "program-of-another-part": (lambda c: c.update({"lean/executorch/block0.pte": c["lean/executorch/post.pte"]}),
                                "BundleError", "takes"),
    "signature-short": (_plan_edit(_drop_first_input), "BundleError", "takes"),
    "signatures-missing": (_plan_edit(lambda p: p.pop("signatures")), "BundleError", "re-export"),
    "unknown-block-program": (_plan_edit(lambda p: p["blocks"][0].update(graph="nope")), "BackendError", "nope"),
    "control-untouched": (_plan_edit(lambda p: None), None, None),  # a re-serialized, unchanged plan trains
}


@pytest.mark.parametrize("case_", sorted(CRAFTED))
def test_crafted_members_end_in_the_error_family(exported, tmp_path, case_):
    """Members crafted with valid hashes (programs, the plan's signatures and blocks): a session
    either trains and infers or fails with an EdgePeftError saying what to do."""
    from edgepeft.data import Batch
    from edgepeft.errors import EdgePeftError

    res, _ = exported("decoder", "lora")
    edit, error, words = CRAFTED[case_]
    path = _recrafted(res.path, tmp_path, edit)
    ids = np.random.default_rng(0).integers(3, 250, size=(5, 12))
    labels = np.full(ids.shape, -100)
    labels[:, :-1] = ids[:, 1:]
    b = Batch({"input_ids": ids, "attention_mask": np.ones_like(ids)}, labels)
    if error is None:
        s = _open_path(path, tmp_path)
        assert np.isfinite(s.train_step(b)) and s.infer(b.feeds).shape == (5, 12, 259)
        return
    with pytest.raises(EdgePeftError) as e:
        s = _open_path(path, tmp_path)
        s.train_step(b)
        s.infer(b.feeds)
    assert type(e.value).__name__ == error and words in str(e.value), str(e.value)


def _open_path(path, d):
    from edgepeft.runtime import OptimizerSpec, Session

    return Session.open(path, adapter="a", store=d / "store", cache_dir=d / "cache", threads=1,
                        optimizer=OptimizerSpec(lr=1e-2), backend="executorch-lean")
