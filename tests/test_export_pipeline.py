"""The export pipeline: options checked at construction, one builder per backend, the
best-effort portable backend, a plain causal LM exported by its loss (trained on the device,
loss equal to eager PyTorch's shifted cross-entropy), bundles of the former "adapter" method
name still loading, and no import cycle or private import between modules."""
from __future__ import annotations

import ast
import dataclasses
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from edgepeft import names
from edgepeft.data import Batch
from edgepeft.errors import ExportError, SpecError
from edgepeft.exporters import export_bundle, load_model
from edgepeft.exporters import targets
from edgepeft.exporters.options import ExportOptions
from edgepeft.manifest import Manifest
from edgepeft.optim import OptimizerSpec
from edgepeft.specs import BottleneckSpec, LoraSpec, SelectiveSpec

REPO = Path(__file__).resolve().parents[1]
VOCAB, DIM, SEQ = 24, 16, 10
ATOL = 1e-5


class TinyLM(nn.Module):
    """The smallest next-token model: (batch, seq) token ids -> (batch, seq, vocab) logits."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.head = nn.Linear(DIM, VOCAB)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.embed(ids)))


class TinyClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 8)
        self.classifier = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.relu(self.fc(x)))


def token_ids(batch: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, SEQ), generator=torch.Generator().manual_seed(seed))


def shifted_labels(ids: np.ndarray) -> np.ndarray:
    """Position t predicts token t+1; the last position has no label (edgepeft.data's rule)."""
    labels = np.full(ids.shape, names.IGNORE_INDEX, dtype=np.int64)
    labels[:, :-1] = ids[:, 1:]
    return labels


def eager_causal_loss(model: nn.Module, ids: torch.Tensor) -> float:
    with torch.no_grad():
        logits = model(ids)
    return F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1)).item()


# -- options -------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, field", [
    (dict(quant="int4"), "`quant`"),
    (dict(loss="mse"), "`loss`"),
    (dict(backends=("ort-training", "tflite")), "`backends`"),
    (dict(backends=()), "`backends`"),
    (dict(executorch_batch_size=0), "`executorch_batch_size`"),
    (dict(executorch_batch_size=True), "`executorch_batch_size`"),
    (dict(max_length=0), "`max_length`"),
    (dict(labels=[1, 2]), "`labels`"),
    (dict(name=""), "`name`"),
    (dict(dynamic_axes={"x": "batch"}), "`dynamic_axes`"),
    (dict(sign_key=3), "`sign_key`"),
], ids=repr)
def test_options_reject_bad_values_naming_the_field_and_value(kwargs, field):
    with pytest.raises(SpecError) as exc:
        ExportOptions(**kwargs)
    assert field in str(exc.value) and "got " in str(exc.value)


def test_options_message_says_value_and_fix():
    with pytest.raises(SpecError, match=r"`executorch_batch_size` must be a positive int, got 0: give the rows"):
        ExportOptions(executorch_batch_size=0)


def test_options_are_frozen_and_normalised():
    o = ExportOptions(labels=["a", "b"], backends=["portable"], init_adapter="x", sign_key="k.pem")
    assert o.labels == ("a", "b") and o.backends == ("portable",)
    assert o.init_adapter == Path("x") and o.sign_key == Path("k.pem")
    assert not o.best_effort and o.export_backends == ("portable",)
    assert ExportOptions().best_effort and ExportOptions().export_backends == names.DEFAULT_EXPORT_BACKENDS
    with pytest.raises(dataclasses.FrozenInstanceError):
        o.quant = "none"  # type: ignore[misc]


def test_every_export_backend_has_one_builder():
    assert set(targets.BUILDERS) == set(names.EXPORT_BACKENDS)


# -- a plain classifier, and the best-effort portable backend -----------------------------------
def test_a_failing_portable_builder_is_left_out_with_a_warning_only_by_default(tmp_path, monkeypatch):
    def fail(injected, forward, tmp):
        raise ExportError("no gradient graph for this model\nsecond line")

    monkeypatch.setitem(targets.BUILDERS, names.BACKEND_PORTABLE, fail)
    example = {"x": torch.randn(4, 6)}
    methods = [LoraSpec(rank=2, targets=("fc",), modules_to_save=("classifier",))]
    with pytest.warns(UserWarning, match="^the bundle has no portable backend: no gradient graph for this model$") as rec:
        res = export_bundle(TinyClassifier(), example, methods=methods, out=tmp_path / "a.edgepeft")
    ours = [w for w in rec if "no portable backend" in str(w.message)]
    assert len(ours) == 1 and ours[0].filename == __file__  # it points at export_bundle's caller
    assert list(res.manifest.backends) == ["onnx-inference", names.BACKEND_ORT]
    assert res.manifest.labels == ("0", "1", "2") and res.manifest.task == "classification"
    with pytest.raises(ExportError, match="no gradient graph"):
        export_bundle(TinyClassifier(), example, methods=methods, out=tmp_path / "b.edgepeft",
                      backends=(names.BACKEND_ORT, names.BACKEND_PORTABLE))


def test_a_plain_module_with_sequence_logits_is_told_to_use_causal_lm(tmp_path):
    with pytest.raises(ExportError, match="causal_lm"):
        export_bundle(TinyLM(), {"ids": token_ids(2, 0)}, methods=[LoraSpec(rank=2, targets=("head",))],
                      out=tmp_path / "x.edgepeft")
    with pytest.raises(ExportError, match=r"\(batch, seq, vocab\)"):
        export_bundle(TinyClassifier(), {"x": torch.randn(4, 6)}, methods=[LoraSpec(rank=2, targets=("fc",))],
                      out=tmp_path / "y.edgepeft", loss="causal_lm")


# -- a plain causal LM: the loss chooses the task ------------------------------------------------
@pytest.fixture(scope="module")
def causal_lm(tmp_path_factory):
    torch.manual_seed(0)
    return export_bundle(TinyLM(), {"ids": token_ids(2, 0)}, loss="causal_lm",
                         methods=[LoraSpec(rank=4, targets=("head",))],
                         out=tmp_path_factory.mktemp("causal") / "tiny-lm.edgepeft")


def test_plain_causal_lm_manifest(causal_lm):
    m = causal_lm.manifest
    assert (m.task, m.loss, m.labels) == ("causal-lm", "causal_lm", ())
    assert [(i.name, i.shape) for i in m.inputs] == [("ids", ("batch", "seq"))]
    assert m.outputs[0].shape == ("batch", "seq", VOCAB)
    assert set(m.backends) == {"onnx-inference", names.BACKEND_ORT, names.BACKEND_PORTABLE}
    assert names.TOKENIZER not in m.members  # no tokenizer needed


@pytest.mark.parametrize("backend", [names.BACKEND_ORT, names.BACKEND_PORTABLE])
def test_plain_causal_lm_trains_on_the_device_like_eager_pytorch(causal_lm, open_session, backend):
    s = open_session(causal_lm.path, backend=backend, optimizer=OptimizerSpec(lr=5e-2))
    ids = token_ids(4, 1)
    batch = Batch({"ids": ids.numpy()}, shifted_labels(ids.numpy()))
    losses = [s.train_step(batch) for _ in range(8)]
    # Step 0 runs on the bundle's initial weights, which the export's reference holds exactly.
    assert abs(losses[0] - eager_causal_loss(causal_lm.reference, ids)) < ATOL
    assert losses[-1] < losses[0] - 0.05, losses
    # Another sequence length than the export's example: the seq axis is dynamic.
    short = token_ids(3, 2)[:, :6]
    assert np.isfinite(s.train_step(Batch({"ids": short.numpy()}, shifted_labels(short.numpy()))))


# -- the former method name "adapter" ---------------------------------------------------------
@pytest.fixture(scope="module")
def bottleneck_bundle(tmp_path_factory):
    return export_bundle(load_model("tiny-encoder"), quant="none", backends=(names.BACKEND_ORT,),
                         methods=[BottleneckSpec(kind="pfeiffer", size=4), SelectiveSpec(modules=("classifier",))],
                         out=tmp_path_factory.mktemp("bottleneck") / "enc.edgepeft")


def _with_old_method_name(src: Path, dst: Path) -> None:
    """The bundle as an edgepeft that called the method "adapter" wrote it."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename == names.MANIFEST:
                d = json.loads(data)
                d["methods"] = [{**m, "method": "adapter"} if m["method"] == "bottleneck" else m for m in d["methods"]]
                d["trainable"] = [{**t, "method": "adapter"} if t["method"] == "bottleneck" else t
                                  for t in d["trainable"]]
                data = json.dumps(d, indent=2).encode()
            zout.writestr(info, data)


def test_bottleneck_is_the_method_name_in_new_manifests(bottleneck_bundle):
    m = bottleneck_bundle.manifest
    assert [s.method for s in m.methods] == ["bottleneck", "selective"]
    assert "bottleneck" in {t.method for t in m.trainable} and "adapter" not in {t.method for t in m.trainable}
    assert '"adapter"' not in m.to_json()


def test_a_bundle_naming_the_method_adapter_still_opens_and_trains(bottleneck_bundle, tmp_path, open_session,
                                                                    train_examples):
    old = tmp_path / "old.edgepeft"
    _with_old_method_name(bottleneck_bundle.path, old)
    with zipfile.ZipFile(old) as z:
        raw = json.loads(z.read(names.MANIFEST))
    assert {m["method"] for m in raw["methods"]} == {"adapter", "selective"}
    m = Manifest.from_dict(raw)
    assert m.methods == bottleneck_bundle.manifest.methods
    assert m.trainable == bottleneck_bundle.manifest.trainable
    s = open_session(old)
    assert s.manifest.methods[0] == BottleneckSpec(kind="pfeiffer", size=4)
    assert np.isfinite(s.train_step(train_examples[:4]))


# -- module structure ----------------------------------------------------------------------------
def test_signing_does_not_import_bundle():
    """The bundle <-> signing cycle is gone: signing takes its member name from edgepeft.names."""
    code = "import sys, edgepeft.signing; assert 'edgepeft.bundle' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
    from edgepeft import bundle, signing

    assert signing.SIGNATURE_MEMBER == bundle.SIGNATURE_MEMBER == names.SIGNATURE_MEMBER == "manifest.sig"


def test_exporter_modules_import_no_private_names_of_each_other():
    """The export stages and backend builders share helpers through public functions only."""
    bad = []
    for path in sorted((REPO / "exporters").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("edgepeft.exporters"):
                bad += [f"{path.name}: {node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
    assert not bad, bad


@pytest.mark.parametrize("module", ["export.py", "pipeline.py", "targets.py", "options.py", "stages.py",
                                    "joint_graph.py", "gradient_graph.py", "executorch_export.py"])
def test_pipeline_functions_are_short(module):
    """Every function of the export pipeline, docstring excluded, is well under 50 lines."""
    tree = ast.parse((REPO / "exporters" / module).read_text())
    long = []
    for f in ast.walk(tree):
        if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)):
            body = f.body[1:] if ast.get_docstring(f) is not None else f.body
            n = body[-1].end_lineno - body[0].lineno + 1 if body else 0
            if n > 40:
                long.append((f.name, n))
    assert not long, long
