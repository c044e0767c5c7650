"""``synthetic``: seeded, class-structured images for tests and scale checks.

Each class has a prototype made of a few random 2-D sinusoids per channel; a sample is its
class prototype, randomly translated, with random contrast and Gaussian noise (``data.noise``
in units of the prototype's std). Any number of classes and any size; same seed, same data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ortho_run.config import Augment, DataConfig, at_least, at_most
from ortho_run.datasets.base import SOURCES, DataSet, Split


@dataclass
class SyntheticConfig(DataConfig):
    name: str = "synthetic"
    num_classes: int = 10
    image_size: int = 32
    channels: int = 3
    train_per_class: int = 100
    test_per_class: int = 30
    noise: float = 0.6  # in units of the class prototype's std
    augment: Augment = Augment.flip
    checks: ClassVar[list] = (at_least(2, "num_classes") + at_least(4, "image_size")
                              + at_most(10 ** 5, "num_classes") + at_most(2048, "image_size")
                              + at_most(64, "channels")
                              + at_most(10 ** 6, "train_per_class", "test_per_class")
                              + at_least(1, "channels", "train_per_class", "test_per_class")
                              + at_least(0, "noise"))


def make_synthetic(num_classes: int, per_class: int, image_size: int, channels: int,
                   noise: float, seed: int, proto_seed: int):
    g_proto = torch.Generator().manual_seed(proto_seed)
    s = image_size
    yy, xx = torch.meshgrid(torch.arange(s).float(), torch.arange(s).float(), indexing="ij")
    n_waves = 4
    freq = torch.randint(1, 4, (num_classes, channels, n_waves, 2), generator=g_proto).float()
    phase = torch.rand(num_classes, channels, n_waves, generator=g_proto) * 2 * math.pi
    amp = torch.rand(num_classes, channels, n_waves, generator=g_proto) + 0.5
    arg = (2 * math.pi / s) * (freq[..., 0, None, None] * xx + freq[..., 1, None, None] * yy)
    protos = (amp[..., None, None] * torch.sin(arg + phase[..., None, None])).sum(2)  # C×ch×s×s
    protos = (protos - protos.mean(dim=(1, 2, 3), keepdim=True)) / protos.std(
        dim=(1, 2, 3), keepdim=True)

    g = torch.Generator().manual_seed(seed)
    y = torch.arange(num_classes).repeat_interleave(per_class)
    x = protos[y].clone()
    shift = max(1, s // 8)
    dx = torch.randint(-shift, shift + 1, (len(y),), generator=g)
    dy = torch.randint(-shift, shift + 1, (len(y),), generator=g)
    for i in range(len(y)):  # small per-sample roll; data sets here are small
        x[i] = torch.roll(x[i], shifts=(int(dy[i]), int(dx[i])), dims=(1, 2))
    contrast = 0.8 + 0.4 * torch.rand(len(y), 1, 1, 1, generator=g)
    x = x * contrast + noise * torch.randn(x.shape, generator=g)
    x = (128 + 40 * x).round().clamp(0, 255).to(torch.uint8)
    return x, y


@SOURCES.register("synthetic", schema=SyntheticConfig)
def load_synthetic(cfg) -> DataSet:
    common = dict(num_classes=cfg.num_classes, image_size=cfg.image_size, channels=cfg.channels,
                  noise=cfg.noise, proto_seed=cfg.split_seed)
    xtr, ytr = make_synthetic(per_class=cfg.train_per_class, seed=cfg.split_seed + 11, **common)
    xte, yte = make_synthetic(per_class=cfg.test_per_class, seed=cfg.split_seed + 22, **common)
    return DataSet(name="synthetic", train=Split(y=ytr, x=xtr), test=Split(y=yte, x=xte),
                   num_classes=cfg.num_classes, channels=cfg.channels,
                   image_size=cfg.image_size)
