"""Runtime vs eager PyTorch on the same bundle: loss, logits, gradients, optimizer steps, saved
adapters and the standalone inference graph. The export's ``reference`` holds exactly the
bundle's weights (int8 ones dequantized), so the int8 bundle gets the fp32 tolerances too."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.numpy import load_file

from edgepeft import names
from edgepeft.bundle import open_bundle
from edgepeft.data import Batch
from edgepeft.optim import OptimizerSpec

ATOL = 1e-5          # loss, logits, gradients
PARAM_ATOL = 1e-5    # adapter tensors after N optimizer steps
N_STEPS = 5


@pytest.fixture(scope="module", params=["none", "int8"])
def bundle(request):
    return request.getfixturevalue("bundle_fp32" if request.param == "none" else "bundle_int8")


@pytest.fixture
def reference(bundle):
    """A private copy of the eager reference (tests may train it)."""
    return copy.deepcopy(bundle.reference).eval()


@pytest.fixture
def batches(open_session, bundle, train_examples):
    enc = open_session(bundle.path, adapter="encoder-only").encoder
    return [enc.batch(train_examples[:5]), enc.batch(train_examples[5:])]


def torch_forward(model, batch: Batch):
    ids = torch.from_numpy(batch.feeds["input_ids"])
    mask = torch.from_numpy(batch.feeds["attention_mask"])
    logits = model(ids, mask)
    loss = F.cross_entropy(logits, torch.from_numpy(batch.labels)) if batch.labels is not None else None
    return loss, logits


def trainable_params(model, manifest) -> dict[str, torch.nn.Parameter]:
    params = dict(model.named_parameters())
    return {n: params[n] for n in manifest.trainable_names}


def as_numpy(params) -> dict[str, np.ndarray]:
    return {n: p.detach().numpy().copy() for n, p in params.items()}


def assert_tensors_close(got: dict, want: dict, atol: float) -> None:
    assert set(got) == set(want)
    for n in want:
        np.testing.assert_allclose(got[n], want[n], rtol=0, atol=atol, err_msg=n)


# -- preconditions ----------------------------------------------------------------------------------
def test_bundle_quantization_is_what_the_parametrization_says(bundle):
    q = bundle.manifest.quantization
    if bundle.path.name.startswith("tiny-int8"):
        assert q["scheme"] == "int8-symmetric-per-row" and q["tensors"]
        # Trainable tensors are never quantized.
        assert not set(q["tensors"]) & set(bundle.manifest.trainable_names)
    else:
        assert q["scheme"] == "none" and q["tensors"] == []


def test_session_starts_from_the_reference_weights(open_session, bundle, reference):
    s = open_session(bundle.path)
    want = as_numpy(trainable_params(reference, bundle.manifest))
    got = s.parameters()
    assert set(got) == set(want) == set(bundle.manifest.trainable_names)
    for n in want:
        assert got[n].shape == bundle.manifest.tensor(n).shape
        np.testing.assert_array_equal(got[n], want[n], err_msg=n)


def test_int8_reference_differs_from_fp32(bundle_int8, bundle_fp32, open_session, train_examples):
    """The int8 parity checks are only meaningful if int8 changes the numbers."""
    enc = open_session(bundle_fp32.path, adapter="enc").encoder
    b = enc.batch(train_examples)
    with torch.no_grad():
        l8 = torch_forward(bundle_int8.reference, b)[1]
        l32 = torch_forward(bundle_fp32.reference, b)[1]
    assert float((l8 - l32).abs().max()) > 1e-4


# -- forward ----------------------------------------------------------------------------------------
def test_loss_and_logits_match_eager(open_session, bundle, reference, batches):
    s = open_session(bundle.path)
    for b in batches:
        with torch.no_grad():
            ref_loss, ref_logits = torch_forward(reference, b)
        ev = s.evaluate([b])
        assert ev.n == len(b)
        assert ev.loss == pytest.approx(float(ref_loss), abs=ATOL)
        assert ev.accuracy == pytest.approx(float((ref_logits.argmax(-1).numpy() == b.labels).mean()))
        logits = s.infer(b.feeds)
        assert logits.shape == (len(b), len(bundle.manifest.labels))
        np.testing.assert_allclose(logits, ref_logits.numpy(), rtol=0, atol=ATOL)
        loss, logits2 = s.backend.eval_step(b)
        assert loss == pytest.approx(float(ref_loss), abs=ATOL)
        np.testing.assert_allclose(logits2, ref_logits.numpy(), rtol=0, atol=ATOL)


def test_infer_on_texts_equals_infer_on_encoded_inputs(open_session, bundle, train_examples):
    s = open_session(bundle.path)
    texts = [e.text for e in train_examples]
    np.testing.assert_array_equal(s.infer(texts), s.infer(s.encoder.encode(texts)))
    assert s.predict(texts) == [bundle.manifest.labels[i] for i in s.infer(texts).argmax(-1)]


def test_evaluate_weights_batches_by_size(open_session, bundle, reference, batches):
    s = open_session(bundle.path)
    ev = s.evaluate(batches)
    with torch.no_grad():
        losses = [float(torch_forward(reference, b)[0]) for b in batches]
    want = sum(l_ * len(b) for l_, b in zip(losses, batches)) / sum(len(b) for b in batches)
    assert ev.n == sum(len(b) for b in batches)
    assert ev.loss == pytest.approx(want, abs=ATOL)


# -- backward ---------------------------------------------------------------------------------------
def test_gradients_match_autograd(open_session, bundle, reference, batches):
    s = open_session(bundle.path)
    params = trainable_params(reference, bundle.manifest)
    # Off the initial adapter (where every lora_A gradient is exactly 0), so the comparison
    # covers non-trivial gradients of every tensor.
    perturb(params)
    s.backend.load_parameters(as_numpy(params))
    for b in batches:
        reference.zero_grad()
        ref_loss, _ = torch_forward(reference, b)
        ref_loss.backward()
        loss, grads = s.backend.forward_backward(b)
        assert loss == pytest.approx(ref_loss.item(), abs=ATOL)
        want = {n: p.grad.numpy() for n, p in params.items()}
        assert_tensors_close(grads, want, ATOL)
        assert all(float(np.abs(v).max()) > 0 for v in grads.values())
        # forward_backward computes, it does not update.
        assert_tensors_close(s.parameters(), as_numpy(params), 0.0)


def test_gradients_do_not_accumulate_between_calls(open_session, bundle, batches):
    s = open_session(bundle.path)
    _, g1 = s.backend.forward_backward(batches[0])
    _, g2 = s.backend.forward_backward(batches[0])
    assert_tensors_close(g2, g1, 0.0)


# -- optimizer steps --------------------------------------------------------------------------------
OPTIMIZERS = [
    pytest.param(OptimizerSpec(name="adamw", lr=1e-2),
                 lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.0), None, id="adamw"),
    pytest.param(OptimizerSpec(name="adamw", lr=1e-2, weight_decay=0.1, betas=(0.8, 0.99)),
                 lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, betas=(0.8, 0.99)), None,
                 id="adamw-wd"),
    pytest.param(OptimizerSpec(name="sgd", lr=0.1, momentum=0.9),
                 lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9), None, id="sgd-momentum"),
    pytest.param(OptimizerSpec(name="sgd", lr=0.1),
                 lambda ps: torch.optim.SGD(ps, lr=0.1), None, id="sgd"),
    pytest.param(OptimizerSpec(name="adamw", lr=1e-2, max_grad_norm=0.05),
                 lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.0), 0.05, id="adamw-clip"),
]


def perturb(params: dict[str, torch.nn.Parameter], seed: int = 1) -> None:
    """Move the adapter off its zero-initialised lora_B (where every lora_A gradient is 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params.values():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


# From the exported initial adapter, AdamW's first lora_A updates are m / (sqrt(v) + eps) of
# gradients near eps (lora_B is zero at step 1, ~lr at step 2), where a 1e-9 difference in a
# gradient moves the update by ~1e-5: the tolerance there is looser. From a perturbed start
# every gradient is well away from eps, and SGD has no such division: the strict one applies.
ADAM_FROM_INITIAL_ATOL = 1e-4
STARTS = ("initial", "perturbed")


@pytest.mark.parametrize("start", STARTS)
@pytest.mark.parametrize("spec, make_torch_opt, clip", OPTIMIZERS)
def test_train_steps_match_torch_optim(open_session, bundle, reference, batches, spec, make_torch_opt, clip, start):
    s = open_session(bundle.path, optimizer=spec)
    params = trainable_params(reference, bundle.manifest)
    if start == "perturbed":
        perturb(params)
        s.store.save("perturbed", as_numpy(params))
        s.swap_adapter("perturbed")
    begin = as_numpy(params)
    assert_tensors_close(s.parameters(), begin, 0.0)
    opt = make_torch_opt(list(params.values()))
    losses, ref_losses = [], []
    for i in range(N_STEPS):
        b = batches[i % len(batches)]
        losses.append(s.train_step(b))
        opt.zero_grad()
        loss, _ = torch_forward(reference, b)
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(list(params.values()), clip)
        opt.step()
        ref_losses.append(loss.item())
    np.testing.assert_allclose(losses, ref_losses, rtol=0, atol=ATOL)
    assert s.steps == N_STEPS
    final = s.parameters()
    tol = ADAM_FROM_INITIAL_ATOL if start == "initial" and spec.name == "adamw" else PARAM_ATOL
    assert_tensors_close(final, as_numpy(params), tol)
    # The steps really moved the adapter (else the parity above would be vacuous).
    assert max(float(np.abs(final[n] - begin[n]).max()) for n in begin) > 1e-3
    # And what the session holds is what the backend computes with.
    with torch.no_grad():
        _, ref_logits = torch_forward(reference, batches[0])
    np.testing.assert_allclose(s.infer(batches[0].feeds), ref_logits.numpy(), rtol=0, atol=ATOL)


def test_saved_adapter_holds_the_session_parameters(open_session, bundle, batches):
    s = open_session(bundle.path, optimizer=OptimizerSpec(lr=1e-2))
    for i in range(N_STEPS):
        s.train_step(batches[i % 2])
    folder = s.save_adapter()
    assert folder.name == "alice"
    by_key = load_file(str(folder / names.ADAPTER_WEIGHTS))
    params = s.parameters()
    assert set(by_key) == {t.peft_key for t in bundle.manifest.trainable}
    for t in bundle.manifest.trainable:
        assert by_key[t.peft_key].dtype == np.float32
        np.testing.assert_array_equal(by_key[t.peft_key], params[t.name], err_msg=t.peft_key)


# -- the standalone inference graph -----------------------------------------------------------------
def test_inference_onnx_with_fed_adapter_matches_session(open_session, bundle, cache_dir, batches):
    import onnxruntime as ort

    s = open_session(bundle.path, optimizer=OptimizerSpec(lr=1e-2))
    initial = s.parameters()
    for i in range(N_STEPS):
        s.train_step(batches[i % 2])
    trained = s.parameters()
    model = open_bundle(bundle.path, cache_dir).path(names.INFERENCE_MODEL)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # the adapter initializers are graph inputs on purpose
    sess = ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == [i.name for i in bundle.manifest.inputs]
    assert set(bundle.manifest.trainable_names) <= {i.name for i in sess.get_overridable_initializers()}
    feeds = batches[0].feeds
    want = s.infer(feeds)
    got = sess.run([names.LOGITS_OUTPUT], {**feeds, **trained})[0]
    np.testing.assert_allclose(got, want, rtol=0, atol=ATOL)
    # Without feeding the adapter the graph falls back to the initial one: the feed matters.
    stored = sess.run([names.LOGITS_OUTPUT], dict(feeds))[0]
    with_initial = sess.run([names.LOGITS_OUTPUT], {**feeds, **initial})[0]
    np.testing.assert_allclose(stored, with_initial, rtol=0, atol=ATOL)
    assert float(np.abs(stored - got).max()) > 1e-4
