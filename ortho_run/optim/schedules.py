"""Learning-rate schedules (``optim.scheduler``), applied per optimiser step after a linear
warm-up of ``optim.warmup_epochs``. Each is ``factor(cfg, step, warm, total, steps_per_epoch)``,
the multiplier of every group's base lr; a new one is one more registered function."""

from __future__ import annotations

import logging
import math

import torch

from ortho_run.optim.base import SCHEDULES

log = logging.getLogger("ortho_run")


@SCHEDULES.register("constant")
def constant(cfg, step, warm, total, spe):
    return 1.0


@SCHEDULES.register("multistep")
def multistep(cfg, step, warm, total, spe):
    epoch = step / spe
    return cfg.gamma ** sum(1 for m in cfg.milestones if epoch >= m)


def _multistep_check(run_cfg) -> None:
    """The pre-flight's: a step schedule none of whose milestones falls inside the run."""
    milestones, epochs = list(run_cfg.optim.milestones), run_cfg.trainer.max_epochs
    if not any(m < epochs for m in milestones):
        log.warning("optim.scheduler=multistep: no optim.milestones before the run ends "
                    "(milestones %s, trainer.max_epochs=%d): the learning rate never steps "
                    "down", milestones, epochs)


multistep.check = _multistep_check


@SCHEDULES.register("cosine")
def cosine(cfg, step, warm, total, spe):
    t = min(1.0, (step - warm) / max(1, total - warm))
    return cfg.min_lr_factor + (1 - cfg.min_lr_factor) * 0.5 * (1 + math.cos(math.pi * t))


@SCHEDULES.register("linear")
def linear(cfg, step, warm, total, spe):
    """From 1 down to 0 at the end of the run (airbench's): step s uses 1 − s/total."""
    return max(0.0, 1.0 - (step - warm) / max(1, total - warm))


@SCHEDULES.register("onecycle")
def onecycle(cfg, step, warm, total, spe):
    """Linear up over the warm-up (default 30% of the run) from 0.04, cosine down to ~0."""
    warm = warm or int(0.3 * total)
    if step < warm:
        return 0.04 + 0.96 * step / max(1, warm)
    t = (step - warm) / max(1, total - warm)
    return 1e-4 + (1 - 1e-4) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


#: schedules that ramp up themselves (no generic linear warm-up in front)
SELF_WARMING = {"onecycle"}


def lr_factor(cfg, step: int, steps_per_epoch: int, max_epochs: float) -> float:
    """Multiplier of the base lr after ``step`` optimiser steps of a schedule over
    ``max_epochs`` epochs."""
    total = max(1, int(math.ceil(steps_per_epoch * max_epochs)))
    warm = int(round(cfg.warmup_epochs * steps_per_epoch))
    name = str(cfg.scheduler)
    fn = SCHEDULES.get(name)
    if name not in SELF_WARMING and step < warm:
        return (step + 1) / warm
    return fn(cfg, step, warm, total, steps_per_epoch)


def schedule_at(sc: torch.optim.lr_scheduler.LambdaLR, step: int) -> None:
    """Put schedule ``sc`` (one ``build_scheduler`` made for this run) at optimiser step
    ``step``, each group's lr what this run's schedule and base lr give there: how a resumed run
    continues (the step is all of a schedule's state; its lrs come from the config)."""
    lrs = [base * factor(step) for base, factor in zip(sc.base_lrs, sc.lr_lambdas)]
    sc.load_state_dict(dict(sc.state_dict(), last_epoch=step, _step_count=step + 1,
                            _last_lr=lrs))
    for group, lr in zip(sc.optimizer.param_groups, lrs):
        group["lr"] = lr


def build_scheduler(opt: torch.optim.Optimizer, cfg, steps_per_epoch: int, max_epochs: int):
    """One schedule per param group: over the run, or over a group's own ``schedule_epochs``
    (after which its lr is 0)."""
    def factor(epochs):
        if epochs is None:
            return lambda s: lr_factor(cfg, s, steps_per_epoch, max_epochs)
        return lambda s: (lr_factor(cfg, s, steps_per_epoch, epochs)
                          if s < steps_per_epoch * epochs else 0.0)

    return torch.optim.lr_scheduler.LambdaLR(
        opt, [factor(g.get("schedule_epochs")) for g in opt.param_groups])
