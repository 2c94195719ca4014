"""The ExecuTorch backend: programs in the bundle (int8 frozen base, fixed batch), parity with
eager PyTorch and ONNX Runtime, padded and split batches, in-place swaps, adapters moving
between backends, the CLI, refusals, a device process without torch. One tiny-encoder export
(ort-training + executorch) is shared by the module: ExecuTorch's export takes ~40 s even for a
tiny model."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("executorch", reason="the executorch backend needs executorch==1.5.1 (make setup)")

from edgepeft import names  # noqa: E402
from edgepeft.data import Batch, Example  # noqa: E402
from edgepeft.runtime import OptimizerSpec, Session  # noqa: E402
from edgepeft.specs import LoraSpec  # noqa: E402

BATCH = 4  # the training program's fixed batch
TEXTS = [("a wonderful, lovely film", "pos"), ("dreadful and boring", "neg"), ("great story", "pos"),
         ("awful plot, bad acting", "neg"), ("i loved it", "pos"), ("a waste of time", "neg"),
         ("superb", "pos"), ("bad", "neg"), ("good fun", "pos")]
EXAMPLES = [Example(t, lab) for t, lab in TEXTS]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    from edgepeft.exporters import export_bundle, load_model

    d = tmp_path_factory.mktemp("executorch")
    res = export_bundle(load_model("tiny-encoder"), methods=[LoraSpec(rank=4, modules_to_save=("classifier",))],
                        out=d / "enc.edgepeft", backends=("ort-training", "executorch"), executorch_batch_size=BATCH)
    return d, res


def _session(d, res, backend, adapter="a", store="store", lr=1e-2):
    return Session.open(res.path, adapter=adapter, store=d / store, cache_dir=d / "cache", backend=backend,
                        threads=1, optimizer=OptimizerSpec(lr=lr, weight_decay=0.01))


def _perturbed(s: Session, seed: int = 0) -> dict[str, np.ndarray]:
    """A non-trivial adapter (the initial lora_B is zero, which hides errors in lora_A's grads)."""
    g = np.random.default_rng(seed)
    return {k: (v + 0.05 * g.standard_normal(v.shape)).astype(np.float32) for k, v in s.parameters().items()}


def _eager(res, tensors, batch: Batch):
    ref = res.reference
    params = dict(ref.named_parameters())
    with torch.no_grad():
        for n, v in tensors.items():
            params[n].copy_(torch.from_numpy(v))
    ref.zero_grad()
    logits = ref(*(torch.from_numpy(batch.feeds[i.name]) for i in res.manifest.inputs))
    loss = F.cross_entropy(logits, torch.from_numpy(batch.labels), ignore_index=names.IGNORE_INDEX)
    loss.backward()
    return loss.item(), logits.detach().numpy(), {n: params[n].grad.numpy().copy() for n in tensors}


def test_bundle_holds_int8_programs_with_their_batch(bundle):
    d, res = bundle
    m = res.manifest
    entry = m.backends["executorch"]
    assert entry.settings[names.EXECUTORCH_BATCH_SIZE] == BATCH
    assert {entry.members["training_program"], entry.members["inference_program"]} <= set(m.members)
    from edgepeft.bundle import open_bundle

    b = open_bundle(res.path, d / "cache")
    # The frozen base is int8 in both programs: as fp32 the quantized weights alone would take
    # fp32_bytes, more than either whole program (graph and other tensors included).
    for role in ("training_program", "inference_program"):
        size = b.path(entry.members[role]).stat().st_size
        assert size < m.quantization["fp32_bytes"], (role, size, m.quantization["fp32_bytes"])


@pytest.mark.parametrize("rows", [1, 3, BATCH, 9])
def test_padded_and_split_batches_match_eager(bundle, rows):
    """Fewer rows than the program's batch are padded (ignored labels), more are split; loss,
    gradients and logits are those of eager PyTorch on the real rows only."""
    d, res = bundle
    s = _session(d, res, "executorch", store=f"rows{rows}")
    tensors = _perturbed(s)
    s.backend.load_parameters(tensors)
    batch = s.encoder.batch(EXAMPLES[:rows])
    ref_loss, ref_logits, ref_grads = _eager(res, tensors, batch)
    loss, grads = s.backend.forward_backward(batch)
    assert loss == pytest.approx(ref_loss, abs=1e-5)
    for n, g in grads.items():
        np.testing.assert_allclose(g, ref_grads[n], atol=1e-5, rtol=1e-3, err_msg=n)
    np.testing.assert_allclose(s.infer(batch.feeds), ref_logits, atol=1e-5)
    ev_loss, ev_logits = s.backend.eval_step(batch)
    assert ev_loss == pytest.approx(ref_loss, abs=1e-5) and ev_logits.shape == ref_logits.shape


def test_causal_style_labels_with_ignored_positions_only_count_labelled_ones(bundle):
    """Chunks weigh by labelled positions, not rows: a chunk whose rows are all ignored adds
    nothing, and the loss is the mean over the labelled rows of the whole batch."""
    d, res = bundle
    s = _session(d, res, "executorch", store="ignored")
    tensors = _perturbed(s, seed=1)
    s.backend.load_parameters(tensors)
    full = s.encoder.batch(EXAMPLES)
    labels = full.labels.copy()
    labels[:BATCH] = names.IGNORE_INDEX  # the first chunk has nothing to learn
    labels[BATCH + 1] = names.IGNORE_INDEX
    batch = Batch(full.feeds, labels)
    ref_loss, _, ref_grads = _eager(res, tensors, batch)
    loss, grads = s.backend.forward_backward(batch)
    assert loss == pytest.approx(ref_loss, abs=1e-5)
    for n, g in grads.items():
        np.testing.assert_allclose(g, ref_grads[n], atol=1e-5, rtol=1e-3, err_msg=n)


def test_loss_and_gradients_match_ort_training(bundle):
    d, res = bundle
    out = {}
    for backend in ("ort-training", "executorch"):
        s = _session(d, res, backend, store=f"parity-{backend}")
        tensors = _perturbed(s, seed=2)
        s.backend.load_parameters(tensors)
        batch = s.encoder.batch(EXAMPLES[:6])
        out[backend] = (*s.backend.forward_backward(batch), s.infer(batch.feeds))
    (l_ort, g_ort, x_ort), (l_et, g_et, x_et) = out["ort-training"], out["executorch"]
    assert l_et == pytest.approx(l_ort, abs=1e-5)
    np.testing.assert_allclose(x_et, x_ort, atol=1e-5)
    for n in g_ort:
        np.testing.assert_allclose(g_et[n], g_ort[n], atol=1e-5, rtol=1e-3, err_msg=n)


@pytest.mark.parametrize("first, second", [("ort-training", "executorch"), ("executorch", "ort-training")])
def test_adapter_continues_on_the_other_backend(bundle, first, second):
    """20 steps on one backend, save, 20 more on the other (same store) == 40 steps on one."""
    d, res = bundle
    batches = [EXAMPLES[i:i + 6] for i in (0, 3)]
    one = _session(d, res, first, adapter="one", store=f"one-{first}")
    ref = [one.train_step(batches[k % 2]) for k in range(40)]
    a = _session(d, res, first, adapter="moved", store=f"moved-{first}")
    losses = [a.train_step(batches[k % 2]) for k in range(20)]
    a.save_adapter()
    b = _session(d, res, second, adapter="moved", store=f"moved-{first}")
    assert b.steps == 20
    losses += [b.train_step(batches[k % 2]) for k in range(20, 40)]
    np.testing.assert_allclose(losses, ref, rtol=1e-4, atol=1e-5)
    assert ref[-1] < 0.5 * ref[0]
    final = one.parameters()
    for n, v in b.parameters().items():
        np.testing.assert_allclose(v, final[n], atol=1e-5, err_msg=n)


def test_swap_keeps_the_programs_and_is_exact(bundle):
    d, res = bundle
    s = _session(d, res, "executorch", adapter="alice", store="swap")
    batch = s.encoder.batch(EXAMPLES[:6])
    program = s.backend._train  # the loaded training program (frozen base inside)
    for _ in range(5):
        s.train_step(batch)
    trained, _ = s.backend.eval_step(batch)
    s.save_adapter()
    s.swap_adapter("bob", create=True)
    assert s.backend.eval_step(batch)[0] != trained
    s.swap_adapter("alice")
    assert s.backend.eval_step(batch)[0] == trained
    assert s.backend._train is program  # the adapter is an input: swapping never reloads a program
    again = _session(d, res, "executorch", adapter="alice", store="swap")
    assert again.backend.eval_step(batch)[0] == trained
    assert (d / "swap" / "alice" / names.ADAPTER_WEIGHTS).is_file()


DEVICE = """
import json, sys
from edgepeft.runtime import Example, OptimizerSpec, Session
path, store, cache = sys.argv[1:4]
ex = [Example(t, lab) for t, lab in json.loads(sys.argv[4])]
s = Session.open(path, adapter="dev", store=store, cache_dir=cache, backend="executorch", threads=1,
                 optimizer=OptimizerSpec(lr=1e-2))
b = s.encoder.batch(ex)
losses = [s.train_step(b) for _ in range(8)]
s.save_adapter()
trained = s.backend.eval_step(b)[0]
s.swap_adapter("other", create=True)
other = s.backend.eval_step(b)[0]
s.swap_adapter("dev")
print(json.dumps({"losses": losses, "trained": trained, "other": other, "back": s.backend.eval_step(b)[0],
                  "logits": s.infer(b.feeds).tolist(), "torch": "torch" in sys.modules,
                  "executorch": "executorch" in sys.modules}))
"""


def test_a_device_process_trains_swaps_saves_and_infers_without_torch(bundle):
    """The whole device loop on the ExecuTorch programs in a fresh process: torch (and the
    executorch Python package, whose bindings link libtorch) are never imported."""
    import subprocess
    import sys

    d, res = bundle
    done = subprocess.run([sys.executable, "-c", DEVICE, str(res.path), str(d / "device"), str(d / "cache"),
                           json.dumps(TEXTS[:6])], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["torch"] is False and out["executorch"] is False
    assert out["losses"][-1] < 0.75 * out["losses"][0]
    assert out["back"] == out["trained"] != out["other"]
    assert np.asarray(out["logits"]).shape == (6, 2)
    assert (d / "device" / "dev" / names.ADAPTER_WEIGHTS).is_file()


def test_damaged_program_is_a_bundle_error_naming_the_member(bundle, tmp_path):
    """A training program that ExecuTorch cannot load: BundleError naming the member (issue 17)."""
    import dataclasses
    import shutil

    from edgepeft.bundle import open_bundle
    from edgepeft.errors import BundleError
    from edgepeft.runtime.backends.executorch import ExecutorchBackend

    d, res = bundle
    b = open_bundle(res.path, d / "cache")
    member = res.manifest.backends["executorch"].members["training_program"]
    copy = tmp_path / "copy"
    shutil.copytree(b.root, copy)
    (copy / member).write_bytes(b"not a program" * 10)
    with pytest.raises(BundleError, match=r"executorch: bundle member\S* 'executorch/training.pte' failed to load"):
        ExecutorchBackend(dataclasses.replace(b, root=copy))


def test_a_budget_is_prechecked_by_executorchs_memory_model(bundle):
    """The memory model predicts this backend (no "measured only" note): a budget below its
    prediction is refused before anything loads, one above it opens and trains."""
    from edgepeft.errors import MemoryBudgetError

    d, res = bundle
    kw = dict(store=d / "budget", cache_dir=d / "cache", backend="executorch", threads=1, batch_size=BATCH)
    with pytest.raises(MemoryBudgetError, match="predicted to need"):
        Session.open(res.path, adapter="tight", memory_budget="1MB", **kw)
    s = Session.open(res.path, adapter="roomy", memory_budget="1GB", **kw)
    assert s.budget.notes == []
    s.train_step(EXAMPLES[:BATCH])


def test_bundle_without_executorch_is_refused(bundle, tmp_path):
    from edgepeft.errors import BackendError
    from edgepeft.exporters import export_bundle, load_model

    d, _ = bundle
    plain = export_bundle(load_model("tiny-encoder"), methods=[LoraSpec(rank=2)], out=tmp_path / "p.edgepeft",
                          backends=("ort-training",))
    assert "executorch" not in plain.manifest.backends
    with pytest.raises(BackendError, match="re-export it with the 'executorch' backend"):
        Session.open(plain.path, store=tmp_path / "s", cache_dir=d / "cache", backend="executorch")


class _Warp(torch.nn.Module):
    """LoRA's gradient must flow back through grid_sample, whose backward ExecuTorch has no
    kernel for (ONNX Runtime trains it)."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(16, 16)
        self.head = torch.nn.Linear(16, 2)
        self.register_buffer("grid", torch.rand(1, 4, 4, 2, generator=torch.Generator().manual_seed(0)) * 2 - 1)

    def forward(self, x):
        img = self.fc(x).reshape(-1, 1, 4, 4)
        out = F.grid_sample(img, self.grid.expand(x.shape[0], 4, 4, 2), align_corners=False)
        return self.head(out.reshape(-1, 16))


def test_what_executorch_cannot_train_is_refused_at_export(tmp_path):
    from edgepeft.errors import ExportError
    from edgepeft.exporters import export_bundle

    with pytest.raises(ExportError, match=r"ExecuTorch cannot build the training program for _Warp with lora: "
                                          r".*grid_sampler_2d_backward.*'ort-training' or 'portable'"):
        export_bundle(_Warp(), {"x": torch.randn(2, 16)}, methods=[LoraSpec(targets=("fc",))],
                      out=tmp_path / "w.edgepeft", backends=("executorch",))
    assert not (tmp_path / "w.edgepeft").exists()


def test_bad_batch_size_is_refused(tmp_path):
    from edgepeft.errors import SpecError
    from edgepeft.exporters import export_bundle, load_model

    with pytest.raises(SpecError, match="executorch_batch_size"):
        export_bundle(load_model("tiny-encoder"), methods=[LoraSpec(rank=2)], out=tmp_path / "b.edgepeft",
                      backends=("executorch",), executorch_batch_size=0)
    assert not (tmp_path / "b.edgepeft").exists()


def test_cli_inspect_and_train(bundle):
    from click.testing import CliRunner

    from edgepeft.cli import main

    d, res = bundle
    runner = CliRunner(env={"EDGEPEFT_CACHE": str(d / "cache")})
    r = runner.invoke(main, ["inspect", str(res.path)])
    assert r.exit_code == 0, r.output
    assert "executorch" in r.output and f"batch {BATCH}" in r.output
    data = d / "train.jsonl"
    data.write_text("\n".join(json.dumps({"text": t, "label": lab}) for t, lab in TEXTS) + "\n")
    r = runner.invoke(main, ["train", str(res.path), "--data", str(data), "--adapter", "cli", "--steps", "3",
                             "--batch-size", "6", "--lr", "1e-2", "--store", str(d / "cli-store"),
                             "--backend", "executorch", "--threads", "1"])
    assert r.exit_code == 0, r.output
    assert "executorch" in r.output and (d / "cli-store" / "cli" / names.ADAPTER_WEIGHTS).is_file()


@pytest.mark.slow
def test_minilm_parity_and_learning(tmp_path_factory):
    """The real model: MiniLM-L6 + LoRA r8 (query, value) + head over the int8 base, batch 8.
    ExecuTorch's loss, gradients and logits match eager PyTorch on a full and a partial batch,
    and a few steps on BBC News lower the loss."""
    from edgepeft.cli.datasets import bbc_news, user_split
    from edgepeft.exporters import export_bundle, load_model

    d = tmp_path_factory.mktemp("et-minilm")
    res = export_bundle(load_model("minilm", labels=("business", "sport", "tech"), max_length=64),
                        out=d / "minilm.edgepeft", backends=("executorch",), executorch_batch_size=8,
                        methods=[LoraSpec(rank=8, targets=("query", "value"), modules_to_save=("classifier",))])
    train, _ = user_split(bbc_news(("business", "sport", "tech")), n_train=16, n_test=8, seed=5)
    s = Session.open(res.path, adapter="u", store=d / "store", cache_dir=d / "cache", backend="executorch",
                     threads=2, optimizer=OptimizerSpec(lr=3e-3))
    tensors = _perturbed(s, seed=3)
    s.backend.load_parameters(tensors)
    for rows in (8, 5):
        batch = s.encoder.batch(train[:rows])
        ref_loss, ref_logits, ref_grads = _eager(res, tensors, batch)
        loss, grads = s.backend.forward_backward(batch)
        assert loss == pytest.approx(ref_loss, abs=1e-4)
        np.testing.assert_allclose(s.infer(batch.feeds), ref_logits, atol=1e-4)
        for n, g in grads.items():
            np.testing.assert_allclose(g, ref_grads[n], atol=1e-4, rtol=1e-3, err_msg=n)
    batch = s.encoder.batch(train[:8])
    losses = [s.train_step(batch) for _ in range(5)]
    assert losses[-1] < losses[0]
