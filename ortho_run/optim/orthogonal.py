"""Orthogonalised optimisers: ``optim=muon | normuon | root | auon | auon_hybrid``.

Each updates the parameters of the roles in ``optim.roles`` (default: the backbone's hidden
weights, ``hidden``) with an orthogonalised momentum step, and every other parameter (the stem,
biases and norms, the method's head) with AdamW or SGD (``optim.other``), all scheduled
together. A weight with more than two dims (a convolution kernel, out × in × k × k) is updated
as the matrix out × (in·k·k) and reshaped back. Method-owned parameters that name their own
optimiser (GCR's bases) keep it.

Every rule is a small pure function over a *stack* of same-shape matrices (``RULES``), in the
form of ``muon_update`` in KellerJordan/Muon; ``OrthogonalizedMomentum.step`` only loops: the
momentum of every parameter in one foreach call, then, per stack of same-shape matrices (the 20
hidden matrices of a CIFAR ResNet-18 make 11), the rule once, with one batched Newton–Schulz
chain (``baddbmm``), then the updates in one foreach call per scale. ``optim.batched=false``
runs each matrix alone (the same functions on stacks of one). State stays per parameter (a
momentum buffer shaped like the parameter, NorMuon's row moments), so checkpoints hold the same
entries whatever the batching. Under ``trainer.compile`` the whole step is compiled (the
learning rate enters as a tensor, so a schedule does not recompile it; nothing in it reads a
device value on the host).

- ``muon`` — Muon (K. Jordan et al. 2024; ``torch.optim.Muon``): B ← μB + (1 − μ)G (an EMA),
  U = NS(G + μ(B − G)) with Nesterov (else NS(B)), W ← W(1 − ηλ) − η·√max(1, rows/cols)·U. NS is
  the quintic Newton–Schulz iteration, ``ns_steps`` = 5 steps with ``ns_coefficients``
  (``original``: K. Jordan's (3.4445, −4.7750, 2.0315), the default; ``quintic``: the per-step
  sequence tuned for modded-nanogpt, timm's default; ``polar_express``), on X/‖X‖_F, run in bf16
  as the official code (``ns_dtype=fp32`` for full precision). On 2-D weights this is
  ``torch.optim.Muon``'s step to the bit, and on 2-D and convolution weights timm's ``Muon``
  (``ns_coefficients="original"``, ``adjust_lr_fn="original"``, Nesterov) to the bit with
  ``conv_shape=matrix`` (tested); ``kernel`` with ``ns_norm_eps=add`` is K. Jordan's
  ``muon_update`` on a kernel (tested).
- ``normuon`` — NorMuon (Li et al. 2025, zichongli5/NorMuon): after NS, a per-row (neuron)
  second-moment EMA v ← β₂v + (1 − β₂)·mean_j(U²_ij) (β₂ = 0.95, no bias correction, ε = 1e-10)
  normalises each row, Û = U/(√v + ε); as the official code, Û is then rescaled to U's
  Frobenius norm (the paper instead states an update RMS of 0.2·η: not what its code does). On
  a convolution (``conv_shape``, below) ``kernel`` is the official code's: the statistics over
  the kernel's last axis (state out × in × k × 1), the norm restored per k×k slice; ``matrix``
  takes the rows of the flattened kernel (the output units). Newton–Schulz starts from
  X/(‖X‖_F + 1e-7), as the K. Jordan code that NorMuon ships (``ns_norm_eps=add``; Muon's
  default here is torch.optim.Muon's X/max(‖X‖_F, eps), which differs by 1e-7/‖X‖_F, a lot
  for a small momentum). The row statistics run in float32: the official code keeps
  Newton–Schulz's bf16, and with float32 weights its second-moment update refuses the bf16
  row means.
- ``root`` — ROOT (He et al. 2025, huawei-noah/noah-research ``ROOT``): B ← μB + G (a plain sum),
  M = G + μB with Nesterov (the official default; else M = B). The outliers beyond ε, the
  linearly interpolated ``root_quantile`` (0.9) quantile of |M| (the official
  ``simple_quantile``: kthvalue at ⌊q(n−1)⌋+1 and ⌈q(n−1)⌉+1, lerp between them, in float32)
  plus 1e-9, are split off: only the clipped part clamp(M, −ε, ε) is orthogonalised (computed
  as the official M − sign(M)·relu(|M| − ε) rounds it, which differs from a plain clamp by up
  to an ulp of each outlier), in the gradient's dtype (``ns_dtype=grad``; no bf16 cast) from
  X/(‖X‖_F + ε), with shape-fitted coefficients (``root_coefficients``, keyed by the matrix's
  ``ROWSxCOLS`` in either order; the default is the official table, whose four LLM shapes no
  CNN here has) else ``ns_coefficients``. W ← W(1 − ηλ) − η·0.2·√max(rows, cols)·NS(clip M)
  (the code's RMS-matching scale, ``root_scale``). The official code takes only 2-D weights;
  a convolution is its flattened matrix here.
- ``auon`` — AuON (the paper's form, ryyzn9/AuON): X = M/(‖M‖_F + 1e-7) from the Nesterov
  momentum, U = X / (rms(cosh X) + 1e-8) (element-wise cosh), W ← W − η·√max(1, rows/cols)·U;
  linear time, and ‖U‖₂ ≤ ‖X‖_F / rms(cosh X) ≤ 1 since cosh ≥ 1. As the paper's training
  script (``Auon_Adam_train.py``) computes it: the guards as written there (+1e-7 on the norm,
  ``eps``; +1e-8 on the RMS), in bf16 (``ns_dtype``, as the script, which runs this map in the
  place and under the name of Newton–Schulz; ``ns_dtype=fp32`` for full precision). The script
  reads the scale from the parameter's last two dims, 1 for a k×k kernel (``conv_shape``,
  below). That is the default, ``auon_form=paper``; ``auon_form=package`` is the package's
  ``AuON`` class (``auon/optimizer.py``): U = M / (rms(cosh(γ·M/(‖M‖_F + 1e-7))) + 1e-8) with γ = 1.5
  (``brake_gamma``), M the Nesterov momentum itself (not normalised), in the gradient's dtype,
  no aspect-ratio factor; its default lr is 0.24 (``optim.lr`` stays as set). Its norm and
  mean run over the whole tensor, so a convolution's kernel as a matrix gives the same step.
- ``auon_hybrid`` — Hybrid-AuON: orthogonalise first, then the cosh brake
  (``hybrid_form``). ``paper`` (the default, the paper's §3.2): X = NS(M) with one step (bf16,
  from X/(‖X‖_F + ε), the Newton–Schulz of the code the paper's script builds on), then
  U = X / (rms(cosh X) + 1e-8), scaled by √max(1, rows/cols). ``package`` (the package's
  ``HybridAuON``): X = NS(M) with five steps in the gradient's dtype from X/(‖X‖_F + ε), then
  U = X / (rms(cosh(γ·X/(‖X‖_F + 1e-7))) + 1e-8) with γ = 1.5 (``brake_gamma``), no
  aspect-ratio factor (the package's default lr is 0.24; ``optim.lr`` stays as set).
  ``ns_steps`` / ``ns_dtype`` / ``brake_gamma`` left null take the form's own. (Dividing by
  the cosh RMS *before* Newton–Schulz, as an earlier version here did, is a no-op:
  Newton–Schulz starts by normalising its input.) On a 4-D weight the package orthogonalises
  each k×k slice of the kernel (``conv_shape=kernel``); the paper's form, the flattened matrix.

A convolution kernel (out × in × k × k) is orthogonalised as its flattened matrix out × (in·k·k)
by every rule. What the steps after Newton–Schulz see of it is ``optim.conv_shape``: ``kernel``,
the plugins' yaml default for muon, normuon, auon and auon_hybrid, is how their official code,
handed a 4-D weight, reads it: the aspect-ratio scale from the kernel's last two dims (K.
Jordan's ``muon_update`` and NorMuon take ``grad.size(-2) / grad.size(-1)``, the AuON script
the parameter's, which is 1 for a square kernel where the flattened matrix gives √(out/(in·k·k))
for a kernel with out > in·k·k, a 1×1 shortcut that widens), NorMuon's statistics and
HybridAuON's slices as said above. ``matrix`` sees the flattened matrix throughout: timm's Muon,
and the behaviour of configs saved before the key existed (the schema's default). ROOT's code
takes only matrices: its ``kernel`` is refused.
"""

from __future__ import annotations

import math
import struct
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import Any, Callable, ClassVar, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ortho_run.config import Choice, OptimConfig, at_least, in_unit_interval, positive
from ortho_run.errors import CheckpointError, ConfigError
from ortho_run.optim.base import (OPTIMIZERS, ROLES, ParamGroup, check_nesterov, check_roles,
                                  torch_groups, with_fused_fallback)
from ortho_run.optim.newton_schulz import (MUON_COEFFICIENTS, NS_COEFFICIENTS, Triple,
                                           newton_schulz, unit_frobenius)


class NSDtype(Choice):
    bf16 = "bf16"  # the official Muon/NorMuon code's, the AuON paper's script's
    fp32 = "fp32"  # float32, whatever the weights' dtype
    grad = "grad"  # the gradient's own (float32 for float32 weights): ROOT's, the AuON package's


class NSCoefficients(Choice):
    original = "original"
    quintic = "quintic"
    polar_express = "polar_express"


class Form(Choice):
    """Which official code a rule follows where its paper's and its package's differ."""
    paper = "paper"
    package = "package"


class ConvShape(Choice):
    """What a rule's steps after Newton–Schulz see of a convolution kernel (out × in × k × k)."""
    matrix = "matrix"  # its flattened matrix out × (in·k·k), for every step (timm's Muon)
    kernel = "kernel"  # the kernel's own shape where the official code reads it (see the docstring)


class Other(Choice):
    adamw = "adamw"
    sgd = "sgd"


class MomentumForm(Choice):
    ema = "ema"  # B ← μB + (1 − μ)G, Nesterov G + μ(B − G) (Muon, NorMuon, AuON)
    sum = "sum"  # B ← μB + G, Nesterov G + μB (ROOT, airbench's Muon)


class AdjustLR(Choice):
    """The step's scale per matrix shape (timm's ``adjust_lr_fn`` names)."""
    original = "original"  # √max(1, rows/cols): K. Jordan's Muon
    match_rms_adamw = "match_rms_adamw"  # root_scale·√max(rows, cols) (0.2: Moonlight's, ROOT's)
    none = "none"  # 1


class NormEps(Choice):
    clamp = "clamp"  # X / max(‖X‖_F, eps): torch.optim.Muon, timm
    add = "add"  # X / (‖X‖_F + eps): K. Jordan's, NorMuon's, ROOT's, AuON's, airbench's code


_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "grad": None}  # None: no cast

#: the official ROOT example's shape-fitted coefficients (ROOT/examples/example_train.py),
#: keyed as min(rows, cols) x max(rows, cols)
ROOT_COEFFICIENTS = {
    "2048x2048": [3.4916, -4.8224, 2.1095],
    "2048x16384": [3.1943, -3.8221, 1.5322],
    "2048x3072": [3.4509, -4.5790, 1.9325],
    "2048x8192": [2.9794, -3.6674, 1.6207],
}


def parse_coefficient_table(table, key: str = "optim.root_coefficients"
                            ) -> Dict[Tuple[int, int], Triple]:
    """``{"ROWSxCOLS": [a, b, c]}`` as ``{(min, max): (a, b, c)}``; a malformed entry is a
    ConfigError naming it."""
    out: Dict[Tuple[int, int], Triple] = {}
    for k, v in dict(table or {}).items():
        parts = str(k).lower().split("x")
        if len(parts) != 2 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
            raise ConfigError(f"{key}: the key {k!r} is not a matrix shape: write ROWSxCOLS with "
                              f"two positive integers, e.g. '64x576': [3.4445, -4.775, 2.0315]")
        try:
            triple = tuple(float(x) for x in v)
        except (TypeError, ValueError):
            triple = ()
        if len(triple) != 3 or not all(math.isfinite(x) for x in triple):
            raise ConfigError(f"{key}[{k}]={v!r}: give three finite numbers (a, b, c) of the "
                              f"Newton-Schulz step X <- aX + (bA + cA^2)X")
        shape = tuple(sorted(int(p) for p in parts))
        if shape in out and out[shape] != triple:
            raise ConfigError(f"{key}: {k!r} names the shape {shape[0]}x{shape[1]} again with "
                              f"other coefficients (a shape and its transpose are one entry)")
        out[shape] = triple
    return out


def _float32(x: float) -> float:
    """``x`` rounded to float32 (the official ROOT quantile holds its index in a float32)."""
    return struct.unpack("f", struct.pack("f", x))[0]


def linear_quantile(flat: Tensor, q: float) -> Tensor:
    """The ``q`` quantile of each row of ``flat`` (n × N), linearly interpolated between the
    order statistics at ⌊q(N−1)⌋ and ⌈q(N−1)⌉ (ROOT's ``simple_quantile``; ``torch.quantile``'s
    default interpolation, without its size limit)."""
    pos = _float32(q * (flat.shape[1] - 1))
    lo, hi = math.floor(pos), math.ceil(pos)
    lower = flat.kthvalue(lo + 1, dim=1).values
    if lo == hi:
        return lower
    return torch.lerp(lower, flat.kthvalue(hi + 1, dim=1).values, pos - lo)


@dataclass(frozen=True)
class Hyper:
    """A rule's settings (constants of the step, not tensors)."""

    ns_steps: int = 5
    coefficients: Tuple[Triple, ...] = (MUON_COEFFICIENTS,)
    ns_dtype: Optional[torch.dtype] = torch.bfloat16  # None: the gradient's own
    eps: float = 1e-7
    #: NS from X/(‖X‖ + eps) (K. Jordan's code, which NorMuon, ROOT and AuON ship) instead of
    #: X/max(‖X‖, eps) (torch.optim.Muon's); None: the rule's own (``Rule.add_eps``)
    add_eps: Optional[bool] = None
    beta2: float = 0.95
    norm_eps: float = 1e-10
    root_quantile: float = 0.9
    root_scale: float = 0.2
    shape_coefficients: Tuple[Tuple[Tuple[int, int], Triple], ...] = ()
    form: str = "paper"  # auon's and auon_hybrid's (Form)
    gamma: float = 1.5  # the package form's scale inside cosh
    momentum: Optional[str] = None  # ema | sum; None: the rule's own
    adjust_lr: Optional[str] = None  # original | match_rms_adamw | none; None: the rule's own
    renormalize: bool = False  # each weight to Frobenius norm √rows before its step
    conv_shape: str = "matrix"  # ConvShape: how a 4-D kernel is seen after Newton–Schulz

    def kernel_of(self, p: Tensor) -> Optional[Tuple[int, ...]]:
        """The kernel shape a rule reads for ``p`` (``conv_shape=kernel`` and a 4-D weight),
        else None (the flattened matrix throughout)."""
        return tuple(p.shape) if self.conv_shape == "kernel" and p.ndim == 4 else None

    def orthogonalize(self, x: Tensor, rows: int, cols: int) -> Tensor:
        """NS of a stack of ``rows × cols`` matrices with this rule's settings."""
        table = dict(self.shape_coefficients)
        coefficients = self.coefficients
        shape = (min(rows, cols), max(rows, cols))
        if shape in table:
            coefficients = (table[shape],)
        return newton_schulz(x, self.ns_steps, coefficients, self.eps, self.ns_dtype,
                             add_eps=bool(self.add_eps))


def _rms(t: Tensor) -> Tensor:
    """Root mean square of each matrix of a stack (n × 1 × 1)."""
    return t.pow(2).mean(dim=(-2, -1), keepdim=True).sqrt()


# ------------------------------------------------------------------ the rules, on stacks
# Each takes the stacked momentum M (n × rows × cols, the parameters' dtype), the rule's
# per-parameter state as lists (updated in place), its settings and the kernel shape it reads
# (``Hyper.kernel_of``: None for a matrix, or with conv_shape=matrix); it returns the direction
# U (n × rows × cols) that the step scales by lr × Rule.scale.

def muon_update(m: Tensor, state: Dict[str, List[Tensor]], h: Hyper,
                kernel: Optional[Tuple[int, ...]] = None) -> Tensor:
    return h.orthogonalize(m, *m.shape[-2:])


def normuon_update(m: Tensor, state: Dict[str, List[Tensor]], h: Hyper,
                   kernel: Optional[Tuple[int, ...]] = None) -> Tensor:
    # in float32: the official code keeps the NS output's dtype, and with bf16 Newton–Schulz and
    # float32 weights its second-moment lerp refuses the bf16 row means
    u = h.orthogonalize(m, *m.shape[-2:]).float()
    if kernel is not None:  # the official code's 4-D statistics: rows of the kernel's last axis
        u = u.reshape(m.shape[0], *kernel)
    v = state["row_second_moment"]  # per weight: rows × 1 (kernel: out × in × k × 1), float32
    torch._foreach_lerp_(v, list(u.pow(2).mean(dim=-1, keepdim=True).unbind(0)), 1 - h.beta2)
    normed = u * (1 / (torch.stack(v).sqrt() + h.norm_eps))
    # Muon's Frobenius norm restored, as the official code (kernel: of each k × k slice)
    keep = u.norm(dim=(-2, -1), keepdim=True) / (normed.norm(dim=(-2, -1), keepdim=True) + 1e-10)
    return (normed * keep).reshape(m.shape)


def root_update(m: Tensor, state: Dict[str, List[Tensor]], h: Hyper,
                kernel: Optional[Tuple[int, ...]] = None) -> Tensor:
    n = m.shape[0]
    eps = linear_quantile(m.abs().reshape(n, -1).float(), h.root_quantile) + 1e-9
    eps = eps.to(m.dtype).view(n, 1, 1)
    # the clipped part M − T_ε[M], rounded as the official M − sign(M)·relu(|M| − ε): the outliers
    # T_ε[M] = M − clamp(M, −ε, ε) exactly as it rounds them, then subtracted (a plain clamp
    # gives ±ε itself, which differs from the official value by up to an ulp of the outlier)
    clipped = m - (m - torch.clamp(m, min=-eps, max=eps))
    return h.orthogonalize(clipped, *m.shape[-2:])


def cosh_brake(x: Tensor, gamma: float) -> Tensor:
    """The AuON package's brake (its ``AuON`` and ``HybridAuON``): x / (rms(cosh(γ·x/(‖x‖_F +
    1e-7))) + 1e-8), each matrix of the stack by its own norm; x itself is not normalised."""
    return x / (_rms(torch.cosh(unit_frobenius(x, 1e-7, add_eps=True) * gamma)) + 1e-8)


def auon_update(m: Tensor, state: Dict[str, List[Tensor]], h: Hyper,
                kernel: Optional[Tuple[int, ...]] = None) -> Tensor:
    x = m.to(h.ns_dtype or m.dtype)
    if h.form == "package":  # the package's AuON class: the brake on M as it is
        return cosh_brake(x, h.gamma)
    # the paper's script: X = M/(‖M‖ + 1e-7), U = X/(rms(cosh X) + 1e-8), in ns_dtype (bf16 there)
    x = unit_frobenius(x, h.eps, bool(h.add_eps))
    return x / (_rms(torch.cosh(x)) + 1e-8)


def auon_hybrid_update(m: Tensor, state: Dict[str, List[Tensor]], h: Hyper,
                       kernel: Optional[Tuple[int, ...]] = None) -> Tensor:
    # the matrices Newton–Schulz sees: each k × k slice of a kernel in the package's form
    # (kernel given), else the weight's matrix
    shape = kernel[-2:] if kernel is not None and h.form == "package" else m.shape[-2:]
    x = h.orthogonalize(m.reshape(-1, *shape), *shape).reshape(m.shape).float()
    if h.form == "package":
        return cosh_brake(x, h.gamma)  # by the whole weight's norm
    return x / (_rms(torch.cosh(x)) + 1e-8)


#: the step's scale per (rows, cols), by ``AdjustLR`` name
SCALES: Dict[str, Callable[[int, int, Hyper], float]] = {
    "original": lambda rows, cols, h: math.sqrt(max(1.0, rows / cols)),
    "match_rms_adamw": lambda rows, cols, h: h.root_scale * math.sqrt(max(rows, cols)),
    "none": lambda rows, cols, h: 1.0,
}


@dataclass(frozen=True)
class Rule:
    update: Callable[..., Tensor]  # (M, state, Hyper, kernel) -> U, as the functions above
    momentum: str = "ema"  # its momentum form (MomentumForm) unless the config says otherwise
    adjust_lr: str = "original"  # its scale (SCALES) unless the config says otherwise
    add_eps: bool = False  # its NS start X/(‖X‖ + eps) (NormEps.add) unless ns_norm_eps is set
    state: Tuple[str, ...] = ()  # per-parameter state beyond the momentum buffer (rows × 1)


RULES: Dict[str, Rule] = {
    "muon": Rule(muon_update),
    "normuon": Rule(normuon_update, add_eps=True, state=("row_second_moment",)),
    "root": Rule(root_update, momentum="sum", adjust_lr="match_rms_adamw", add_eps=True),
    "auon": Rule(auon_update, add_eps=True),
    "auon_hybrid": Rule(auon_hybrid_update),
}


def is_matrix(p: Tensor) -> bool:
    """Whether ``p`` takes an orthogonalised step: a non-empty weight of two dims or more."""
    return p.ndim >= 2 and p.numel() > 0


def matrix_shape(p: Tensor) -> Tuple[int, int]:
    """A weight as a matrix: rows = output units, a convolution's kernel flattened."""
    return p.shape[0], p[0].numel()


def stacks(params: Sequence[Tensor], batched: bool = True) -> List[List[int]]:
    """Indices of ``params`` that share one stack: equal shapes (or each alone)."""
    if not batched:
        return [[i] for i in range(len(params))]
    by_shape: Dict[tuple, List[int]] = OrderedDict()
    for i, p in enumerate(params):
        by_shape.setdefault(tuple(p.shape), []).append(i)
    return list(by_shape.values())


def orthogonalized_step(rule: Rule, h: Hyper, params: List[Tensor], grads: List[Tensor],
                        bufs: List[Tensor], state: Dict[str, List[Tensor]], lr, momentum: float,
                        nesterov: bool, weight_decay: float, batched: bool = True) -> None:
    """One step of ``rule`` for ``params`` (in place). ``lr``: a float, or a 0-d tensor (the
    compiled step takes it so, so that a changing lr neither recompiles nor syncs)."""
    if (h.momentum or rule.momentum) == "sum":
        torch._foreach_mul_(bufs, momentum)
        torch._foreach_add_(bufs, grads)
        moms = torch._foreach_add(grads, bufs, alpha=momentum) if nesterov else bufs
    else:
        torch._foreach_lerp_(bufs, grads, 1 - momentum)
        moms = torch._foreach_lerp(grads, bufs, momentum) if nesterov else bufs
    scale_of = SCALES[h.adjust_lr or rule.adjust_lr]
    by_scale: Dict[float, Tuple[List[Tensor], List[Tensor]]] = {}
    for idx in stacks(params, batched):
        rows, cols = matrix_shape(params[idx[0]])
        kernel = h.kernel_of(params[idx[0]])
        m = (moms[idx[0]].reshape(1, rows, cols) if len(idx) == 1
             else torch.stack([moms[i] for i in idx]).reshape(len(idx), rows, cols))
        u = rule.update(m, {k: [v[i] for i in idx] for k, v in state.items()}, h, kernel)
        # the aspect-ratio scale: of the matrix, or (kernel) of the weight's last two dims, as
        # the official Muon, NorMuon and AuON code reads it (1 for a square kernel)
        ps, us = by_scale.setdefault(scale_of(*(kernel[-2:] if kernel else (rows, cols)), h),
                                     ([], []))
        for i, ui in zip(idx, u.unbind(0)):
            ps.append(params[i])
            us.append(ui.view(params[i].shape))
    tensor_lr = isinstance(lr, Tensor)
    if h.renormalize:  # airbench: each weight rescaled to Frobenius norm √rows before its step
        torch._foreach_div_(params, torch._foreach_norm(params))
        torch._foreach_mul_(params, [math.sqrt(p.shape[0]) for p in params])
    if weight_decay:
        torch._foreach_mul_(params, 1 - lr * weight_decay)
    for scale, (ps, us) in by_scale.items():
        if tensor_lr:
            torch._foreach_add_(ps, torch._foreach_mul([u.to(p.dtype) for u, p in zip(us, ps)],
                                                       -lr * scale))
        else:
            torch._foreach_add_(ps, us, alpha=-lr * scale)


class OrthogonalizedMomentum(torch.optim.Optimizer):
    """One optimiser class for every rule of ``RULES`` (see the module docstring).

    ``compile_step(mode)`` compiles the step (``trainer.compile`` calls it); the learning rate
    then reaches it as a device tensor per param group."""

    def __init__(self, params, lr: float, rule: str = "muon", momentum: float = 0.95,
                 nesterov: bool = True, weight_decay: float = 0.0, batched: bool = True,
                 hyper: Optional[Hyper] = None, **hyper_kw):
        if rule not in RULES:
            raise ValueError(f"rule must be one of {sorted(RULES)}, got {rule!r}")
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)
        super().__init__(params, defaults)
        self.rule_name, self.rule, self.batched = rule, RULES[rule], batched
        self.hyper = hyper or Hyper(**hyper_kw)
        if self.hyper.add_eps is None:
            self.hyper = replace(self.hyper, add_eps=self.rule.add_eps)
        self._step_fn = orthogonalized_step
        self._lr_tensors: Optional[List[Tensor]] = None
        self._static = False  # CUDA graphs: the state's addresses are fixed
        self.register_load_state_dict_post_hook(OrthogonalizedMomentum._shape_buffers)

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        """Only weight matrices (and kernels, read as their flattened matrix) take an
        orthogonalised step: a vector, a scalar or an empty tensor has no polar factor, and a
        bias read as a column would be normalised, not orthogonalised. Refused here, naming
        the shape, as ``torch.optim.Muon`` refuses them (the runner hands them to
        ``optim.other``)."""
        params = param_group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        for i, p in enumerate(params):
            if isinstance(p, Tensor) and not is_matrix(p):
                raise ValueError(
                    f"{self.__class__.__name__}: parameter {i} of a group has shape "
                    f"{tuple(p.shape)}; an orthogonalised step needs a non-empty weight of at "
                    f"least two dims (a matrix, or a kernel read as out x (in*k*k)). Give "
                    f"vectors, scalars and empty weights to another optimiser (AdamW, SGD)")
        super().add_param_group(param_group)

    @property
    def own_shaped_state(self) -> Tuple[str, ...]:
        """The state keys whose shapes are not the weight's, checked on load (``_shape_buffers``)."""
        return tuple(self.rule.state)

    def _row_state_shape(self, p: Tensor) -> Tuple[int, ...]:
        """The shape of a rule's row statistics for ``p``: rows × 1, or (a kernel read as its
        own shape) out × in × k × 1, as the official NorMuon keeps them."""
        kernel = self.hyper.kernel_of(p)
        return (*kernel[:-1], 1) if kernel else (p.shape[0], 1)

    @staticmethod
    def _shape_buffers(opt: "OrthogonalizedMomentum") -> None:
        """Momentum buffers saved as the flattened matrix (an earlier format) take the
        parameter's shape again; the values are the same (a row-major reshape). Row statistics
        of the other ``conv_shape``, or none where the rule keeps them (another rule's state),
        cannot be converted: a clear error, not a broadcast or a failure at the next step."""
        for group in opt.param_groups:
            for p in group["params"]:
                st = opt.state.get(p, {})
                buf = st.get("momentum_buffer")
                if buf is not None and buf.shape != p.shape:
                    st["momentum_buffer"] = buf.reshape(p.shape).to(
                        memory_format=_memory_format(p))
                want = opt._row_state_shape(p)
                for k in opt.rule.state:
                    if buf is not None and k not in st:
                        raise CheckpointError(
                            f"the checkpoint's state for a weight of shape {tuple(p.shape)} has a "
                            f"momentum buffer but no {k}, which {opt.rule_name} keeps: it was "
                            f"trained by another optimiser. Resume with the optim= it was "
                            f"trained with, or start a new run")
                    if k in st and tuple(st[k].shape) != want:
                        raise CheckpointError(
                            f"the checkpoint's {opt.rule_name} {k} for a weight of shape "
                            f"{tuple(p.shape)} has shape {tuple(st[k].shape)}, this run's "
                            f"optim.conv_shape={opt.hyper.conv_shape} keeps {want}: resume with "
                            f"the optim.conv_shape the checkpoint was trained with (the other "
                            f"of kernel and matrix), or start a new run")

    def compile_step(self, mode: Optional[str] = "default", **kw) -> None:
        """Compile the step as one graph (``torch.compile(fullgraph=True)``); ``kw`` reaches
        ``torch.compile`` (e.g. ``backend``)."""
        self._step_fn = torch.compile(orthogonalized_step, fullgraph=True, mode=mode, **kw)
        self._lr_tensors = [torch.zeros((), device=g["params"][0].device)
                            for g in self.param_groups]
        self._static = mode in ("reduce-overhead", "max-autotune")
        if self._static:  # CUDA graphs: parameters and state keep their addresses
            for group in self.param_groups:
                for p in group["params"]:
                    torch._dynamo.mark_static_address(p)
            for st in self.state.values():
                for t in st.values():
                    torch._dynamo.mark_static_address(t)

    def _state_lists(self, params: List[Tensor]) -> Tuple[List[Tensor], Dict[str, List[Tensor]]]:
        bufs = []
        extra: Dict[str, List[Tensor]] = {k: [] for k in self.rule.state}
        for p in params:
            st = self.state[p]
            if "momentum_buffer" not in st:
                st["momentum_buffer"] = torch.zeros_like(p, memory_format=_memory_format(p))
                for k in self.rule.state:
                    st[k] = torch.zeros(self._row_state_shape(p), device=p.device,
                                        dtype=torch.float32)
                if self._static:
                    for t in [st["momentum_buffer"], *(st[k] for k in self.rule.state)]:
                        torch._dynamo.mark_static_address(t)
            bufs.append(st["momentum_buffer"])
            for k in self.rule.state:
                extra[k].append(st[k])
        return bufs, extra

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for gi, group in enumerate(self.param_groups):
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            bufs, extra = self._state_lists(params)
            lr = group["lr"]
            if self._lr_tensors is not None:
                lr = self._lr_tensors[gi]
                lr.fill_(group["lr"])
            self._step_fn(self.rule, self.hyper, params, [p.grad for p in params], bufs, extra,
                          lr, group["momentum"], group["nesterov"], group["weight_decay"],
                          self.batched)
        return loss


def _memory_format(p: Tensor):
    return (torch.channels_last if p.ndim == 4 and not p.is_contiguous()
            and p.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format)


# ------------------------------------------------------------------ schemas and builders
@dataclass
class OrthoConfig(OptimConfig):
    """Shared by the orthogonalised optimisers; each one's schema sets its own defaults."""

    lr: float = 0.02  # for the orthogonalised roles
    momentum: float = 0.95
    nesterov: bool = True
    weight_decay: float = 0.0  # decoupled, on the orthogonalised roles
    eps: float = 1e-7
    batched: bool = True  # one step per stack of same-shape matrices (false: one at a time)
    roles: List[str] = field(default_factory=lambda: ["hidden"])  # updated orthogonally
    # the other parameters (stem, 1-D, heads, method-owned without an optimiser of their own)
    other: Other = Other.adamw
    other_lr: float = 1e-3
    other_weight_decay: float = 0.0
    other_momentum: float = 0.9  # with other=sgd
    other_nesterov: bool = False  # with other=sgd
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])  # with other=adamw
    warmup_epochs: float = 1.0
    momentum_form: Optional[MomentumForm] = None  # null: the rule's own (ROOT sum, others ema)
    adjust_lr: Optional[AdjustLR] = None  # null: the rule's own scale per matrix shape
    renormalize: bool = False  # each weight to Frobenius norm √rows before its step (airbench)
    # how a convolution kernel is seen after Newton–Schulz: matrix (its flattened matrix
    # throughout) or kernel (its own shape where the official code reads it); the plugins'
    # yaml choose their official code's, this default is the behaviour before the key existed
    conv_shape: ConvShape = ConvShape.matrix
    checks: ClassVar[list] = (positive("other_lr", "eps") + at_least(0, "other_weight_decay")
                              + in_unit_interval("momentum", "other_momentum")
                              + [("betas", lambda v: len(v) == 2 and all(0 <= b < 1 for b in v),
                                  "two values in [0, 1)"),
                                 ("roles", check_roles, "a non-empty list of parameter roles ("
                                  + ", ".join(ROLES) + ")")])


@dataclass
class NSConfig(OrthoConfig):
    """The rules that orthogonalise by Newton–Schulz."""

    ns_steps: Optional[int] = 5
    ns_dtype: Optional[NSDtype] = NSDtype.bf16
    ns_coefficients: NSCoefficients = NSCoefficients.original
    ns_norm_eps: Optional[NormEps] = None  # null: the rule's own (NorMuon, ROOT add; others clamp)
    checks: ClassVar[list] = [
        ("ns_steps", lambda v: v is None or 1 <= v <= 100, "in [1, 100]")]


@dataclass
class NorMuonConfig(NSConfig):
    beta2: float = 0.95
    norm_eps: float = 1e-10
    checks: ClassVar[list] = in_unit_interval("beta2") + positive("norm_eps")


@dataclass
class ROOTConfig(NSConfig):
    ns_dtype: Optional[NSDtype] = NSDtype.grad  # the gradient's dtype, as the official code
    root_quantile: float = 0.9  # ε = this quantile of |M|; entries beyond it are outliers
    root_scale: float = 0.2  # update RMS matching: η·scale·√max(rows, cols)
    # shape-fitted Newton–Schulz coefficients ("ROWSxCOLS": [a, b, c]); others: ns_coefficients
    # (values typed loosely: [3, -4, 2] as well as floats; parse_coefficient_table checks them)
    root_coefficients: Dict[str, Any] = field(
        default_factory=lambda: {k: list(v) for k, v in ROOT_COEFFICIENTS.items()})
    checks: ClassVar[list] = positive("root_scale") + [
        ("root_quantile", lambda v: 0 < v <= 1, "in (0, 1]"),
        ("root_coefficients", lambda v: parse_coefficient_table(v) is not None,
         "a table ROWSxCOLS: [a, b, c]")]


@dataclass
class AuONConfig(OrthoConfig):
    """AuON: no Newton–Schulz; its map stands where Newton–Schulz stands (in the paper's script,
    inside the function of that name), and ``ns_dtype`` is the dtype it runs in."""

    auon_form: Form = Form.paper
    ns_dtype: Optional[NSDtype] = None  # null: the form's (paper bf16, package grad)
    brake_gamma: Optional[float] = None  # package form: the brake's scale γ (null: 1.5)
    checks: ClassVar[list] = [
        ("brake_gamma", lambda v: v is None or v > 0, "> 0 or null")]


@dataclass
class AuONHybridConfig(NSConfig):
    hybrid_form: Form = Form.paper
    ns_steps: Optional[int] = None  # null: the form's (paper 1, package 5)
    ns_dtype: Optional[NSDtype] = None  # null: the form's (paper bf16, package grad)
    brake_gamma: Optional[float] = None  # package form: the brake's scale γ (null: 1.5)
    checks: ClassVar[list] = [
        ("brake_gamma", lambda v: v is None or v > 0, "> 0 or null")]


#: the key that chooses the form, of the rules that have two (``Form``)
_FORM_KEYS = {"auon": "auon_form", "auon_hybrid": "hybrid_form"}
#: per rule and form: the defaults its official code uses for the keys left null
_FORM_DEFAULTS = {
    ("auon", "paper"): dict(ns_dtype="bf16"),
    ("auon", "package"): dict(ns_dtype="grad", adjust_lr="none"),
    ("auon_hybrid", "paper"): dict(ns_steps=1, ns_dtype="bf16", add_eps=True,
                                   adjust_lr="original"),
    ("auon_hybrid", "package"): dict(ns_steps=5, ns_dtype="grad", add_eps=True,
                                     adjust_lr="none"),
}


def _form(rule: str, cfg) -> Optional[str]:
    key = _FORM_KEYS.get(rule)
    return str(getattr(cfg, key)) if key else None


def check_config(rule: str, cfg) -> None:
    """Cross-key checks of an orthogonalised optimiser's config (the pre-flight runs them)."""
    form = _form(rule, cfg)
    if form is not None and getattr(cfg, "brake_gamma", None) is not None and form != "package":
        key = _FORM_KEYS[rule]
        raise ConfigError(f"optim.brake_gamma={cfg.brake_gamma} only applies to "
                          f"optim.{key}=package (the paper's form has no scale inside "
                          f"cosh): set optim.{key}=package or leave optim.brake_gamma null")
    if rule == "root":
        parse_coefficient_table(cfg.root_coefficients)
    if str(cfg.other) == "sgd":
        check_nesterov(cfg, "other_nesterov", "other_momentum")
    if rule in _MATRIX_ONLY and str(cfg.conv_shape) == "kernel":
        raise ConfigError(f"optim.conv_shape=kernel: {rule}'s official code takes only matrices, "
                          f"so there is no kernel form to follow; set optim.conv_shape=matrix "
                          f"(a convolution as its flattened out x (in*k*k) matrix)")


#: the rules whose official code takes no convolution kernel (conv_shape=kernel is refused)
_MATRIX_ONLY = ("root",)


def _opt(v) -> Optional[str]:
    return None if v is None else str(v)


def hyper_from_config(rule: str, cfg) -> Hyper:
    """The settings of ``rule`` from its (plain) config."""
    check_config(rule, cfg)
    kw = dict(eps=float(cfg.eps), momentum=_opt(cfg.momentum_form),
              adjust_lr=_opt(cfg.adjust_lr), renormalize=bool(cfg.renormalize),
              conv_shape=str(cfg.conv_shape))
    form_name = _form(rule, cfg)
    form = _FORM_DEFAULTS.get((rule, form_name), {})
    if hasattr(cfg, "ns_dtype"):
        dtype = str(cfg.ns_dtype) if cfg.ns_dtype is not None else form.get("ns_dtype", "bf16")
        kw.update(ns_dtype=_DTYPES[dtype])
    if hasattr(cfg, "ns_steps"):
        steps = cfg.ns_steps if cfg.ns_steps is not None else form.get("ns_steps", 5)
        # null and no form default: the rule's own, which the optimiser fills in
        add = (str(cfg.ns_norm_eps) == "add" if cfg.ns_norm_eps is not None
               else form.get("add_eps"))
        kw.update(ns_steps=int(steps),
                  coefficients=NS_COEFFICIENTS[str(cfg.ns_coefficients)], add_eps=add)
    if kw["adjust_lr"] is None:  # null: the form's, else the rule's own
        kw["adjust_lr"] = form.get("adjust_lr")
    if rule == "normuon":
        kw.update(beta2=float(cfg.beta2), norm_eps=float(cfg.norm_eps))
    if rule == "root":
        kw.update(root_quantile=float(cfg.root_quantile), root_scale=float(cfg.root_scale),
                  shape_coefficients=tuple(parse_coefficient_table(cfg.root_coefficients).items()))
    if form_name is not None:
        kw.update(form=form_name,
                  gamma=1.5 if cfg.brake_gamma is None else float(cfg.brake_gamma))
    return Hyper(**kw)


def _split(groups: List[ParamGroup], cfg):
    orth = [g for g in groups if g.role in cfg.roles and all(map(is_matrix, g.params))]
    rest = [g for g in groups if g not in orth]
    return orth, rest


def _other_optimizer(rest: List[ParamGroup], cfg, device):
    """AdamW or SGD (``optim.other``) for the roles that are not orthogonalised."""
    if not rest:
        return []

    def groups():  # fresh dicts for each try (a failed fused build may have touched them)
        return torch_groups(rest, cfg, lr=cfg.other_lr, weight_decay=cfg.other_weight_decay)

    if str(cfg.other) == "sgd":
        make = lambda kw: torch.optim.SGD(groups(), lr=cfg.other_lr,  # noqa: E731
                                          momentum=cfg.other_momentum,
                                          nesterov=cfg.other_nesterov, **kw)
    else:
        make = lambda kw: torch.optim.AdamW(groups(), lr=cfg.other_lr,  # noqa: E731
                                            betas=tuple(cfg.betas), **kw)
    return [with_fused_fallback(make, cfg, device)]


def _builder(rule: str):
    def build(groups: List[ParamGroup], cfg, device):
        orth, rest = _split(groups, cfg)
        if not orth:
            present = sorted({g.role for g in groups if g.params})
            raise ConfigError(f"optim={rule}: optim.roles={list(cfg.roles)} selects no trainable "
                              f"weight matrix, so nothing would be updated by {rule} (the rest "
                              f"would train with optim.other={cfg.other} alone); the roles with "
                              f"trainable parameters here: {', '.join(present) or 'none'}")
        unmatched = [r for r in cfg.roles if not any(g.role == r for g in orth)]
        if unmatched:
            import logging

            logging.getLogger("ortho_run").warning(
                "optim.roles: %s match no trainable weight matrix of this run (updated by %s: "
                "%s)", ", ".join(unmatched), rule, ", ".join(g.role for g in orth))
        opt = OrthogonalizedMomentum(
            torch_groups(orth, cfg), lr=cfg.lr, rule=rule, momentum=cfg.momentum,
            nesterov=cfg.nesterov, weight_decay=cfg.weight_decay, batched=cfg.batched,
            hyper=hyper_from_config(rule, cfg))
        return [opt] + _other_optimizer(rest, cfg, device)

    def check(run_cfg) -> None:  # the pre-flight's (validate): this rule's cross-key checks
        from omegaconf import OmegaConf

        check_config(rule, OmegaConf.to_object(run_cfg.optim))

    build.check = check
    return build


OPTIMIZERS.register("muon", schema=NSConfig)(_builder("muon"))
OPTIMIZERS.register("normuon", schema=NorMuonConfig)(_builder("normuon"))
OPTIMIZERS.register("root", schema=ROOTConfig)(_builder("root"))
OPTIMIZERS.register("auon", schema=AuONConfig)(_builder("auon"))
OPTIMIZERS.register("auon_hybrid", schema=AuONHybridConfig)(_builder("auon_hybrid"))
