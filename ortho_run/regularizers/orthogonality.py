"""``regularizer=none | soft_orth | srip | conv_orth | orthogonal``.

- ``soft_orth`` — soft orthogonality Σ ‖G − I‖²_F over the chosen layers, G the smaller Gram
  matrix of the weight as a matrix (a wide W can never reach 0 on the larger one).
- ``srip`` — SRIP (Bansal et al. 2018, VITA-Group/Orthogonality-in-CNNs ``l2_reg_ortho``):
  σ²_max(G − I) by ``power_iterations`` steps of the power method (the code: one step from a
  random vector; ours starts from a fixed vector, so the penalty is deterministic, and guards
  the exactly orthogonal case, where the code divides by zero and returns NaN).
- ``conv_orth`` — kernel orthogonality for convolutions (Wang et al. 2020, "Orthogonal
  Convolutional Neural Networks", samaonline/Orthogonal-Convolutional-Neural-Networks):
  ‖Conv(K, K, stride S, padding P) − I_r0‖_F, with P = ⌊(k − 1)/S⌋·S as the paper derives (the
  official training code's padding is wrong at stride 2 and checks too few shifts at stride
  1); I_r0 is 1 at the centre of channel pairs (i, i), 0 elsewhere. The official distance is
  unsquared (``squared=true`` squares it). Zero exactly when the convolution (as an operator) is
  orthogonal: a kernel orthogonal as a matrix need not be.
- ``orthogonal`` — a hard constraint: ``torch.nn.utils.parametrizations.orthogonal`` on the
  chosen linear layers (the optimiser then works on its parametrisation); no loss term.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import orthogonal

from ortho_run.config import at_least
from ortho_run.orthogonality import gram_error, smaller_gram
from ortho_run.regularizers.base import REGULARIZERS, Regularizer, RegularizerConfig


@REGULARIZERS.register("none")
class NoRegularizer(Regularizer):
    """No penalty; the chosen layers' orthogonality error is still reported."""

    adds_loss = False

    def penalty(self) -> Tensor:
        return torch.zeros(())


@REGULARIZERS.register("soft_orth")
class SoftOrth(Regularizer):
    def penalty(self) -> Tensor:
        return sum(soft_orth(w) for w in self.weights())


def soft_orth(w: Tensor) -> Tensor:
    return gram_error(w).pow(2)


@dataclass
class SRIPConfig(RegularizerConfig):
    power_iterations: int = 2
    checks: ClassVar[list] = RegularizerConfig.checks + at_least(1, "power_iterations")


def srip(w: Tensor, iterations: int = 2) -> Tensor:
    """σ²_max(G − I) by the power method from a fixed start (G the smaller Gram matrix)."""
    g = smaller_gram(w)
    d = g - torch.eye(len(g), device=g.device, dtype=g.dtype)
    v = torch.ones(len(g), 1, device=g.device, dtype=g.dtype) / len(g) ** 0.5
    for _ in range(iterations):
        u = d @ v
        v = u / u.norm().clamp_min(1e-12)  # an exactly orthogonal W: d = 0, no NaN
    return (d @ v).norm().pow(2)


@REGULARIZERS.register("srip", schema=SRIPConfig)
class SRIP(Regularizer):
    def penalty(self) -> Tensor:
        return sum(srip(w, self.cfg.power_iterations) for w in self.weights())


@dataclass
class ConvOrthConfig(RegularizerConfig):
    squared: bool = False  # the official distance is unsquared


def conv_orth(kernel: Tensor, stride: int = 1, squared: bool = False) -> Tensor:
    """‖Conv(K, K) − I_r0‖_F (Wang et al. 2020) for K: out × in × k × k."""
    out, _, k, _ = kernel.shape
    pad = ((k - 1) // stride) * stride
    z = F.conv2d(kernel, kernel, stride=stride, padding=pad)  # out × out × h × h
    target = torch.zeros_like(z)
    c = z.shape[-1] // 2
    idx = torch.arange(out, device=z.device)
    target[idx, idx, c, c] = 1.0
    d = (z - target).pow(2).sum()
    return d if squared else d.clamp_min(1e-30).sqrt()


@REGULARIZERS.register("conv_orth", schema=ConvOrthConfig)
class ConvOrth(Regularizer):
    types = (nn.Conv2d,)

    def penalty(self) -> Tensor:
        return sum(conv_orth(m.weight, m.stride[0], self.cfg.squared) for m in self._layers)


@REGULARIZERS.register("orthogonal")
class HardOrthogonal(Regularizer):
    """Reparametrises the chosen linear layers as orthogonal maps; adds no loss."""

    types = (nn.Linear,)
    adds_loss = False

    def __init__(self, cfg, backbone):
        super().__init__(cfg, backbone)
        for name in self.names:
            parent, _, attr = name.rpartition(".")
            owner = backbone.get_submodule(parent) if parent else backbone
            # matrix_exp also for non-square layers: torch's default there (householder) lets
            # the weight collapse to zero after a few SGD steps (seen with torch 2.14)
            orthogonal(getattr(owner, attr), orthogonal_map="matrix_exp")
        self._layers = [backbone.get_submodule(n) for n in self.names]

    def penalty(self) -> Tensor:
        return torch.zeros(())
