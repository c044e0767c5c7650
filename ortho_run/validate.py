"""The pre-flight: every config check the type system cannot express, in one place, run
before anything is read or written.

Plugin names against their registries, no key that its schema lacks (one appended with
``+key=...``) and every key it declares (not deleted with ``~key``), each with a value (not
``???``), every number finite, the ranges in ``config.RANGES``
(built from the shared helpers ``positive``, ``at_least``, ``in_unit_interval``), each chosen
plugin schema's ``checks`` (``[(field, ok, what it must be), ...]``, with those of the schemas
it extends: ``config.schema_checks``), each chosen plugin's ``check(run_cfg)`` for what spans
keys or groups, and an ``objective`` that names a metric family. What needs the data or a built
model (a class count, a feature dim) is checked where those are first known, in the plan.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Iterator, Optional, Tuple

from omegaconf import DictConfig, OmegaConf

from ortho_run import keys, references
from ortho_run.config import RANGES, output_root_error, schema_checks
from ortho_run.errors import ConfigError, first_line

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


def schema_error(cfg) -> Optional[str]:
    """Why a composed config does not match its schemas (``_schema_mismatch``), its ``hydra``
    node aside: what Hydra's callbacks can ask before Hydra resolves the run dir from it."""
    return _schema_mismatch(cfg, ignore=("hydra",))


def _schema_mismatch(node, prefix: str = "", ignore=()) -> Optional[str]:
    """Why ``node`` does not match its schemas, or None: a key its dataclass does not declare
    (one a ``+key=...`` override appended), one it declares that is gone (a ``~key`` override
    deleted it), or one with no value (``???``: a key the chosen plugin needs and nobody set, or
    a group deleted from the defaults). Each typed node is held against its dataclass's fields;
    a ``Dict`` field takes any key."""
    schema = OmegaConf.get_type(node)
    fields = ([f.name for f in dataclasses.fields(schema)] if dataclasses.is_dataclass(schema)
              else None)
    for k in node.keys():
        key = f"{prefix}{k}"
        if k in ignore:
            continue
        if fields is not None and k not in fields:
            return (f"unknown key {key}: {schema.__name__} has no key {k!r} (check the "
                    f"spelling; ortho-run --cfg job prints every key)")
        if OmegaConf.is_missing(node, k):
            return _no_value(key, node)
        child = node._get_node(k)
        if isinstance(child, DictConfig):
            why = _schema_mismatch(child, f"{key}.")
            if why:
                return why
    for k in fields or ():
        if k not in node:
            return (f"{prefix}{k} is gone: {schema.__name__} declares it and the run reads it "
                    f"(a ~{prefix}{k} override deletes it): leave that override out")
    return None


def _no_value(key: str, node) -> str:
    from ortho_run.store import HELP_GROUPS

    if key in {g for g, _ in HELP_GROUPS}:  # a group deleted from the defaults list (~data)
        return (f"{key} has no value: choose one ({key}=<option>; ortho-run --help lists the "
                f"options)")
    group = key.split(".")[0]
    name = OmegaConf.select(node._get_root(), f"{group}.name", default=None) if "." in key else None
    return (f"{key} has no value (???): " + (f"{group}={name} needs it; " if name else "")
            + f"set {key}=<value> on the command line or in your config")


def validate(cfg) -> DictConfig:
    """Raise ConfigError naming the first bad key; else return the config the run reads: a
    composed config as it is, a plain one (a run dir's saved config, given to
    ``--config-path RUN/.hydra --config-name config``) typed by the schemas of the plugins it
    names, so that it runs exactly as the composed one it was saved from."""
    from ortho_run.optim import SCHEDULES
    from ortho_run.store import plugin_registries, structured

    # keys appended with +key=... or deleted with ~key bypass the schemas at composition, and a
    # key left at ??? has no value: refuse them like a typo (a composed config is typed node by
    # node), before anything resolves an interpolation that reads them
    typed = dataclasses.is_dataclass(OmegaConf.get_type(cfg))
    why = _schema_mismatch(cfg) if typed else None
    if why:
        raise ConfigError(why)
    try:
        container = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    except Exception as exc:
        raise ConfigError(f"the config does not resolve: {first_line(exc)}") from None
    # the names, each looked up once: every group's plugin (with its schema), the schedule and
    # the published result the run is compared with
    if str(cfg.optim.scheduler) not in SCHEDULES:
        raise ConfigError(f"optim.scheduler={cfg.optim.scheduler}: use one of "
                          f"{', '.join(SCHEDULES.names())}")
    chosen = {group: (reg.get(str(cfg[group].name)), reg.schema(str(cfg[group].name)))
              for group, reg in plugin_registries().items()}
    schedule = SCHEDULES.get(str(cfg.optim.scheduler))
    if cfg.reference is not None:
        references.get(str(cfg.reference))
    if not typed:  # an untyped config is typed here, through the schemas of the names it gives
        cfg = structured(container, source="the config")
        why = _schema_mismatch(cfg)
        if why:
            raise ConfigError(why)
    for key, v in _walk(container):
        if isinstance(v, float) and not math.isfinite(v):
            raise ConfigError(f"{key}={v} is not a finite number")
    # the ranges: the shared ones and each chosen plugin schema's own
    ranges = list(RANGES) + [(f"{group}.{field}", ok, what) for group, (_, schema) in chosen.items()
                             for field, ok, what in schema_checks(schema)]
    for key, ok, what in ranges:
        v = OmegaConf.select(cfg, key, default=_ABSENT)
        if v is _ABSENT:
            continue
        try:
            good = ok(v)
        except TypeError:
            good = False
        if not good:
            raise ConfigError(f"{key}={v} is out of range: it must be {what}")
    # each chosen plugin's (and the schedule's) checks of the whole config (cross-key, other
    # groups): a method's ``check`` classmethod, a builder's or a schedule's ``check`` attribute
    for builder in [b for b, _ in chosen.values()] + [schedule]:
        check = getattr(builder, "check", None)
        if check is not None:
            check(cfg)
    for why in (output_root_error(cfg.output_root), keys.objective_error(cfg.objective)):
        if why:
            raise ConfigError(why)
    if cfg.optim.warmup_epochs > cfg.trainer.max_epochs:
        log.warning("optim.warmup_epochs=%g is longer than the run (trainer.max_epochs=%d): the "
                    "learning rate never reaches optim.lr=%g", cfg.optim.warmup_epochs,
                    cfg.trainer.max_epochs, cfg.optim.lr)
    return cfg
