"""quant="int4": frozen 2-D weights as 4-bit codes in blocks of 32 along the input dimension,
w = q * scale + min per block (exporters/quantize.py), unpacked inside the lean graphs
(exporters/onnx_graph.apply_int4) and in the chunked LM head (runtime/lean_head.py). Checked:
- packing, unpacking and dequantizing in numpy (exporter and device copies agree);
- the quantization error: half a step for any weight, none for weights already on a GGUF
  Q4_1 / Q4_K grid (float16 scales where those hold them exactly, float32 where not);
- the tiny decoder and encoder exported with int4 on lean: loss, gradients and logits match the
  eager reference (whose weights are the int4-dequantized values) to 1e-5, and training works;
- other backends refuse int4 with a message that says what to do;
- a lean-only bundle carries its frozen weights once (no inference.onnx): at most 1.1x the
  stored weights plus the adapter files."""
from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest
import torch

from test_methods import MODELS, assert_step_matches_eager, case
from edgepeft import names
from edgepeft.errors import SpecError
from edgepeft.exporters import quantize as Q
from edgepeft.runtime import OptimizerSpec, Session, lean_head

RNG = np.random.default_rng(0)


# -- numpy: packing and quantization ----------------------------------------------------------
def test_pack_unpack_round_trip():
    codes = RNG.integers(0, 16, size=(5, 64)).astype(np.uint8)
    packed = Q.pack_int4(codes)
    assert packed.shape == (5, 32) and packed.dtype == np.uint8
    assert (packed[:, 0] & 0x0F == codes[:, 0]).all() and (packed[:, 0] >> 4 == codes[:, 1]).all()
    np.testing.assert_array_equal(Q.unpack_int4(packed), codes)
    scale = RNG.random((5, 2)).astype(np.float16)
    mn = RNG.normal(size=(5, 2)).astype(np.float16)
    host = Q.dequantize_int4(packed, scale, mn)
    want = codes.reshape(5, 2, 32) * scale.astype(np.float32)[..., None] + mn.astype(np.float32)[..., None]
    np.testing.assert_array_equal(host, want.reshape(5, 64))
    # The device's copy (runtime.lean_head) is the same computation, bit for bit, also on rows.
    np.testing.assert_array_equal(lean_head.dequantize_int4(packed, scale, mn, 32), host)
    np.testing.assert_array_equal(lean_head.dequantize_int4(packed[[3, 1]], scale[[3, 1]], mn[[3, 1]], 32),
                                  host[[3, 1]])


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_int4_error_is_half_a_step(dtype):
    w = (RNG.normal(size=(64, 96)) * 0.05).astype(np.float32)
    qt = Q.quantize_int4(w, dtype)
    assert qt.packed.shape == (64, 48) and qt.scale.shape == qt.min.shape == (64, 3) and qt.scale.dtype == dtype
    x = w.reshape(64, 3, 32)
    step = (x.max(-1) - x.min(-1)) / 15
    err = np.abs(qt.dequantize() - w).reshape(64, 3, 32).max(-1)
    # Half a step; float16 scales and mins add their rounding (2^-11 relative) on top.
    slack = 0 if dtype == np.float32 else 15 * step * 2.0 ** -11 + np.abs(x).max(-1) * 2.0 ** -11
    assert (err <= 0.5 * step * (1 + 1e-5) + slack).all()
    assert Q.quantize_int4(w).scale.dtype == np.float16  # the default for weights on no grid


def _grid_blocks(scale: np.ndarray, mn: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """Rows of 64 values on the grid code * scale + min (per block of 32), codes in lo..hi with
    both ends used in every block, computed in float32 as gguf's dequantizer does."""
    codes = RNG.integers(lo, hi + 1, size=(*scale.shape, 32))
    codes[..., 0], codes[..., 1] = lo, hi
    return (codes.astype(np.float32) * scale[..., None] + mn[..., None]).reshape(len(scale), -1)


def test_gguf_q4_1_blocks_come_over_exactly_with_float16_scales():
    d = (RNG.random((8, 2)) * 0.01 + 1e-3).astype(np.float16).astype(np.float32)
    m = (-RNG.random((8, 2)) * 0.1).astype(np.float16).astype(np.float32)
    w = _grid_blocks(d, m, 0, 15)
    qt = Q.quantize_int4(w)
    assert qt.scale.dtype == np.float16
    np.testing.assert_array_equal(qt.dequantize(), w)


def test_gguf_q4_k_blocks_come_over_exactly_with_float32_scales():
    """Q4_K: scale d*sc (f16 times a 6-bit integer: not a float16) and a block need not use
    codes 0 and 15; min/max alone would not find its grid."""
    d = np.float32(np.float16(1.3e-3))
    sc = RNG.integers(33, 64, size=(8, 2)).astype(np.float32)
    m = -np.float32(np.float16(7e-4)) * RNG.integers(1, 64, size=(8, 2)).astype(np.float32)
    w = _grid_blocks((d * sc).astype(np.float32), m, 2, 13)
    qt = Q.quantize_int4(w)
    assert qt.scale.dtype == np.float32
    np.testing.assert_allclose(qt.dequantize(), w, rtol=0, atol=1e-6 * np.abs(w).max())


def test_weights_that_do_not_split_into_blocks_fall_back_to_int8():
    model = torch.nn.Sequential(torch.nn.Linear(48, 128), torch.nn.Linear(128, 64))
    out = Q.quantize_frozen(model, set(), "int4")
    assert isinstance(out["0.weight"], Q.QuantizedTensor) and isinstance(out["1.weight"], Q.Int4Tensor)
    np.testing.assert_array_equal(model[1].weight.detach().numpy(), out["1.weight"].dequantize())


# -- the lean backend on the tiny models ---------------------------------------------------------
@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from edgepeft.exporters import export_bundle, load_model

    cache = {}

    def get(model: str, quant: str = "int4"):
        if (model, quant) not in cache:
            d = tmp_path_factory.mktemp(f"int4-{model}-{quant}")
            res = export_bundle(load_model(MODELS[model].factory), methods=case(model, "lora")[0], quant=quant,
                                out=d / "b.edgepeft", backends=("lean",))
            cache[(model, quant)] = (res, d)
        return cache[(model, quant)]

    return get


def _open(res, d, lr):
    return Session.open(res.path, adapter="a", store=d / "store", cache_dir=d / "cache", threads=1,
                        optimizer=OptimizerSpec(lr=lr), backend="lean")


@pytest.mark.parametrize("model", ["decoder", "encoder"])
def test_int4_lean_matches_eager_and_trains(exported, model):
    res, d = exported(model)
    q = res.manifest.quantization
    assert q["scheme"] == "int4-asymmetric-block32" and q["int4_tensors"] and q["block_size"] == 32
    _, lr, min_drop = case(model, "lora")
    s = _open(res, d, lr)
    batch = MODELS[model].batch(s)
    # Off the initial adapter (LoRA B starts at zero), so every gradient path carries signal.
    assert_step_matches_eager(res, s, batch, {n: v + 0.01 for n, v in s.parameters().items()})
    s.backend.load_parameters(s.parameters())
    curve = [s.train_step(batch) for _ in range(12)]
    assert curve[-1] < (1 - min_drop) * curve[0], curve
    s.close()


def test_int4_reference_weights_are_the_bundles(exported):
    """The reference model holds exactly the dequantized int4 values the lean graphs unpack;
    the tied head (int4 too) is read by the chunked head in numpy to the same values."""
    res, d = exported("decoder")
    s = _open(res, d, 1e-2)
    head = s.backend._head
    assert head.min is not None
    table = res.reference.model.embed_tokens.weight.detach().numpy()
    np.testing.assert_array_equal(head.rows(0, head.vocab), table)
    np.testing.assert_array_equal(head.take(np.array([5, 2, 5])), table[[5, 2, 5]])
    s.close()


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_lean_only_bundle_stores_the_weights_once(exported, quant):
    res, d = exported("decoder", quant)
    m = res.manifest
    assert names.INFERENCE_MODEL not in m.members and list(m.backends) == [names.BACKEND_LEAN]
    with zipfile.ZipFile(res.path) as z:
        info = {i.filename: i for i in z.infolist()}
    weights = info["lean/weights.safetensors"].file_size
    adapters = sum(i.file_size for n, i in info.items() if n.startswith(names.INITIAL_ADAPTER_DIR + "/"))
    assert res.path.stat().st_size <= 1.1 * (weights + adapters), (res.path.stat().st_size, weights, adapters)
    s = _open(res, d, 1e-2)  # opens and evaluates without inference.onnx
    assert np.isfinite(s.evaluate([MODELS["decoder"].batch(s)]).loss)
    s.close()


def test_int4_and_int8_fallbacks_in_one_graph_match_eager(tmp_path):
    """A 48-wide decoder: weights whose input dimension is 48 fall back to int8 (the embedding,
    so the tied head is int8 in an int4 bundle), the 96-wide down projections are int4; both
    kinds meet in one block graph."""
    from dataclasses import replace

    from edgepeft.exporters import export_bundle, load_model
    from edgepeft.exporters.zoo.llama import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=259, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, rope_theta=10000.0, max_position_embeddings=256)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.02)
    src = replace(load_model("tiny-decoder"), name="narrow-decoder", model=model)
    res = export_bundle(src, methods=case("decoder", "lora")[0], quant="int4", out=tmp_path / "n.edgepeft",
                        backends=("lean",))
    q = res.manifest.quantization
    int8 = sorted(set(q["tensors"]) - set(q["int4_tensors"]))
    assert "model.embed_tokens.weight" in int8 and "model.layers.0.mlp.gate_proj.weight" in int8
    assert q["int4_tensors"] == ["model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.down_proj.weight"]
    s = _open(res, tmp_path, 1e-2)
    assert s.backend._head.min is None and s.backend._head.scale is not None  # the int8 head
    batch = MODELS["decoder"].batch(s)
    assert_step_matches_eager(res, s, batch, {n: v + 0.01 for n, v in s.parameters().items()})
    s.close()


# -- other backends -------------------------------------------------------------------------------
@pytest.mark.parametrize("backends", [None, ("ort-training",), ("portable",), ("executorch",), ("lean", "portable")])
def test_int4_is_refused_off_lean(tmp_path, backends):
    from edgepeft.exporters import export_bundle, load_model

    with pytest.raises(SpecError, match=r"int4.*lean backend.*backends=\('lean',\).*quant='int8'"):
        export_bundle(load_model("tiny-decoder"), methods=case("decoder", "lora")[0], quant="int4",
                      out=tmp_path / "b.edgepeft", backends=backends)
    assert not (tmp_path / "b.edgepeft").exists()


def test_cli_exports_int4_for_lean_and_inspects_it(tmp_path):
    from click.testing import CliRunner

    from edgepeft.cli import main

    runner = CliRunner(env={"EDGEPEFT_CACHE": str(tmp_path / "cache")})
    out = tmp_path / "d.edgepeft"
    args = ["export", "--model", "tiny-decoder", "--out", str(out), "--quant", "int4",
            "--method", "lora:rank=4,targets=q_proj|v_proj"]
    r = runner.invoke(main, args)
    assert r.exit_code != 0 and "lean backend only" in r.output and not out.exists()
    r = runner.invoke(main, [*args, "--backend", "lean"])
    assert r.exit_code == 0, r.output
    assert "base int4-asymmetric-block32" in r.output
    r = runner.invoke(main, ["inspect", str(out), "--json"])
    assert r.exit_code == 0, r.output
    m = json.loads(r.output)
    assert list(m["backends"]) == ["lean"] and names.INFERENCE_MODEL not in m["members"]
    assert m["quantization"]["block_size"] == 32
    r = runner.invoke(main, ["inspect", str(out)])
    assert r.exit_code == 0 and "int4" in r.output, r.output
