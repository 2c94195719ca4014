"""Real-model rows of the method table (slow): the zoo's real weights through the whole path
(int8 base) with a few methods each. Runtime loss and gradients match eager PyTorch on the same
weights and batch, the loss falls on a fixed batch, and swapping back restores the loss."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from edgepeft import names
from edgepeft.data import Batch, Example
from edgepeft.cli.datasets import bbc_news, user_split
from edgepeft.runtime import OptimizerSpec, Session
from edgepeft.specs import BitFitSpec, BottleneckSpec, LoraSpec, PrefixSpec, PromptSpec, SelectiveSpec

pytestmark = pytest.mark.slow


def _bbc(s: Session) -> Batch:
    train, _ = user_split(bbc_news(("business", "sport", "tech")), n_train=6, n_test=0, seed=3)
    return s.encoder.batch([Example(e.text[:300], e.label) for e in train])


def _lm(s: Session) -> Batch:
    return s.encoder.batch([Example("I'm heading to the gym after work, then dinner with friends."),
                            Example("Can't wait for the weekend! Going hiking with my dog.")])


def _photos(s: Session) -> Batch:
    from skimage import data
    from skimage.transform import resize

    imgs = []
    for f in (data.chelsea, data.coffee, data.astronaut, data.rocket):
        img = f()
        side = min(img.shape[:2])
        y, x = (img.shape[0] - side) // 2, (img.shape[1] - side) // 2
        imgs.append(resize(img[y:y + side, x:x + side], (224, 224), preserve_range=True).transpose(2, 0, 1))
    return Batch({"pixel_values": np.stack(imgs).astype(np.float32)}, np.array([0, 1, 2, 3], dtype=np.int64))


ROWS = [
    # (zoo model, factory kwargs, methods, lr, batch)
    ("minilm", {"labels": ("business", "sport", "tech")},
     [PrefixSpec(n_tokens=4), SelectiveSpec(modules=("classifier",))], 3e-3, _bbc),
    ("minilm", {"labels": ("business", "sport", "tech")},
     [BottleneckSpec(kind="houlsby", size=16), SelectiveSpec(modules=("classifier",))], 3e-3, _bbc),
    ("minilm", {"labels": ("business", "sport", "tech")},
     [PromptSpec(n_tokens=4, init="text", init_text="news topic"), BitFitSpec(modules=("encoder", "classifier"))],
     3e-3, _bbc),
    ("efficientnet-lite0", {"labels": ("cat", "coffee", "astronaut", "rocket")},
     [LoraSpec(rank=4, target_pattern=r"^_blocks\.1[0-5]\._project_conv$", modules_to_save=("_fc",))], 3e-3, _photos),
    ("efficientnet-lite0", {"labels": ("cat", "coffee", "astronaut", "rocket")},
     [BitFitSpec(pattern=r"^_blocks\.1[0-5]\..*$"), SelectiveSpec(modules=("_fc",))], 3e-3, _photos),
    ("smollm2-135m", {"max_length": 32}, [LoraSpec(rank=4, targets=("q_proj", "v_proj"))], 3e-3, _lm),
]


@pytest.mark.parametrize("model, kwargs, methods, lr, make_batch", ROWS,
                         ids=[f"{r[0]}-{'+'.join(m.method for m in r[2])}" for r in ROWS])
def test_real_model_row(tmp_path, model, kwargs, methods, lr, make_batch):
    from edgepeft.exporters import export_bundle, load_model

    res = export_bundle(load_model(model, **kwargs), methods=methods, quant="int8", out=tmp_path / "b.edgepeft", backends=("ort-training",))
    s = Session.open(res.path, adapter="a", store=tmp_path / "st", cache_dir=tmp_path / "c", threads=2,
                     optimizer=OptimizerSpec(lr=lr))
    batch = make_batch(s)
    ref = res.reference
    logits = ref(*(torch.from_numpy(batch.feeds[i.name]) for i in res.manifest.inputs))
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), torch.from_numpy(batch.labels).reshape(-1),
                           ignore_index=names.IGNORE_INDEX)
    loss.backward()
    rt_loss, grads = s.backend.forward_backward(batch)
    assert rt_loss == pytest.approx(loss.item(), abs=1e-4)
    params = dict(ref.named_parameters())
    for n, g in grads.items():
        ref_g = params[n].grad.numpy()
        # Relative to the tensor's gradient scale: real models' gradients span many magnitudes.
        assert np.abs(g - ref_g).max() <= 1e-3 * np.abs(ref_g).max() + 1e-6, n
    losses = [s.train_step(batch) for _ in range(6)]
    assert losses[-1] < 0.9 * losses[0], losses
    trained = s.backend.eval_step(batch)[0]
    s.swap_adapter("fresh", create=True)
    assert s.backend.eval_step(batch)[0] == pytest.approx(rt_loss, abs=1e-5)
    s.swap_adapter("a")
    assert s.backend.eval_step(batch)[0] == trained
