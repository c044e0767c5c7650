"""The summary.json keys that several modules produce or read, spelled once: the producers
build them with these names, the readers (the end-of-run block, ``ortho-report``, the
references) import them."""

from __future__ import annotations

TEST_ACC1 = "test/acc1"
VAL_BEST_ACC1 = "val/best_acc1"
TIME_TRAIN = "time/train_s"  # the timed regions (trainer.RegionTimer)
TIME_TOTAL = "time/total_s"
REFERENCE = "reference"  # the published result a preset targets (ortho_run.references)

#: the families of the metrics a summary reports, each key ``<family>/<name>``: what the
#: ``objective`` a sweeper optimises may name
METRIC_FAMILIES = ("test", "val", "train", "geometry", "retrieval", "compat", "time")


def objective_error(objective: str):
    """Why ``objective`` can name no metric of a summary, or None."""
    family, _, name = str(objective).partition("/")
    if family in METRIC_FAMILIES and name:
        return None
    return (f"objective={objective!r} names no metric: use a summary metric <family>/<name> "
            f"(family one of {', '.join(METRIC_FAMILIES)}), e.g. {TEST_ACC1}")


def objective_value(summary: dict, objective: str):
    """The number a sweeper optimises, or None (with a warning naming the summary's nearest
    metrics) when the run's summary has no such metric."""
    import difflib
    import logging

    value = summary.get(objective)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if summary.get("status") == "finished":
        metrics = [k for k, v in summary.items() if "/" in k and isinstance(v, (int, float))]
        near = difflib.get_close_matches(objective, metrics, n=3, cutoff=0.5) or sorted(metrics)[:3]
        logging.getLogger("ortho_run").warning(
            "objective=%s is not a metric of this run's summary: the sweeper gets no value; "
            "set objective to one it reports (nearest: %s)", objective, ", ".join(near))
    return None

#: the compatibility matrix: query model / gallery model (``old``, ``new``, or a method's own
#: extra space such as ``raw``) and a retrieval metric (``cmc1``, ``cmc5``, ``map``)
PAIRS = ("old_old", "new_old", "new_new")


def compat(pair: str, metric: str) -> str:
    return f"compat/{pair}/{metric}"


def ecc(metric: str = "") -> str:
    """The empirical compatibility criterion: ``compat/ecc`` (CMC top-1) or ``compat/ecc_<m>``."""
    return f"compat/ecc_{metric}" if metric else "compat/ecc"


def multistep(score: str, metric: str = "") -> str:
    """AC/AM of a multi-step update: ``compat/ac`` (CMC top-1), ``compat/am_map`` (mAP)."""
    return f"compat/{score}_{metric}" if metric else f"compat/{score}"


def steps_matrix(metric: str) -> str:
    """The T×T matrix of a multi-step update for ``metric`` (cmc1, map)."""
    return f"compat/steps/{metric}"


STEPS_CLASSES = "compat/steps/classes"
STEPS_FRACTIONS = "compat/steps/fractions"
STEP_METRICS = ("cmc1", "map")
