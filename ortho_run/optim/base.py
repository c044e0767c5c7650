"""Optimiser and schedule registries, and the role-tagged parameter groups they take.

Every parameter of a job reaches the optimisers in a ``ParamGroup`` tagged with its role:

- ``stem``: the backbone's first weight matrix/kernel (the input layer);
- ``hidden``: the backbone's other weights with two or more dims (convolutions, linear layers);
- ``backbone_1d``: the backbone's biases and normalisation parameters;
- ``head``: parameters a method trains with the configured optimiser (its classifier);
- ``method``: method-owned parameters with an optimiser of their own, named by the group (GCR's
  bases ask for ``grassmann_sgd``).

An optimiser plugin is a builder ``(groups, cfg, device) -> [torch.optim.Optimizer, ...]``
registered in ``OPTIMIZERS`` with its schema, so one that treats roles differently (Muon-style:
orthogonalised updates for ``hidden``, AdamW for the rest) returns several optimisers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import nn

from ortho_run.config import BACKBONE_ROLES, ROLES, OptimConfig
from ortho_run.errors import ConfigError
from ortho_run.registry import Registry

log = logging.getLogger("ortho_run")

OPTIMIZERS: Registry[Callable[..., List[torch.optim.Optimizer]]] = Registry(
    "optimiser", group="optim", package="ortho_run.optim", base_schema=OptimConfig)
#: name -> factor(cfg, step, steps_per_epoch, max_epochs) after the warm-up
SCHEDULES: Registry[Callable[..., float]] = Registry("schedule", package="ortho_run.optim")


@dataclass
class ParamGroup:
    role: str
    params: List[torch.Tensor]
    optimizer: Optional[str] = None  # a registered optimiser by name; None: the configured one
    lr_scale: float = 1.0  # this group's lr = optim.lr x lr_scale (then scheduled)
    weight_decay: Optional[float] = None  # None: optim.weight_decay
    options: Dict[str, Any] = field(default_factory=dict)  # for the named optimiser
    # this group's schedule runs over its first ``schedule_epochs`` epochs, then its lr stays
    # 0 (airbench's whitening bias); None: over the whole run
    schedule_epochs: Optional[float] = None

    def __post_init__(self):
        if self.role not in ROLES:
            raise ValueError(f"unknown parameter role {self.role!r}; roles: {', '.join(ROLES)}")


def check_roles(roles) -> bool:
    """A schema check: ``roles`` is a non-empty list of known parameter roles."""
    return bool(roles) and all(str(r) in ROLES for r in roles)


def backbone_groups(backbone: nn.Module) -> List[ParamGroup]:
    """The trainable backbone parameters by role: stem, hidden (>= 2-D), backbone_1d."""
    roles: Dict[str, List[torch.Tensor]] = {r: [] for r in BACKBONE_ROLES}
    for p in backbone.parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2:
            roles["backbone_1d"].append(p)
        elif not roles["stem"]:
            roles["stem"].append(p)
        else:
            roles["hidden"].append(p)
    return [ParamGroup(role, ps) for role, ps in roles.items() if ps]


def torch_groups(groups: List[ParamGroup], cfg, lr: Optional[float] = None,
                 weight_decay: Optional[float] = None) -> List[dict]:
    """torch param-group dicts, lr and weight decay resolved: from ``cfg`` (or the ``lr`` and
    ``weight_decay`` given for these groups), a role's own ``optim.role_lr`` /
    ``optim.role_weight_decay`` where set, then the group's ``lr_scale`` and own weight decay.
    Groups whose settings are equal share one torch group (its ``role`` lists theirs, e.g.
    ``stem+hidden``): a fused optimiser launches its kernels per group, so a split that changes
    nothing would only cost launches."""
    base_lr = cfg.lr if lr is None else lr
    base_wd = cfg.weight_decay if weight_decay is None else weight_decay
    role_lr = dict(getattr(cfg, "role_lr", None) or {})
    role_wd = dict(getattr(cfg, "role_weight_decay", None) or {})
    out: List[dict] = []
    for g in groups:
        if not g.params:
            continue
        lr = role_lr.get(g.role, base_lr) * g.lr_scale
        wd = g.weight_decay if g.weight_decay is not None else role_wd.get(g.role, base_wd)
        same = next((t for t in out if t["lr"] == lr and t["weight_decay"] == wd
                     and t["schedule_epochs"] == g.schedule_epochs), None)
        if same is not None:
            same["params"] += list(g.params)
            same["role"] += f"+{g.role}"
        else:
            out.append({"params": list(g.params), "lr": lr, "weight_decay": wd, "role": g.role,
                        "schedule_epochs": g.schedule_epochs})
    return out


def build_optimizers(groups: List[ParamGroup], cfg, device: torch.device
                     ) -> List[torch.optim.Optimizer]:
    """One or more optimisers for ``groups``: each group goes to the optimiser it names, the
    others to the configured one (``optim=<name>``)."""
    present = {g.role for g in groups if g.params}
    for key in ("role_lr", "role_weight_decay"):
        absent = sorted(set(getattr(cfg, key, None) or {}) - present)
        if absent:
            log.warning("optim.%s: %s name no role with trainable parameters here (roles: %s)",
                        key, ", ".join(absent), ", ".join(sorted(present)))
    by_name: Dict[str, List[ParamGroup]] = {}
    for g in groups:
        if g.params:
            by_name.setdefault(g.optimizer or str(cfg.name), []).append(g)
    out: List[torch.optim.Optimizer] = []
    for name, gs in by_name.items():
        out += OPTIMIZERS.get(name)(gs, cfg, device)
    return out


def check_nesterov(cfg, nesterov: str = "nesterov", momentum: str = "momentum") -> None:
    """A pre-flight check: torch's SGD takes Nesterov's step only with a momentum (it looks
    ahead along it); refused naming both keys, not by torch once the run has started."""
    if getattr(cfg, nesterov) and not getattr(cfg, momentum) > 0:
        raise ConfigError(f"optim.{nesterov}=true needs optim.{momentum} > 0 (got "
                          f"{getattr(cfg, momentum)}): Nesterov's step looks ahead along the "
                          f"momentum; set optim.{momentum} or optim.{nesterov}=false")


def optimizer_kind(opt: torch.optim.Optimizer) -> str:
    """What a checkpoint records of an optimiser, so that a resume can tell whether the state it
    holds fits this run's: the class, and the rule where one class serves several."""
    rule = getattr(opt, "rule_name", None)
    return type(opt).__name__ + (f"({rule})" if rule else "")


def restore_optimizer(opt: torch.optim.Optimizer, saved: dict) -> None:
    """Load a checkpoint's optimiser state ``saved`` into ``opt`` under ``opt``'s own settings:
    the per-parameter state (momentum buffers, moments, step counts) comes from ``saved``, every
    setting of the param groups (lr, momentum, betas, weight decay, role, ...) stays as this
    run's config made it. For the config the checkpoint was trained with the two are the same;
    a forced resume under a changed config trains with what the config says."""
    groups = saved["param_groups"]
    if len(groups) != len(opt.param_groups):
        raise ValueError(f"the checkpoint's {optimizer_kind(opt)} has {len(groups)} parameter "
                         f"groups, this run's {len(opt.param_groups)}")
    mine = [dict(g, params=s["params"]) for g, s in zip(opt.param_groups, groups)]
    opt.load_state_dict(dict(saved, param_groups=mine))
    # per-weight state (momentum, moments) has its weight's shape, but for the keys an
    # optimiser shapes and checks itself on load (``own_shaped_state``): another weight's state
    # is refused here, not met as a broadcast error at the next step
    own = set(getattr(opt, "own_shaped_state", ()))
    for group in opt.param_groups:
        for p in group["params"]:
            for k, t in opt.state.get(p, {}).items():
                if (k not in own and isinstance(t, torch.Tensor) and t.dim() > 0
                        and t.shape != p.shape):
                    raise ValueError(f"the checkpoint's {optimizer_kind(opt)} {k} for a weight "
                                     f"of shape {tuple(p.shape)} has shape {tuple(t.shape)}")


def with_fused_fallback(make: Callable[[dict], torch.optim.Optimizer], cfg, device):
    """``make(kw)`` with fused kernels on CUDA when asked for, falling back to foreach when
    this torch has no fused kernel for that optimiser/dtype."""
    if cfg.fused and device.type == "cuda":
        try:
            return make({"fused": True})
        except (RuntimeError, TypeError):
            pass
    return make({})
