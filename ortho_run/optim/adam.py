"""``optim=adam`` and ``optim=adamw`` for every role."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, List

import torch

from ortho_run.config import OptimConfig
from ortho_run.optim.base import OPTIMIZERS, torch_groups, with_fused_fallback


def _betas_ok(v) -> bool:
    return len(v) == 2 and all(0 <= b < 1 for b in v)


@dataclass
class AdamConfig(OptimConfig):
    name: str = "adam"
    lr: float = 1e-3
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    checks: ClassVar[list] = [("betas", _betas_ok, "two values in [0, 1)"),
                              ("eps", lambda v: v > 0, "> 0")]


@dataclass
class AdamWConfig(AdamConfig):
    name: str = "adamw"
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0


def _adam(cls):
    def build(groups, cfg, device):
        return [with_fused_fallback(
            lambda kw: cls(torch_groups(groups, cfg), lr=cfg.lr, betas=tuple(cfg.betas),
                           eps=cfg.eps, weight_decay=cfg.weight_decay, **kw), cfg, device)]

    return build


OPTIMIZERS.register("adam", schema=AdamConfig)(_adam(torch.optim.Adam))
OPTIMIZERS.register("adamw", schema=AdamWConfig)(_adam(torch.optim.AdamW))
