"""How runs are named and grouped, from their overrides: shared by W&B run names and tags and
by ``ortho-report``'s groups, so a W&B run and a report row carry the same label."""

from __future__ import annotations

from typing import Iterable, List, Optional


def key_of(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _ignored(key: str) -> bool:
    """The seed (a group averages over it), Hydra's own keys and the keys that only change where
    or how a run is reported (``config.REPORT``, read through ``store.effect_of``)."""
    from ortho_run.config import REPORT
    from ortho_run.store import effect_of

    return key == "seed" or key.startswith("hydra.") or effect_of(key) == REPORT


def relevant_overrides(overrides: Iterable[str]) -> List[str]:
    """The overrides that define an experiment (sorted), without the ignored keys."""
    return sorted(o for o in overrides if not _ignored(key_of(o)))


def group_key(summary: dict) -> str:
    ovs = relevant_overrides(summary.get("overrides", []))
    if not ovs:
        ovs = [f"method={summary.get('method')}", f"data={summary.get('data')}"]
    return " ".join(ovs)


def run_name(method: str, data: str, seed: int, overrides: Iterable[str] = (),
             job_num: Optional[int] = None) -> str:
    """``<method>_<data>_s<seed>``, plus every other override that defines the run (an
    ``experiment=`` too), so that two jobs of a sweep that differ only in, say, ``method.gamma``
    get different names; in a sweep, ``#<job number>`` as well, so that no two jobs share a
    name even when they differ only in keys that do not define an experiment."""
    extra = [o for o in relevant_overrides(overrides) if key_of(o) not in ("method", "data")]
    base = f"{method}_{data}_s{seed}"
    name = f"{base}[{','.join(extra)}]" if extra else base
    return name if job_num is None else f"{name}#{job_num}"


def job_name(cfg, sweep: Optional[dict] = None) -> str:
    """A run's name: ``logger.name`` when set, else ``run_name`` of its method, data, seed and
    (in a sweep) its overrides and job number."""
    sweep = sweep or {}
    return cfg.logger.name or run_name(cfg.method.name, cfg.data.name, cfg.seed,
                                       sweep.get("overrides", ()), sweep.get("job_num"))


def step_labels(summary: dict) -> List[str]:
    """What each step of a multi-step update learned: ``5 cl.`` or ``10 cl., 50% data``."""
    from ortho_run import keys

    classes = summary.get(keys.STEPS_CLASSES) or []
    fractions = summary.get(keys.STEPS_FRACTIONS) or [1.0] * len(classes)
    return [f"{c} cl." + (f", {f:.0%} data" if f < 1 else "") for c, f in zip(classes, fractions)]
