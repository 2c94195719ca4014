"""Plain-PyTorch architectures edgepeft does not ship, built only from torch's standard layers
(no slots, no declared sites), for tests/test_user_models.py. Each is tiny (a few thousand
parameters) but has at least one weight large enough to be stored int8 (>= 4096 elements), and
comes with a fixed, learnable batch of 4.

torchvision is not installed in this environment (and is not added for this): ``mobilenet`` and
``resnet`` are small equivalents of torchvision's mobilenet_v3_small and resnet18 blocks
(depthwise + squeeze-excite + hardswish inverted residual; basic block with a 1x1 downsample)."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from edgepeft import names

B = 4  # batch rows of every example batch


def _rng(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def shifted(ids: torch.Tensor) -> np.ndarray:
    """Next-token labels: position t predicts token t+1; the last position has none."""
    labels = np.full(tuple(ids.shape), names.IGNORE_INDEX, dtype=np.int64)
    labels[:, :-1] = ids[:, 1:].numpy()
    return labels


# -- vision ------------------------------------------------------------------------------------
class ViT(nn.Module):
    """Patches (a 4x4 conv) + class token + nn.TransformerEncoder (batch_first, norm_first)."""

    def __init__(self, dim: int = 32, classes: int = 3):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, stride=4)
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos = nn.Parameter(torch.randn(1, 17, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, 4, 128, dropout=0.0, activation="gelu", batch_first=True,
                                           norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch(pixels).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        return self.head(self.norm(self.encoder(x))[:, 0])


class MobileNetV3Tiny(nn.Module):
    """mobilenet_v3_small's pieces: conv-BN-hardswish stem, an inverted residual with a
    depthwise conv and squeeze-excite, a 1x1 conv to 256 channels, pooling, a linear head."""

    def __init__(self, classes: int = 3):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.Hardswish())
        self.expand = nn.Conv2d(16, 64, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.dw = nn.Conv2d(64, 64, 3, padding=1, groups=64, bias=False)
        self.bn2 = nn.BatchNorm2d(64)
        self.se_reduce, self.se_expand = nn.Conv2d(64, 16, 1), nn.Conv2d(16, 64, 1)
        self.project = nn.Conv2d(64, 16, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(16)
        self.last = nn.Conv2d(16, 256, 1)
        self.head = nn.Linear(256, classes)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.stem(pixels)
        h = F.hardswish(self.bn1(self.expand(x)))
        h = F.hardswish(self.bn2(self.dw(h)))
        s = F.hardsigmoid(self.se_expand(F.relu(self.se_reduce(h.mean((2, 3), keepdim=True)))))
        x = x + self.bn3(self.project(h * s))
        return self.head(F.hardswish(self.last(x)).mean((2, 3)))


class ResNetTiny(nn.Module):
    """resnet18's pieces: conv-BN-ReLU stem, a basic block (two 3x3 convs) with a strided 1x1
    downsample on the shortcut, global pooling, a linear head. Convs have no bias, as there."""

    def __init__(self, classes: int = 3):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.conv1 = nn.Conv2d(16, 32, 3, 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(32)
        self.conv2 = nn.Conv2d(32, 32, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(32)
        self.downsample = nn.Sequential(nn.Conv2d(16, 32, 1, 2, bias=False), nn.BatchNorm2d(32))
        self.fc = nn.Linear(32, classes)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.stem(pixels)
        h = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return self.fc(F.relu(h + self.downsample(x)).mean((2, 3)))


def images(seed: int = 0) -> tuple[dict[str, torch.Tensor], np.ndarray]:
    """Four 16x16 images whose class shows as a colour cast."""
    labels = np.array([0, 1, 2, 0])
    x = torch.randn(B, 3, 16, 16, generator=_rng(seed))
    for i, c in enumerate(labels):
        x[i, c] += 1.5
    return {"pixels": x}, labels


# -- audio -------------------------------------------------------------------------------------
class AudioCNN(nn.Module):
    """A keyword-spotting-style 1-D CNN over raw waveforms: Conv1d-BatchNorm-ReLU x3, pooling."""

    def __init__(self, classes: int = 3):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv1d(1, 16, 9, stride=2, padding=4), nn.BatchNorm1d(16)
        self.conv2, self.bn2 = nn.Conv1d(16, 32, 5, padding=2), nn.BatchNorm1d(32)
        self.conv3, self.bn3 = nn.Conv1d(32, 64, 3, padding=1), nn.BatchNorm1d(64)
        self.fc = nn.Linear(64, classes)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(wave)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = F.relu(self.bn3(self.conv3(x)))
        return self.fc(x.mean(2))


def waves(seed: int = 0) -> tuple[dict[str, torch.Tensor], np.ndarray]:
    """Tones of three pitches (one per class) in noise."""
    labels = np.array([0, 1, 2, 1])
    t = torch.arange(64) / 64
    x = torch.stack([torch.sin(2 * torch.pi * (3 + 5 * c) * t) for c in labels]).unsqueeze(1)
    return {"wave": x + 0.3 * torch.randn(x.shape, generator=_rng(seed))}, labels


# -- text --------------------------------------------------------------------------------------
class GRUClassifier(nn.Module):
    def __init__(self, vocab: int = 128, dim: int = 32, classes: int = 2):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.gru = nn.GRU(dim, dim, batch_first=True)
        self.head = nn.Linear(dim, classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out, _ = self.gru(self.embed(ids))
        return self.head(out[:, -1])


def token_classes(seed: int = 0) -> tuple[dict[str, torch.Tensor], np.ndarray]:
    """Class 0 sentences use the low half of the vocabulary, class 1 the high half."""
    labels = np.array([0, 1, 0, 1])
    ids = torch.randint(0, 64, (B, 10), generator=_rng(seed)) + 64 * torch.from_numpy(labels)[:, None]
    return {"ids": ids}, labels


class TiedLM(nn.Module):
    """A causal LM whose output head is its embedding table (read directly: F.linear(h, E))."""

    def __init__(self, vocab: int = 128, dim: int = 32, max_len: int = 16):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.randn(max_len, dim) * 0.02)
        self.block = nn.TransformerEncoderLayer(dim, 4, 64, dropout=0.0, batch_first=True)
        self.norm = nn.LayerNorm(dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        t = ids.shape[1]
        mask = torch.triu(torch.full((t, t), float("-inf")), diagonal=1)
        h = self.block(self.embed(ids) + self.pos[:t], src_mask=mask)
        return F.linear(self.norm(h), self.embed.weight)


def counting(seed: int = 0) -> tuple[dict[str, torch.Tensor], np.ndarray]:
    """Rows counting up from a random start by a row's own step: the next token is predictable."""
    start = torch.randint(0, 128, (B, 1), generator=_rng(seed))
    ids = (start + torch.arange(12) * torch.tensor([[1], [2], [3], [1]])) % 128
    return {"ids": ids}, shifted(ids)


class Seq2Seq(nn.Module):
    """nn.Transformer (sequence-first, post-norm): reverses a sequence of tokens."""

    def __init__(self, vocab: int = 20, dim: int = 32, seq: int = 8):
        super().__init__()
        self.src_embed, self.tgt_embed = nn.Embedding(vocab, dim), nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.randn(seq, 1, dim) * 0.1)
        self.transformer = nn.Transformer(dim, 4, 1, 1, 128, dropout=0.0)
        self.out = nn.Linear(dim, vocab)
        self.register_buffer("causal", nn.Transformer.generate_square_subsequent_mask(seq), persistent=False)

    def forward(self, src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        s = self.src_embed(src.t()) + self.pos
        t = self.tgt_embed(tgt.t()) + self.pos
        # tgt_is_causal: else nn.Transformer compares the mask with a causal one (a data-dependent
        # branch torch.export cannot capture for the portable and ExecuTorch graphs).
        return self.out(self.transformer(s, t, tgt_mask=self.causal, tgt_is_causal=True)).transpose(0, 1)


def reversal(seed: int = 0) -> tuple[dict[str, torch.Tensor], np.ndarray]:
    """Source tokens 1..19; the target is the source reversed, fed shifted right after BOS=0."""
    src = torch.randint(1, 20, (B, 8), generator=_rng(seed))
    target = src.flip(1)
    tgt = torch.cat([torch.zeros(B, 1, dtype=torch.int64), target[:, :-1]], dim=1)
    return {"src": src, "tgt": tgt}, target.numpy()


class Captioner(nn.Module):
    """Image-conditioned text decoder: conv patches as memory for an nn.TransformerDecoderLayer
    (batch_first, norm_first) over the caption tokens."""

    def __init__(self, vocab: int = 64, dim: int = 32):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, stride=4)
        self.embed = nn.Embedding(vocab, dim)
        self.decoder = nn.TransformerDecoderLayer(dim, 4, 128, dropout=0.0, batch_first=True, norm_first=True)
        self.out = nn.Linear(dim, vocab)

    def forward(self, ids: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
        memory = self.patch(pixels).flatten(2).transpose(1, 2)
        t = ids.shape[1]
        mask = torch.triu(torch.full((t, t), float("-inf")), diagonal=1)
        return self.out(self.decoder(self.embed(ids), memory, tgt_mask=mask))


def captions(seed: int = 0) -> tuple[dict[str, torch.Tensor], np.ndarray]:
    """An image's colour picks its caption's repeated token pattern."""
    pix, cls = images(seed)
    ids = torch.stack([(torch.arange(8) % 3) + 10 * int(c) + 1 for c in cls])
    return {"ids": ids, "pixels": pix["pixels"][:, :, :8, :8]}, shifted(ids)


def warm_batchnorm(model: nn.Module, inputs: dict[str, torch.Tensor]) -> nn.Module:
    """Running statistics of the model's BatchNorm layers from a few batches (a trained model's
    are not 0/1), then eval mode: frozen BatchNorm normalises with them."""
    model.train()
    with torch.no_grad():
        for k in range(3):
            model(*(v + 0.1 * k if v.is_floating_point() else v for v in inputs.values()))
    return model.eval()


class LSTMClassifier(GRUClassifier):
    """The same text classifier over an nn.LSTM."""

    def __init__(self, vocab: int = 128, dim: int = 32, classes: int = 2):
        super().__init__(vocab, dim, classes)
        self.gru = nn.LSTM(dim, dim, batch_first=True)
