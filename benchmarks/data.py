"""Data and model variants the benchmarks need beyond edgepeft.cli.datasets and the zoo: MNIST digits
as small RGB images, and EfficientNet-Lite0's ImageNet weights at a smaller input size."""
from __future__ import annotations

import dataclasses

import numpy as np

from edgepeft.cli.datasets import mnist_digits, split_indices

DIGITS = tuple(str(i) for i in range(10))


def mnist_rgb(size: int) -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 MNIST digits as float32 (N, 3, size, size) pixels in 0..255 (bilinear resize,
    grey replicated to 3 channels), and int64 labels."""
    import torch
    import torch.nn.functional as F

    images, labels = mnist_digits()
    x = torch.from_numpy(images.astype(np.float32)).unsqueeze(1)
    if size != x.shape[-1]:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x.clamp(0, 255).expand(-1, 3, -1, -1).contiguous().numpy(), labels


def three_way_split(labels, *, n_train: int, n_val: int, n_test: int, seed: int) -> tuple[list[int], ...]:
    """Disjoint, label-balanced train / validation / test indices from a fixed seed."""
    rest, test = split_indices(list(labels), n_train=n_train + n_val, n_test=n_test, seed=seed)
    tr, va = split_indices([labels[i] for i in rest], n_train=n_train, n_test=n_val, seed=seed + 1)
    return [rest[i] for i in tr], [rest[i] for i in va], test


def efficientnet_lite0_at(size: int, labels: tuple[str, ...], seed: int = 0):
    """EfficientNet-Lite0 with its ImageNet weights, built for ``size`` x ``size`` inputs (the
    convolutions' weights do not depend on the input size; only the static TF SAME padding
    does), BatchNorms folded, a fresh seeded head with one output per label."""
    import torch

    from edgepeft.exporters.zoo import ModelSource
    from edgepeft.exporters.zoo.efficientnet import (IMAGE_AXES, LITE0, EfficientNetLite, fold_batchnorms,
                                                     fresh_linear, image_inputs, lite0_weights_path)

    cfg = dataclasses.replace(LITE0, image_size=size)
    state = torch.load(lite0_weights_path(), map_location="cpu", weights_only=True)
    with torch.random.fork_rng(devices=[]):
        model = EfficientNetLite(cfg, 1000, batchnorm=True)
    model.load_state_dict(state, strict=True)
    model = fold_batchnorms(model.eval())
    model._fc = fresh_linear(cfg.head_ch, len(labels), seed)
    return ModelSource("efficientnet-lite0", model.eval(), image_inputs(2, size), tuple(labels),
                       tokenizer_json=None, task="classification", dynamic_axes=dict(IMAGE_AXES))
