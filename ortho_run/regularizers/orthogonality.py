"""``regularizer=none | soft_orth | srip | conv_orth | orthogonal``.

Each penalty is computed once per group of same-shape layers (``Regularizer.stacks``): the
weights of a group as one stack, one batched Gram matrix, power iteration or grouped
convolution for all of them. ``soft_orth``/``srip``/``conv_orth`` of one weight are the same
functions on a stack of one.

- ``soft_orth`` — soft orthogonality Σ ‖G − I‖²_F over the chosen layers, G the smaller Gram
  matrix of the weight as a matrix (a wide W can never reach 0 on the larger one).
- ``srip`` — SRIP (Bansal et al. 2018, VITA-Group/Orthogonality-in-CNNs ``l2_reg_ortho``):
  σ²_max(G − I) by ``power_iterations`` steps of the power method, one by default as the code
  (v = (G − I)b/‖(G − I)b‖, penalty ‖(G − I)v‖²). Its weight (``conf/regularizer/srip.yaml``)
  is the official training script's: 1e-2, stepped down by 1e-3, 1e-4, 1e-6 from epochs 20,
  50, 70 and to 0 from epoch 120 (``weight_milestones=[] weight_factors=[]`` keeps it
  constant). The code starts from a random positive vector b; ours from the constant one (the
  direction that vector has on average), so the penalty is deterministic, and guards the
  exactly orthogonal case, where the code divides by zero and returns NaN. More steps bring
  the estimate closer to σ²_max.
- ``conv_orth`` — kernel orthogonality for convolutions (Wang et al. 2020, "Orthogonal
  Convolutional Neural Networks", samaonline/Orthogonal-Convolutional-Neural-Networks):
  ‖Conv(K, K, stride S, padding P) − I_r0‖_F, with P = ⌊(k − 1)/S⌋·S as the paper derives (the
  official training code's padding is wrong at stride 2 and checks too few shifts at stride
  1); I_r0 is 1 at the centre of channel pairs (i, i), 0 elsewhere. A 1×1 kernel (or one no
  wider than its stride) is its matrix: ‖G − I‖_F on the smaller Gram matrix, the code's
  ``orth_dist`` for the 1×1 shortcuts. The official distance is unsquared (``squared=true``
  squares it); the official weight is 0.1 (its ``-r``), the default of
  ``conf/regularizer/conv_orth.yaml``. Zero exactly when the convolution (as an operator) is
  orthogonal: a kernel orthogonal as a matrix need not be. Same-shape kernels of equal stride
  are one grouped convolution.
- ``orthogonal`` — a hard constraint: ``torch.nn.utils.parametrizations.orthogonal`` on the
  chosen linear layers (the optimiser then works on its parametrisation); no loss term.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Dict, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import orthogonal

from ortho_run.orthogonality import gram_deviation
from ortho_run.regularizers.base import REGULARIZERS, Regularizer, RegularizerConfig


@REGULARIZERS.register("none")
class NoRegularizer(Regularizer):
    """No penalty; the chosen layers' orthogonality error is still reported."""

    adds_loss = False

    def penalty(self) -> Tensor:
        return torch.zeros(())


_CONSTANTS: Dict[Tuple, Tensor] = {}


def _constant(key: Tuple, make) -> Tensor:
    """A constant tensor of a penalty (a start vector, a target), made once per shape and
    device rather than at every step."""
    t = _CONSTANTS.get(key)
    if t is None:
        t = _CONSTANTS[key] = make()
    return t


def _sum(terms) -> Tensor:
    terms = list(terms)
    total = terms[0]
    for t in terms[1:]:
        total = total + t
    return total


def soft_orth_stack(stack: Tensor) -> Tensor:
    """Σ over a stack (n × rows × cols) of ‖G − I‖²_F."""
    return gram_deviation(stack).pow(2).sum()


def soft_orth(w: Tensor) -> Tensor:
    return soft_orth_stack(w.reshape(1, w.shape[0], -1))


@REGULARIZERS.register("soft_orth")
class SoftOrth(Regularizer):
    def penalty(self) -> Tensor:
        return _sum(soft_orth_stack(self.stacked(g)) for g in self.stacks())


@dataclass
class SRIPConfig(RegularizerConfig):
    power_iterations: int = 1  # the official code's one step
    checks: ClassVar[list] = [
        ("power_iterations", lambda v: 1 <= v <= 1000, "in [1, 1000]")]


def srip_stack(stack: Tensor, iterations: int = 1) -> Tensor:
    """Σ over a stack of σ²_max(G − I), by the power method from a fixed start."""
    d = gram_deviation(stack)
    n, s = d.shape[0], d.shape[-1]
    v = _constant(("srip", n, s, str(d.device), d.dtype),
                  lambda: torch.full((n, s, 1), s ** -0.5, device=d.device, dtype=d.dtype))
    for _ in range(iterations):
        u = d @ v
        v = u / u.norm(dim=1, keepdim=True).clamp_min(1e-12)  # exactly orthogonal: no NaN
    return (d @ v).pow(2).sum()


def srip(w: Tensor, iterations: int = 1) -> Tensor:
    """σ²_max(G − I) by the power method from a fixed start (G the smaller Gram matrix)."""
    return srip_stack(w.reshape(1, w.shape[0], -1), iterations)


@REGULARIZERS.register("srip", schema=SRIPConfig)
class SRIP(Regularizer):
    def penalty(self) -> Tensor:
        return _sum(srip_stack(self.stacked(g), self.cfg.power_iterations) for g in self.stacks())


@dataclass
class ConvOrthConfig(RegularizerConfig):
    squared: bool = False  # the official distance is unsquared


def _identity_target(n: int, out: int, h: int, device, dtype) -> Tensor:
    """I_r0 of ``n`` kernels side by side (out × n·out × h × h)."""
    t = torch.zeros(out, n, out, h, h, device=device, dtype=dtype)
    idx = torch.arange(out, device=device)
    t[idx, :, idx, h // 2, h // 2] = 1.0
    return t.reshape(out, n * out, h, h)


def conv_orth_stack(kernels: Tensor, stride: int = 1, squared: bool = False) -> Tensor:
    """Σ over kernels (n × out × in × k × k) of ‖Conv(K, K) − I_r0‖_F (Wang et al. 2020): one
    grouped convolution, group j convolving K_j's rows with K_j's filters. A kernel no wider
    than its stride (every 1×1 kernel) has no overlapping shifted copies: the convolution is its
    matrix, and the distance is ‖G − I‖_F with G the smaller Gram matrix, as the official code's
    ``orth_dist`` for the 1×1 shortcuts (reachable when out > in·k·k, where Conv(K, K) is not)."""
    per_kernel = _conv_orth_squared(kernels, stride)
    return per_kernel.sum() if squared else per_kernel.clamp_min(1e-30).sqrt().sum()


def _conv_orth_squared(kernels: Tensor, stride: int) -> Tensor:
    """The squared distance of each kernel of the stack (n)."""
    n, out, cin, k, _ = kernels.shape
    if k <= stride:  # 1×1 kernels included (a stride is at least 1)
        return gram_deviation(kernels.reshape(n, out, -1)).pow(2).sum(dim=(1, 2))
    pad = ((k - 1) // stride) * stride
    inputs = kernels.transpose(0, 1).reshape(out, n * cin, k, k)  # batch: the rows of every K_j
    z = F.conv2d(inputs, kernels.reshape(n * out, cin, k, k), stride=stride, padding=pad,
                 groups=n)  # out × n·out × h × h
    h = z.shape[-1]
    target = _constant(("conv_orth", n, out, h, str(z.device), z.dtype),
                       lambda: _identity_target(n, out, h, z.device, z.dtype))
    d = (z - target).pow(2)
    return d.reshape(out, n, out * h * h).sum(dim=(0, 2))


def conv_orth(kernel: Tensor, stride: int = 1, squared: bool = False) -> Tensor:
    """‖Conv(K, K) − I_r0‖_F (Wang et al. 2020) for K: out × in × k × k."""
    return conv_orth_stack(kernel[None], stride, squared)


@REGULARIZERS.register("conv_orth", schema=ConvOrthConfig)
class ConvOrth(Regularizer):
    types = (nn.Conv2d,)

    def penalty(self) -> Tensor:
        return _sum(conv_orth_stack(g[0].weight[None] if len(g) == 1 else
                                    torch.stack([m.weight for m in g]), g[0].stride[0],
                                    self.cfg.squared)
                    for g in self.stacks(key=lambda m: m.stride))


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
