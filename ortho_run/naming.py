"""How runs are named and grouped, from their overrides: shared by W&B run names and tags and
by ``ortho-report``'s groups, so a W&B run and a report row carry the same label."""

from __future__ import annotations

from typing import Iterable, List

#: overrides that change where or how a run is reported, not what it is (and the seed, which
#: a group averages over)
IGNORED_KEYS = ("seed", "output_root", "logger.", "trainer.progress", "hydra.", "cache_dir",
                "trainer.resume")


def key_of(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def relevant_overrides(overrides: Iterable[str]) -> List[str]:
    """The overrides that define an experiment (sorted), without the ignored keys."""
    return sorted(o for o in overrides
                  if not any(key_of(o).startswith(k) for k in IGNORED_KEYS))


def group_key(summary: dict) -> str:
    ovs = relevant_overrides(summary.get("overrides", []))
    if not ovs:
        ovs = [f"method={summary.get('method')}", f"data={summary.get('data')}"]
    return " ".join(ovs)


def run_name(method: str, data: str, seed: int, overrides: Iterable[str] = ()) -> str:
    """``<method>_<data>_s<seed>``, plus the other overrides that define the run, so that two
    jobs of a sweep that differ only in, say, ``method.gamma`` get different names."""
    extra = [o for o in relevant_overrides(overrides)
             if key_of(o) not in ("method", "data", "experiment")]
    base = f"{method}_{data}_s{seed}"
    return f"{base}[{','.join(extra)}]" if extra else base


def step_labels(summary: dict) -> List[str]:
    """What each step of a multi-step update learned: ``5 cl.`` or ``10 cl., 50% data``."""
    classes = summary.get("compat/steps/classes") or []
    fractions = summary.get("compat/steps/fractions") or [1.0] * len(classes)
    return [f"{c} cl." + (f", {f:.0%} data" if f < 1 else "") for c, f in zip(classes, fractions)]
