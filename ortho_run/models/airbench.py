"""``model=airbench94``: the network of K. Jordan's CIFAR-10 speed benchmark
(KellerJordan/cifar10-airbench, ``airbench94_muon.py`` and the package's ``lib_airbench94.py``).

- a 2×2 whitening convolution, 3 → 24 channels, no padding: its filters are ±V/√(λ + ε) for
  the eigen-decomposition VΛVᵀ of the (uncentred) covariance of every 2×2 patch of
  ``init_images`` training images (5,000, ε = 5e-4), frozen; its bias trains for the first
  ``whiten_bias_epochs`` (3) epochs only (its learning rate decays to 0 over them);
- GELU, then three conv groups of widths 64/256/256: conv 3×3 ('same', no bias) → max-pool 2 →
  BatchNorm → GELU → conv 3×3 → BatchNorm → GELU. The convolutions are initialised as torch's
  default with a Dirac (identity) on their first ``in_channels`` filters; BatchNorm has momentum
  0.6 in airbench's convention (torch's 0.4), eps 1e-12, and no trainable scale;
- max-pool 3, flattened: a 256-d feature. The head belongs to the method (``ce`` with
  ``bias=false scale_by_width=true init_std=1`` is airbench's).

The whitening needs training images when the net is built: the model says so through the
backbone interface (``data_init_images``) and the runner hands it that many training images,
normalised as the model sees them, drawn with the data split seed (airbench takes the first
5,000 of CIFAR-10's stored order, which is a random one). Its parameter roles: every
convolution filter is ``hidden`` (the whitening filters are frozen, so no ``stem``), the
biases ``backbone_1d``, the whitening bias with its own 3-epoch schedule.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, List

import torch
from torch import Tensor, nn

from ortho_run.config import ModelConfig, at_least, at_most, in_unit_interval, positive
from ortho_run.models.registry import MODELS


@dataclass
class Airbench94Config(ModelConfig):
    name: str = "airbench94"
    widths: List[int] = field(default_factory=lambda: [64, 256, 256])
    whiten_kernel: int = 2
    whiten_eps: float = 5e-4
    init_images: int = 5000  # training images the whitening is computed from
    whiten_bias_epochs: float = 3.0  # the whitening bias trains this long, then stays put
    bn_momentum: float = 0.6  # airbench's convention: running ← 0.6·running + 0.4·batch
    bn_eps: float = 1e-12
    checks: ClassVar[list] = (at_least(1, "whiten_kernel", "init_images")
                              + at_most(8, "whiten_kernel") + at_most(10 ** 6, "init_images")
                              + positive("whiten_eps", "bn_eps") + at_least(0, "whiten_bias_epochs")
                              + in_unit_interval("bn_momentum")
                              + [("widths", lambda v: len(v) == 3 and all(1 <= w <= 8192 for w in v),
                                  "three widths in [1, 8192]")])


class BatchNorm(nn.BatchNorm2d):
    """BatchNorm without a trainable scale; ``momentum`` in airbench's convention."""

    def __init__(self, channels: int, momentum: float, eps: float):
        super().__init__(channels, eps=eps, momentum=1 - momentum)
        self.weight.requires_grad_(False)


class Conv(nn.Conv2d):
    """3×3 'same' convolution without bias, Dirac-initialised on its first in_channels filters."""

    def __init__(self, cin: int, cout: int):
        super().__init__(cin, cout, kernel_size=3, padding="same", bias=False)

    def reset_parameters(self):
        super().reset_parameters()
        w = self.weight.data
        torch.nn.init.dirac_(w[:w.size(1)])


class ConvGroup(nn.Module):
    def __init__(self, cin: int, cout: int, momentum: float, eps: float):
        super().__init__()
        self.conv1 = Conv(cin, cout)
        self.pool = nn.MaxPool2d(2)
        self.norm1 = BatchNorm(cout, momentum, eps)
        self.conv2 = Conv(cout, cout)
        self.norm2 = BatchNorm(cout, momentum, eps)
        self.activ = nn.GELU()

    def forward(self, x):
        x = self.activ(self.norm1(self.pool(self.conv1(x))))
        return self.activ(self.norm2(self.conv2(x)))


def whitening_filters(images: Tensor, kernel: int, eps: float) -> Tensor:
    """±V/√(λ + ε) as 2·c·k² filters c × k × k, from the eigen-decomposition of the uncentred
    covariance of every k×k patch (stride 1) of ``images`` (N × c × H × W, float)."""
    c = images.shape[1]
    patches = images.unfold(2, kernel, 1).unfold(3, kernel, 1).transpose(1, 3)
    flat = patches.reshape(-1, c * kernel * kernel).float()
    cov = flat.T @ flat / len(flat)
    eigenvalues, eigenvectors = torch.linalg.eigh(cov, UPLO="U")
    v = eigenvectors.T.reshape(-1, c, kernel, kernel) / torch.sqrt(eigenvalues + eps).view(-1, 1, 1, 1)
    return torch.cat((v, -v))


class Airbench94(nn.Module):
    def __init__(self, cfg, in_channels: int = 3):
        super().__init__()
        k = cfg.whiten_kernel
        width = 2 * in_channels * k * k
        self.cfg = cfg
        self.whiten = nn.Conv2d(in_channels, width, k, padding=0, bias=True)
        self.whiten.weight.requires_grad_(False)
        w1, w2, w3 = cfg.widths
        m, e = cfg.bn_momentum, cfg.bn_eps
        self.layers = nn.Sequential(nn.GELU(), ConvGroup(width, w1, m, e),
                                    ConvGroup(w1, w2, m, e), ConvGroup(w2, w3, m, e),
                                    nn.MaxPool2d(3))
        self.feature_dim = w3
        self.data_init_images = int(cfg.init_images)

    @torch.no_grad()
    def init_from_data(self, images: Tensor) -> None:
        """The whitening filters from normalised training images (N × c × H × W)."""
        w = self.whiten.weight
        w.copy_(whitening_filters(images.float(), self.cfg.whiten_kernel,
                                  self.cfg.whiten_eps).to(w.dtype).to(
            memory_format=torch.channels_last if not w.is_contiguous() else torch.contiguous_format))

    def param_groups(self):
        from ortho_run.optim.base import ParamGroup

        filters = [p for p in self.layers.parameters() if p.requires_grad and p.ndim == 4]
        biases = [p for p in self.layers.parameters() if p.requires_grad and p.ndim < 4]
        return [ParamGroup("hidden", filters), ParamGroup("backbone_1d", biases),
                ParamGroup("backbone_1d", [self.whiten.bias],
                           schedule_epochs=self.cfg.whiten_bias_epochs)]

    def forward(self, x):
        x = self.layers(self.whiten(x))
        return x.flatten(1)


@MODELS.register("airbench94", schema=Airbench94Config)
def airbench94(cfg, in_channels: int, image_size: int):
    net = Airbench94(cfg, in_channels)
    return net, net.feature_dim
