"""The portable backend: training on any onnxruntime through the bundle's standard-ONNX
gradient graph. Curves match the ort-training backend, adapters move between the two, the
graph uses only ai.onnx ops, and a full cycle runs in a fresh virtualenv with plain
onnxruntime and neither torch nor onnxruntime-training."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from edgepeft import names
from edgepeft.bundle import open_bundle
from edgepeft.data import Example
from edgepeft.runtime import OptimizerSpec, Session
from edgepeft.specs import LoraSpec, PromptSpec

TEXTS = [("a wonderful, lovely film", "pos"), ("dreadful and boring", "neg"), ("great story", "pos"),
         ("awful plot, bad acting", "neg"), ("i loved it", "pos"), ("a waste of time", "neg")]
EXAMPLES = [Example(t, lab) for t, lab in TEXTS]


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    from edgepeft.exporters import export_bundle, load_model

    d = tmp_path_factory.mktemp("portable")
    enc = export_bundle(load_model("tiny-encoder"), methods=[LoraSpec(rank=4, modules_to_save=("classifier",))],
                        out=d / "enc.edgepeft")
    dec = export_bundle(load_model("tiny-decoder"), methods=[PromptSpec(n_tokens=3), LoraSpec(rank=2, targets=("q_proj",))],
                        out=d / "dec.edgepeft")
    return d, enc, dec


def _session(d, res, backend, adapter="a", lr=1e-2):
    return Session.open(res.path, adapter=adapter, store=d / f"store-{backend}", cache_dir=d / "cache",
                        backend=backend, threads=1, optimizer=OptimizerSpec(lr=lr, weight_decay=0.01))


def test_gradient_graph_is_standard_onnx(bundles):
    d, enc, _ = bundles
    b = open_bundle(enc.path, d / "cache")
    m = onnx.load(str(b.path(names.PORTABLE_GRADIENT_MODEL)))
    onnx.checker.check_model(m, full_check=True)
    assert {n.domain for n in m.graph.node} <= {"", "ai.onnx"}
    assert [o.name for o in m.graph.output] == ["loss"] + [n + "/grad" for n in enc.manifest.trainable_names]
    # Frozen weights stay int8 behind DequantizeLinear / int8 row gathers.
    inits = {i.name: i for i in m.graph.initializer}
    for w in enc.manifest.quantization["tensors"]:
        assert inits[w + names.Q_SUFFIX].data_type == onnx.TensorProto.INT8
        assert w not in inits
    assert any(n.op_type == "DequantizeLinear" for n in m.graph.node)


@pytest.mark.parametrize("which", ["enc", "dec"])
def test_fifty_step_curves_match_ort_training(bundles, which):
    d, enc, dec = bundles
    res = enc if which == "enc" else dec
    curves = {}
    for backend in ("ort-training", "portable"):
        s = _session(d, res, backend, adapter=f"curve-{which}")
        batch = s.encoder.batch(EXAMPLES if which == "enc" else [Example(t) for t, _ in TEXTS])
        curves[backend] = np.array([s.train_step(batch) for _ in range(50)])
        final = s.parameters()
        curves[backend + "-params"] = final
    np.testing.assert_allclose(curves["portable"], curves["ort-training"], rtol=1e-4, atol=1e-5)
    # The random tiny decoder (frozen tied head) learns little; the encoder learns fast.
    assert curves["portable"][-1] < (0.97 if which == "dec" else 0.5) * curves["portable"][0]
    for n, v in curves["portable-params"].items():
        np.testing.assert_allclose(v, curves["ort-training-params"][n], atol=1e-4, err_msg=n)


def test_adapter_moves_between_backends(bundles):
    """10 steps on ort-training + 10 on portable (same store) == 20 steps on one backend."""
    d, enc, _ = bundles
    store = d / "shared-store"
    batch_src = EXAMPLES
    one = Session.open(enc.path, adapter="one", store=store, cache_dir=d / "cache", backend="ort-training",
                       threads=1, optimizer=OptimizerSpec(lr=1e-2))
    ref = [one.train_step(batch_src) for _ in range(20)]
    a = Session.open(enc.path, adapter="moved", store=store, cache_dir=d / "cache", backend="ort-training",
                     threads=1, optimizer=OptimizerSpec(lr=1e-2))
    first = [a.train_step(batch_src) for _ in range(10)]
    a.save_adapter()
    b = Session.open(enc.path, adapter="moved", store=store, cache_dir=d / "cache", backend="portable",
                     threads=1, optimizer=OptimizerSpec(lr=1e-2))
    assert b.steps == 10
    second = [b.train_step(batch_src) for _ in range(10)]
    np.testing.assert_allclose(first + second, ref, rtol=1e-4, atol=1e-5)
    for n, v in b.parameters().items():
        np.testing.assert_allclose(v, one.parameters()[n], atol=1e-5, err_msg=n)


def test_auto_picks_a_backend_the_bundle_has(bundles, tmp_path):
    from edgepeft.exporters import export_bundle, load_model

    d, enc, _ = bundles
    assert Session.open(enc.path, store=tmp_path / "s", cache_dir=d / "cache").backend.name == "ort-training"
    only = export_bundle(load_model("tiny-encoder"), methods=[LoraSpec(rank=2)], out=tmp_path / "p.edgepeft",
                         backends=("portable",))
    assert "ort-training" not in only.manifest.backends
    assert Session.open(only.path, store=tmp_path / "s2", cache_dir=d / "cache").backend.name == "portable"


DEVICE_SCRIPT = r"""
import json, sys, importlib.util
from edgepeft.runtime import Session, Example, OptimizerSpec
bundle, store, cache = sys.argv[1:4]
texts = json.loads(sys.argv[4])
s = Session.open(bundle, adapter="dev", store=store, cache_dir=cache, threads=1, optimizer=OptimizerSpec(lr=1e-2))
batch = s.encoder.batch([Example(t, l) for t, l in texts])
losses = [s.train_step(batch) for _ in range(5)]
s.save_adapter()
s.swap_adapter("other", create=True)
other = s.evaluate([batch]).loss
s.swap_adapter("dev")
back = s.evaluate([batch]).loss
import onnxruntime
print(json.dumps({
    "backend": s.backend.name, "losses": losses, "other": other, "back": back,
    "logits": s.infer([t for t, _ in texts]).tolist(),
    "ort_version": onnxruntime.__version__,
    "has_training_build": importlib.util.find_spec("onnxruntime.training") is not None,
    "leaked": sorted(m for m in ("torch", "onnx", "edgepeft.exporters") if m in sys.modules),
}))
"""


@pytest.mark.slow
def test_full_cycle_on_plain_onnxruntime_without_torch(bundles, tmp_path_factory):
    from device_tests.venv import build_wheel, make_device_venv, run_json

    d, enc, _ = bundles
    root = tmp_path_factory.mktemp("device")
    py = make_device_venv(root / "venv", build_wheel(root / "wheel"))
    out = run_json(py, DEVICE_SCRIPT, str(enc.path), str(root / "store"), str(root / "cache"), json.dumps(TEXTS))
    assert out["backend"] == "portable"
    assert not out["has_training_build"] and out["leaked"] == []
    assert int(out["ort_version"].split(".")[1]) >= 20, out["ort_version"]  # a maintained release
    # The same steps on the host's portable backend give the same losses and logits.
    host = Session.open(enc.path, adapter="dev", store=tmp_path_factory.mktemp("hs"), cache_dir=d / "cache",
                        backend="portable", threads=1, optimizer=OptimizerSpec(lr=1e-2))
    host_losses = [host.train_step(EXAMPLES) for _ in range(5)]
    np.testing.assert_allclose(out["losses"], host_losses, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out["logits"], host.infer([t for t, _ in TEXTS]), atol=1e-4)
    assert out["back"] == pytest.approx(host.evaluate([EXAMPLES]).loss, abs=1e-5)
    assert out["other"] != out["back"]
