"""The summary.json keys that several modules produce or read, spelled once: the producers
build them with these names, the readers (the end-of-run block, ``ortho-report``, the
references) import them."""

from __future__ import annotations

TEST_ACC1 = "test/acc1"
VAL_BEST_ACC1 = "val/best_acc1"
TIME_TRAIN = "time/train_s"  # the timed regions (trainer.RegionTimer)
TIME_TOTAL = "time/total_s"
REFERENCE = "reference"  # the published result a preset targets (ortho_run.references)

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
