"""The summary.json keys that several modules produce or read, spelled once: the producers
build them with these names, the readers (the end-of-run block, ``ortho-report``, the
references) import them. What each key holds is declared here too (``parse_summary``,
``parse_metrics_row``), and every reader takes a summary through ``read_summary``: a summary
edited by hand, cut short or written by other code is named with its wrong keys, never
half-read, and a non-finite metric (written as a string: JSON has none) is read back as the
float it was."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

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
    import logging

    value = summary.get(objective)
    if is_number(value):
        return float(value)
    if summary.get("status") == "finished":
        near = nearest_metrics(objective, [k for k, v in summary.items()
                                           if "/" in k and is_number(v)])
        logging.getLogger("ortho_run").warning(
            "objective=%s is not a metric of this run's summary: the sweeper gets no value; "
            "set objective to one it reports (nearest: %s)", objective, ", ".join(near))
    return None


def nearest_metrics(name: str, metrics) -> List[str]:
    """The (up to three) metrics of ``metrics`` spelled most like ``name``, else the first."""
    import difflib

    metrics = sorted(set(metrics))
    return difflib.get_close_matches(name, metrics, n=3, cutoff=0.5) or metrics[:3]


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


# ------------------------------------------------------------------ what a summary holds
#: how a non-finite float is written (JSON has none; ``io`` writes its ``str``): read back as
#: that float wherever a number belongs
NONFINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}
_NOT_A_NUMBER = object()


def is_number(v) -> bool:
    """Whether ``v`` is a metric's value as read: an int or a float (NaN included), not a bool."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _number(v):
    """``v`` as a number (a non-finite float's string included), else ``_NOT_A_NUMBER``."""
    if is_number(v):
        return v
    return NONFINITE.get(v, _NOT_A_NUMBER) if isinstance(v, str) else _NOT_A_NUMBER


def is_strings(v) -> bool:
    return isinstance(v, list) and all(isinstance(o, str) for o in v)


def is_count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


#: the fields of a summary that its readers take, besides the metrics: what each must hold
#: where present, and how that is said
FIELDS: Dict[str, Tuple[Callable[[object], bool], str]] = {
    **{k: (lambda v: isinstance(v, str), "a string")
       for k in ("status", "error", "method", "data", "model", "tag", "run_dir", "sweep",
                 "sweep_dir", "rerun_of", "resume_command")},
    REFERENCE: (lambda v: v is None or isinstance(v, str), "a reference's name or null"),
    **{k: (is_count, "an integer") for k in ("seed", "epoch", "step", "job_num", "world_size")},
    **{k: (is_strings, "a list of strings") for k in ("overrides", "sweep_overrides")},
}
STEP_KEYS = frozenset({steps_matrix(m) for m in STEP_METRICS} | {STEPS_CLASSES, STEPS_FRACTIONS})


def shown(v) -> str:
    """``v`` as an error message quotes it: its JSON, cut at 60 characters, and its type."""
    text = json.dumps(v, default=str)
    return (text if len(text) <= 60 else text[:57] + "...") + f" ({type(v).__name__})"


def _metrics(d: dict, out: dict, errors: List[str]) -> None:
    """The metrics (``<family>/<name>``) of ``d`` but the multi-step keys, as numbers into
    ``out``; one line into ``errors`` for each that is none."""
    for k, v in d.items():
        if "/" in k and k.partition("/")[0] in METRIC_FAMILIES and k not in STEP_KEYS:
            out[k] = _number(v)
            if out[k] is _NOT_A_NUMBER:
                errors.append(f"{k} must be a number, not {shown(v)}")


def _lower_triangle(mat) -> Optional[List[list]]:
    """A T×T matrix with numbers on and below the diagonal and null above it, its numbers read
    back (``_number``); None when ``mat`` is no such matrix."""
    if not isinstance(mat, list) or not mat:
        return None
    rows = []
    for i, row in enumerate(mat):
        if not isinstance(row, list) or len(row) != len(mat):
            return None
        rows.append([_number(x) if k <= i else (None if x is None else _NOT_A_NUMBER)
                     for k, x in enumerate(row)])
        if _NOT_A_NUMBER in rows[-1]:
            return None
    return rows


def _steps(summary: dict, out: dict, errors: List[str]) -> None:
    """The multi-step keys: T×T lower-triangular matrices (numbers on and below the diagonal,
    null above), T class counts and T fractions, one T for all."""
    sizes = {}
    for m in STEP_METRICS:
        key = steps_matrix(m)
        if key not in summary:
            continue
        rows = _lower_triangle(summary[key])
        if rows is not None:
            out[key], sizes[key] = rows, len(rows)
        else:
            errors.append(f"{key} must be a T×T list of rows (numbers up to the diagonal, null "
                          f"above it), not {shown(summary[key])}")
    for key, check, what in (
            (STEPS_CLASSES, lambda x: is_count(x) and x > 0, "class counts"),
            (STEPS_FRACTIONS, lambda x: is_number(x) and 0 < x <= 1, "fractions in (0, 1]")):
        if key not in summary:
            continue
        v = summary[key]
        if isinstance(v, list) and v and all(check(x) for x in v):
            sizes[key] = len(v)
        else:
            errors.append(f"{key} must be a list of {what}, one per step, not {shown(v)}")
    if len(set(sizes.values())) > 1:
        errors.append("the multi-step keys disagree on the number of steps: " + ", ".join(
            f"{k} has {n}" for k, n in sizes.items()))


def parse_summary(summary) -> Tuple[Optional[dict], List[str]]:
    """A parsed summary.json as its readers take it: (the summary, its metrics as numbers (the
    strings of non-finite floats read back), []), or (None, why not, one line per wrong key)."""
    if not isinstance(summary, dict):
        return None, [f"summary.json holds {type(summary).__name__}, not a JSON object"]
    errors = [f"{k} must be {what}, not {shown(summary[k])}"
              for k, (check, what) in FIELDS.items() if k in summary and not check(summary[k])]
    out = dict(summary)
    _metrics(summary, out, errors)
    _steps(summary, out, errors)
    return (None, errors) if errors else (out, [])


def parse_metrics_row(row) -> Tuple[Optional[dict], List[str]]:
    """A parsed line of metrics.jsonl as its readers take it: (the row, its metrics as numbers,
    []), or (None, why not). A row is a JSON object with an ``epoch`` (a number >= 0: an
    epoch's row holds its count, a per-step row the fraction reached)."""
    if not isinstance(row, dict):
        return None, [f"holds {type(row).__name__}, not a JSON object"]
    epoch = _number(row.get("epoch"))
    errors = ([] if epoch is not _NOT_A_NUMBER and epoch >= 0 else ["no epoch"]
              if "epoch" not in row else [f"epoch must be a number >= 0, not {shown(row['epoch'])}"])
    out = dict(row)
    _metrics(row, out, errors)
    return (None, errors) if errors else (out, [])


def read_summary(path: Path) -> Tuple[Optional[dict], Optional[str]]:
    """(the summary at ``path`` as ``parse_summary`` gives it, None), or (None, why it cannot
    be read: a missing or unparsable file, or the keys that do not hold what they must)."""
    try:
        summary, errors = parse_summary(json.loads(Path(path).read_text()))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        return None, f"unreadable summary.json ({exc})"
    return (summary, None) if summary is not None else (None, "summary.json: " + "; ".join(errors))
