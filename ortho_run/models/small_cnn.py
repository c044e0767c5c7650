"""``small_cnn``: three conv blocks and global pooling; the default for digits (8×8)."""

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from ortho_run.config import ModelConfig, at_least, at_most
from ortho_run.models.registry import MODELS


@dataclass
class SmallCNNConfig(ModelConfig):
    name: str = "small_cnn"
    width: int = 32  # channels of the first block (then 2x, 4x)
    checks: ClassVar[list] = at_least(1, "width") + at_most(8192, "width")


def _block(cin, cout):
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True)]


@MODELS.register("small_cnn", schema=SmallCNNConfig)
def small_cnn(cfg, in_channels: int, image_size: int):
    w = cfg.width
    layers = _block(in_channels, w) + _block(w, 2 * w)
    if image_size >= 8:
        layers.append(nn.MaxPool2d(2))
    layers += _block(2 * w, 4 * w) + [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return nn.Sequential(*layers), 4 * w
