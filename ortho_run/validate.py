"""Config checks the type system cannot express, run before anything is written.

Plugin names against their registries, every number finite, the ranges in ``config.RANGES``
and each chosen plugin schema's own ``checks`` (``[(field, ok, what it must be), ...]``).
"""

from __future__ import annotations

import logging
import math
from typing import Any, Iterator, Tuple

from omegaconf import OmegaConf

from ortho_run.config import RANGES
from ortho_run.errors import ConfigError

_ABSENT = object()
log = logging.getLogger("ortho_run")


def _walk(node: Any, prefix: str = "") -> Iterator[Tuple[str, Any]]:
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _walk(v, f"{prefix}{k}.")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _walk(v, f"{prefix}{i}.")
    else:
        yield prefix[:-1], node


def _check(cfg, key: str, ok, what: str) -> None:
    v = OmegaConf.select(cfg, key, default=_ABSENT)
    if v is _ABSENT:
        return
    try:
        good = ok(v)
    except TypeError:
        good = False
    if not good:
        raise ConfigError(f"{key}={v} is out of range: it must be {what}")


def validate(cfg) -> None:
    """Raise ConfigError naming the first bad key."""
    from ortho_run.optim import SCHEDULES
    from ortho_run.store import plugin_registries, structured

    try:
        container = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    except Exception as exc:
        raise ConfigError(f"the config does not resolve: {str(exc).splitlines()[0]}") from None
    regs = plugin_registries()
    for group, reg in regs.items():
        reg.get(str(cfg[group].name))
    # keys appended with +key=... bypass the schemas at composition: refuse them like a typo
    structured(container, source="unknown key")
    if str(cfg.optim.scheduler) not in SCHEDULES:
        raise ConfigError(f"optim.scheduler={cfg.optim.scheduler}: use one of "
                          f"{', '.join(SCHEDULES.names())}")
    for key, v in _walk(container):
        if isinstance(v, float) and not math.isfinite(v):
            raise ConfigError(f"{key}={v} is not a finite number")
    for key, ok, what in RANGES:
        _check(cfg, key, ok, what)
    for group, reg in regs.items():
        for field, ok, what in getattr(reg.schema(str(cfg[group].name)), "checks", ()):
            _check(cfg, f"{group}.{field}", ok, what)
    from ortho_run.methods import METHODS

    METHODS.get(str(cfg.method.name)).check(cfg)
    if not str(cfg.output_root).strip():
        raise ConfigError("output_root is empty: set it to a folder (default: outputs)")
    if cfg.optim.warmup_epochs > cfg.trainer.max_epochs:
        log.warning("optim.warmup_epochs=%g is longer than the run (trainer.max_epochs=%d): the "
                    "learning rate never reaches optim.lr=%g", cfg.optim.warmup_epochs,
                    cfg.trainer.max_epochs, cfg.optim.lr)
