"""Orthogonalised optimisers: ``optim=muon | normuon | root | auon | auon_hybrid``.

Each updates the parameters of the roles in ``optim.roles`` (default: the backbone's hidden
weights, ``hidden``) with an orthogonalised momentum step, and every other parameter (the stem,
biases and norms, the method's head) with AdamW or SGD (``optim.other``), all scheduled
together. A weight with more than two dims (a convolution kernel, out × in × k × k) is updated
as the matrix out × (in·k·k) and reshaped back. Method-owned parameters that name their own
optimiser (GCR's bases) keep it.

- ``muon`` — Muon (K. Jordan et al. 2024; ``torch.optim.Muon``): B ← μB + (1 − μ)G (an EMA),
  U = NS₅(G + μ(B − G)) with Nesterov (else NS₅(B)), W ← W(1 − ηλ) − η·√max(1, rows/cols)·U.
  NS₅ is the quintic Newton–Schulz iteration with (a, b, c) = (3.4445, −4.7750, 2.0315) on
  X/‖X‖_F, run in bf16 as the official code (``ns_dtype=fp32`` for full precision). On 2-D
  weights this is ``torch.optim.Muon``'s step to the bit (tested); defaults μ = 0.95, η = 0.02.
- ``normuon`` — NorMuon (Li et al. 2025, zichongli5/NorMuon): after NS₅, a per-row (neuron)
  second-moment EMA v ← β₂v + (1 − β₂)·mean_j(U²_ij) (β₂ = 0.95, no bias correction, ε = 1e-10)
  normalises each row, Û = U/(√v + ε); as the official code, Û is then rescaled to U's
  Frobenius norm (the paper instead states an update RMS of 0.2·η: not what its code does).
- ``root`` — ROOT (He et al. 2025, huawei-noah/noah-research ROOT): M ← μM + G (a plain sum),
  the outliers O = T_ε[M] (soft-thresholding) are split off with ε the ``root_quantile`` (0.9)
  quantile of |M|, only the clipped part B = M − O = clamp(M, −ε, ε) is orthogonalised,
  W ← W − η·0.2·√max(rows, cols)·NS(B) (the code's RMS-matching scale). Its shape-fitted
  Newton–Schulz coefficients exist only for a few LLM matrix shapes, none of which a CNN here
  has: ``root_coefficients`` (``{"ROWSxCOLS": [a, b, c]}``) supplies such a table, and any
  other shape uses Muon's coefficients, as the official code does.
- ``auon`` — AuON (the paper's form, ryyzn9/AuON): X = M/‖M‖_F from the Nesterov momentum,
  U = X / rms(cosh X) (element-wise cosh), W ← W − η·√max(1, rows/cols)·U; linear time, and
  ‖U‖₂ ≤ ‖X‖_F / rms(cosh X) ≤ 1 since cosh ≥ 1. (The repository's current class drops the
  normalisation and uses γ 1.5, η 0.24: we follow the paper.)
- ``auon_hybrid`` — U as AuON, then ``hybrid_ns_steps`` Newton–Schulz steps (the paper: one;
  its code: five).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from ortho_run.config import Choice, OptimConfig, at_least, positive
from ortho_run.optim.base import OPTIMIZERS, ParamGroup, torch_groups, with_fused_fallback

MUON_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


class NSDtype(Choice):
    bf16 = "bf16"  # the official code's
    fp32 = "fp32"


class Other(Choice):
    adamw = "adamw"
    sgd = "sgd"


def newton_schulz(g: Tensor, steps: int = 5, coefficients=MUON_COEFFICIENTS,
                  eps: float = 1e-7, dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """Orthogonalise a 2-D ``g`` by Newton–Schulz: X ← aX + (bA + cA²)X with A = XXᵀ, from
    X = g/‖g‖_F (on the wide orientation). With Muon's coefficients the singular values land in
    about [0.7, 1.2] rather than at 1 (a steeper slope at 0 for fewer steps); with the cubic
    (1.5, −0.5, 0) they converge to 1. Returns a tensor of ``dtype``."""
    a, b, c = coefficients
    x = g.to(dtype)
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


def matrix_view(t: Tensor) -> Tensor:
    """A weight as a matrix: rows = output units, a convolution's kernel flattened."""
    return t.reshape(t.shape[0], -1)


@dataclass
class OrthoConfig(OptimConfig):
    """Shared by the orthogonalised optimisers; each one's schema sets its own defaults."""

    lr: float = 0.02  # for the orthogonalised roles
    momentum: float = 0.95
    nesterov: bool = True
    weight_decay: float = 0.0  # decoupled, on the orthogonalised roles
    ns_steps: int = 5
    ns_dtype: NSDtype = NSDtype.bf16
    eps: float = 1e-7
    roles: List[str] = field(default_factory=lambda: ["hidden"])  # updated orthogonally
    # the other parameters (stem, 1-D, heads, method-owned without an optimiser of their own)
    other: Other = Other.adamw
    other_lr: float = 1e-3
    other_weight_decay: float = 0.0
    other_momentum: float = 0.9  # with other=sgd
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])  # with other=adamw
    warmup_epochs: float = 1.0
    checks: ClassVar[list] = (positive("other_lr", "eps") + at_least(1, "ns_steps")
                              + at_least(0, "other_weight_decay")
                              + [("momentum", lambda v: 0 <= v < 1, "in [0, 1)")])


@dataclass
class NorMuonConfig(OrthoConfig):
    beta2: float = 0.95
    norm_eps: float = 1e-10
    checks: ClassVar[list] = OrthoConfig.checks + [("beta2", lambda v: 0 <= v < 1, "in [0, 1)")]


@dataclass
class ROOTConfig(OrthoConfig):
    root_quantile: float = 0.9  # ε = this quantile of |M|; entries beyond it are outliers
    root_scale: float = 0.2  # update RMS matching: η·scale·√max(rows, cols)
    root_coefficients: Dict[str, List[float]] = field(default_factory=dict)
    checks: ClassVar[list] = OrthoConfig.checks + [
        ("root_quantile", lambda v: 0 < v <= 1, "in (0, 1]")]


@dataclass
class AuONConfig(OrthoConfig):
    hybrid_ns_steps: int = 1  # auon_hybrid: the paper's one step (its code: 5)


class OrthogonalizedMomentum(torch.optim.Optimizer):
    """One optimiser class, five update rules (``rule``); see the module docstring."""

    RULES = ("muon", "normuon", "root", "auon", "auon_hybrid")

    def __init__(self, params, lr: float, rule: str = "muon", momentum: float = 0.95,
                 nesterov: bool = True, weight_decay: float = 0.0, ns_steps: int = 5,
                 ns_dtype: torch.dtype = torch.bfloat16, eps: float = 1e-7,
                 beta2: float = 0.95, norm_eps: float = 1e-10, root_quantile: float = 0.9,
                 root_scale: float = 0.2, root_coefficients: Optional[Dict[str, List]] = None,
                 hybrid_ns_steps: int = 1):
        if rule not in self.RULES:
            raise ValueError(f"rule must be one of {self.RULES}, got {rule!r}")
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)
        super().__init__(params, defaults)
        self.rule, self.ns_steps, self.ns_dtype, self.eps = rule, ns_steps, ns_dtype, eps
        self.beta2, self.norm_eps = beta2, norm_eps
        self.root_quantile, self.root_scale = root_quantile, root_scale
        self.root_coefficients = {k: tuple(v) for k, v in (root_coefficients or {}).items()}
        self.hybrid_ns_steps = hybrid_ns_steps

    def coefficients(self, shape: Tuple[int, int]) -> Tuple[float, float, float]:
        """Newton–Schulz coefficients for a matrix of ``shape`` (ROOT's table, else Muon's)."""
        if self.rule == "root":
            return self.root_coefficients.get(f"{shape[0]}x{shape[1]}", MUON_COEFFICIENTS)
        return MUON_COEFFICIENTS

    def _ns(self, x: Tensor, steps: int) -> Tensor:
        return newton_schulz(x, steps, self.coefficients(tuple(x.shape)), self.eps, self.ns_dtype)

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                update, scale = self._direction(p, group, mu)
                if wd:
                    p.mul_(1 - lr * wd)
                p.add_(update.reshape(p.shape).to(p.dtype), alpha=-lr * scale)
        return loss

    def _direction(self, p: Tensor, group: dict, mu: float) -> Tuple[Tensor, float]:
        g = matrix_view(p.grad)
        rows, cols = g.shape
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(g)
        buf = state["momentum_buffer"]
        if self.rule == "root":  # a plain sum, outliers split off by soft-thresholding
            buf.mul_(mu).add_(g)
            flat = buf.abs().flatten().float()
            k = max(1, int(math.ceil(self.root_quantile * flat.numel())))
            eps = flat.kthvalue(k).values.to(buf.dtype)
            base = torch.maximum(torch.minimum(buf, eps), -eps)  # M − T_ε[M]
            return self._ns(base, self.ns_steps), self.root_scale * math.sqrt(max(rows, cols))
        buf.lerp_(g, 1 - mu)
        m = g.lerp(buf, mu) if group["nesterov"] else buf
        scale = math.sqrt(max(1.0, rows / cols))
        if self.rule in ("muon", "normuon"):
            u = self._ns(m, self.ns_steps)
            if self.rule == "normuon":
                u = u.float()
                if "row_second_moment" not in state:
                    state["row_second_moment"] = torch.zeros(rows, 1, device=u.device)
                v = state["row_second_moment"]
                v.mul_(self.beta2).add_(u.pow(2).mean(dim=1, keepdim=True), alpha=1 - self.beta2)
                normed = u / (v.sqrt() + self.norm_eps)
                u = normed * (u.norm() / normed.norm().clamp(min=1e-30))  # Muon's Frobenius norm
            return u, scale
        x = m.float() / m.float().norm().clamp(min=self.eps)
        u = x / torch.cosh(x).pow(2).mean().sqrt()
        if self.rule == "auon_hybrid":
            u = self._ns(u, self.hybrid_ns_steps)
        return u, scale


def _split(groups: List[ParamGroup], cfg):
    orth = [g for g in groups if g.role in cfg.roles and all(p.ndim >= 2 for p in g.params)]
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
                                          momentum=cfg.other_momentum, **kw)
    else:
        make = lambda kw: torch.optim.AdamW(groups(), lr=cfg.other_lr,  # noqa: E731
                                            betas=tuple(cfg.betas), **kw)
    return [with_fused_fallback(make, cfg, device)]


def _builder(rule: str):
    def build(groups: List[ParamGroup], cfg, device):
        orth, rest = _split(groups, cfg)
        out = []
        if orth:
            extra = {}
            if rule == "normuon":
                extra = dict(beta2=cfg.beta2, norm_eps=cfg.norm_eps)
            elif rule == "root":
                extra = dict(root_quantile=cfg.root_quantile, root_scale=cfg.root_scale,
                             root_coefficients=dict(cfg.root_coefficients))
            elif rule == "auon_hybrid":
                extra = dict(hybrid_ns_steps=cfg.hybrid_ns_steps)
            out.append(OrthogonalizedMomentum(
                torch_groups(orth, cfg), lr=cfg.lr, rule=rule, momentum=cfg.momentum,
                nesterov=cfg.nesterov, weight_decay=cfg.weight_decay, ns_steps=cfg.ns_steps,
                ns_dtype=torch.bfloat16 if str(cfg.ns_dtype) == "bf16" else torch.float32,
                eps=cfg.eps, **extra))
        return out + _other_optimizer(rest, cfg, device)

    return build


OPTIMIZERS.register("muon", schema=OrthoConfig)(_builder("muon"))
OPTIMIZERS.register("normuon", schema=NorMuonConfig)(_builder("normuon"))
OPTIMIZERS.register("root", schema=ROOTConfig)(_builder("root"))
OPTIMIZERS.register("auon", schema=AuONConfig)(_builder("auon"))
OPTIMIZERS.register("auon_hybrid", schema=AuONConfig)(_builder("auon_hybrid"))
