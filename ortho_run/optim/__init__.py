"""Optimisers and schedules (``optim=<name>``): role-tagged parameter groups in, a list of
optimisers out. Adding an optimiser is one file here that registers its builder and schema in
``OPTIMIZERS`` (found by discovery) plus one yaml in ``conf/optim/``."""

from ortho_run.optim.base import (OPTIMIZERS, ROLES, SCHEDULES, ParamGroup, backbone_groups,
                                  build_optimizers, optimizer_kind, restore_optimizer,
                                  torch_groups)
from ortho_run.optim.schedules import build_scheduler, lr_factor, schedule_at

__all__ = ["OPTIMIZERS", "ROLES", "SCHEDULES", "ParamGroup", "backbone_groups",
           "build_optimizers", "build_scheduler", "lr_factor", "optimizer_kind",
           "restore_optimizer", "schedule_at", "torch_groups"]
