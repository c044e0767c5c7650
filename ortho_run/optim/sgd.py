"""``optim=sgd``: SGD with momentum (optionally Nesterov) for every role."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ortho_run.config import OptimConfig, in_unit_interval
from ortho_run.optim.base import OPTIMIZERS, check_nesterov, torch_groups, with_fused_fallback


@dataclass
class SGDConfig(OptimConfig):
    name: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    # Linear warm-up. EBV's official recipe warms up (5 epochs on ImageNet); without it EBV at
    # lr 0.1 can stall on digits (cos/0.07 logits, growing ||h||). Same for every method.
    warmup_epochs: float = 2.0
    checks: ClassVar[list] = in_unit_interval("momentum")


@OPTIMIZERS.register("sgd", schema=SGDConfig)
def build_sgd(groups, cfg, device):
    return [with_fused_fallback(
        lambda kw: torch.optim.SGD(torch_groups(groups, cfg), lr=cfg.lr, momentum=cfg.momentum,
                                   nesterov=cfg.nesterov, weight_decay=cfg.weight_decay, **kw),
        cfg, device)]


build_sgd.check = lambda run_cfg: check_nesterov(run_cfg.optim)  # the pre-flight's
