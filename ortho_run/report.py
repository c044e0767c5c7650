"""``ortho-report DIR...``: tables and plots from the run dirs of runs and sweeps.

Reads every ``summary.json`` under the given folders, groups runs by their overrides other than
the seed (and output/logging keys), and writes ``report.md`` (a table and a legend of its
metrics) and ``report.csv`` (mean, std and n per group and metric) plus PNG plots: each metric
per group with error bars, and training curves from ``metrics.jsonl``. Runs that did not
finish, or whose files cannot be read, are listed in the report, never silently dropped.

By default the table shows a readable set: test accuracy (and the best validation accuracy when
a validation split exists), the old/new retrieval matrix and ECC for compatibility runs, and
the main geometry. ``--metrics`` picks the columns, ``--all`` shows every numeric metric.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import textwrap
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional

from ortho_run.naming import group_key, step_labels
from ortho_run import keys
from ortho_run.io import atomic_path, atomic_write_texts, unwritable
from ortho_run.roles import role_of

ACCURACY = [keys.TEST_ACC1, keys.VAL_BEST_ACC1]
COMPAT = [keys.compat(p, m) for m in keys.STEP_METRICS for p in keys.PAIRS]
COMPAT += [keys.ecc(), keys.ecc("map"), keys.multistep("ac"), keys.multistep("am"),
           keys.multistep("ac", "map"), keys.multistep("am", "map")]
STEP_MATRICES = keys.STEP_METRICS  # compat/steps/<m>: the multi-step T×T matrices
GEOMETRY = ["geometry/class_mean_abs_cos", "geometry/intra_class_cos"]

#: what each metric is (prefix match on the part after the first "/" where it is a pattern)
LEGEND = {
    "test/acc1": "top-1 accuracy on the test split after the last epoch",
    "test/acc5": "top-5 accuracy on the test split after the last epoch",
    "test/loss": "cross-entropy on the test split after the last epoch",
    "val/best_acc1": "best top-1 accuracy on the held-out validation split (the epoch of "
                     "checkpoints/best.pt; data.val_fraction)",
    "compat/*/cmc1": "CMC top-1 of <query model>_<gallery model> retrieval on the test split "
                     "(query = gallery, self excluded, cosine), over queries with a relevant "
                     "item; old_old is the reference the new model must beat",
    "compat/*/cmc5": "CMC top-5, as cmc1",
    "compat/*/map": "mean average precision (tie-aware, scikit-learn's definition), as cmc1",
    "compat/ecc": "1 when new/old CMC top-1 beats old/old (the empirical compatibility "
                  "criterion); the mean is the share of runs that pass",
    "compat/ecc_map": "the same criterion on mAP",
    "compat/ecc_cmc1": "the same criterion on CMC top-1",
    "compat/ecc_cmc5": "the same criterion on CMC top-5",
    "compat/ac": "multi-step updates (compat.steps): the share of pairs of a later step's model "
                 "(query) and an earlier one's (gallery) whose CMC top-1 beats the earlier "
                 "model's own (a tie does not); 1 = every update compatible",
    "compat/am": "multi-step updates: the mean CMC top-1 over the lower triangle of the T×T "
                 "matrix, diagonal included",
    "compat/ac_map": "compat/ac on mAP",
    "compat/am_map": "compat/am on mAP",
    "geometry/class_mean_abs_cos": "mean |cos| between the class means of the test embeddings "
                                   "(0: orthogonal class means)",
    "geometry/intra_class_cos": "mean cosine between test embeddings of the same class",
    "geometry/effective_rank": "effective rank of the centred test embeddings (Roy & Vetterli)",
    "retrieval/*": "retrieval of the test split against itself (trainer.retrieval)",
}


def plugin_legend() -> Dict[str, str]:
    """``geometry/<key>`` → what it is, from every method and regulariser that declares it
    (``DIAGNOSTICS``), the plugins that describe it alike named together."""
    from ortho_run.store import plugin_registries

    texts: Dict[str, Dict[str, List[str]]] = defaultdict(lambda: defaultdict(list))
    for group in ("method", "regularizer"):
        reg = plugin_registries()[group]
        for name in reg.names():
            for key, text in getattr(reg.get(name), "DIAGNOSTICS", {}).items():
                texts[f"geometry/{key}"][text].append(name)
    return {k: "; ".join(f"{', '.join(names)}: {text}" for text, names in by.items())
            for k, by in texts.items()}


def describe(metric: str) -> str:
    if metric in LEGEND:
        return LEGEND[metric]
    plugins = plugin_legend()
    if metric in plugins:
        return plugins[metric]
    head, _, rest = metric.partition("/")
    tail = rest.rsplit("/", 1)[-1]
    for pattern in (f"{head}/*/{tail}", f"{head}/*"):
        if pattern in LEGEND:
            return LEGEND[pattern]
    return "see summary.json and the method's docstring"


def collect(dirs: List[Path]):
    """The finished runs under ``dirs``, each once (folders that overlap, or one given twice,
    read a summary once; a copy of a run dir, which records the run dir it was made in, is
    listed, not counted again), and the runs left out with their reasons."""
    runs, problems = [], []
    read: set = set()
    recorded: Dict[str, str] = {}  # run_dir a summary records -> the folder it was read in
    for d in dirs:
        for f in sorted(Path(d).rglob("summary.json")):
            real = f.resolve()
            if real in read:
                continue
            read.add(real)
            s, why = keys.read_summary(f)
            if s is None:
                problems.append((str(f.parent), f"{why}: mend or remove it"))
                continue
            if role_of(str(s.get("tag"))) is not None:  # a cached model, not a result
                continue
            if s.get("status") != "finished":
                problems.append((str(f.parent), f"status {s.get('status')}: "
                                                  f"{str(s.get('error', ''))[:200]}"))
                continue
            first = recorded.setdefault(str(s.get("run_dir", f.parent)), str(f.parent))
            if first != str(f.parent):
                problems.append((str(f.parent), f"a copy of the run in {first} (both record "
                                                  f"run_dir {s.get('run_dir')}): counted once"))
                continue
            s["_dir"] = str(f.parent)
            runs.append(s)
        for h in sorted(Path(d).rglob(".hydra")):
            if not (h.parent / "summary.json").exists():
                problems.append((str(h.parent), "no summary.json (unfinished or killed)"))
    return runs, problems


def aggregate(runs: List[dict], metrics: List[str]) -> Dict[str, Dict[str, dict]]:
    groups: Dict[str, List[dict]] = defaultdict(list)
    for r in runs:
        groups[group_key(r)].append(r)
    table = {}
    for g, rs in sorted(groups.items()):
        row = {}
        for m in metrics:
            vals = [float(r[m]) for r in rs if keys.is_number(r.get(m))]
            if vals:
                row[m] = _stats(vals)
        table[g] = row
    return table


def _stats(vals: List[float]) -> dict:
    """Mean, sample std (0 for one value) and n; a NaN or infinite value makes both NaN (or
    the mean infinite), shown as such, never dropped."""
    finite = all(math.isfinite(v) for v in vals)
    mean = statistics.fmean(vals) if finite else float(sum(vals)) / len(vals)
    std = 0.0 if len(vals) == 1 else (statistics.stdev(vals) if finite else float("nan"))
    return {"mean": mean, "std": std, "n": len(vals)}


def step_matrices(runs: List[dict]) -> Dict[str, Dict[str, dict]]:
    """Per group and matrix (cmc1, map): the element-wise mean and std over the group's runs of
    ``compat/steps/<m>`` (T×T, None above the diagonal), n, and what each step learned. Runs
    whose matrix has another shape than the group's first are left out of it."""
    groups: Dict[str, List[dict]] = defaultdict(list)
    for r in runs:
        if isinstance(r.get(keys.steps_matrix("cmc1")), list):
            groups[group_key(r)].append(r)
    out: Dict[str, Dict[str, dict]] = {}
    for g, rs in sorted(groups.items()):
        out[g] = {}
        for m in STEP_MATRICES:
            mats = [r[keys.steps_matrix(m)] for r in rs
                    if isinstance(r.get(keys.steps_matrix(m)), list)]
            mats = [x for x in mats if len(x) == len(mats[0])] if mats else []
            if not mats:
                continue
            t = len(mats[0])
            mean = [[None] * t for _ in range(t)]
            std = [[None] * t for _ in range(t)]
            for i in range(t):
                for k in range(i + 1):
                    vals = [float(x[i][k]) for x in mats if keys.is_number(x[i][k])]
                    if vals:
                        st = _stats(vals)
                        mean[i][k], std[i][k] = st["mean"], st["std"]
            labels = step_labels(rs[0]) or [f"step {k}" for k in range(t)]
            out[g][m] = {"mean": mean, "std": std, "n": len(mats), "labels": labels}
    return out


def step_lines(steps: Dict[str, Dict[str, dict]]) -> List[str]:
    """Markdown: per group, the T×T matrices (query step in rows, gallery step in columns)."""
    lines = ["## Multi-step compatibility", "",
             "C[t][k]: step t's model queries step k's gallery (the test split of the last "
             "step); mean ± std over seeds. Step t's model learned the first n_t classes (from "
             "the share of their training data shown, when not all). The "
             "diagonal is each model against itself; an entry below it beats the diagonal entry "
             "of its column when the update from step k to t is compatible.", ""]
    for g, mats in steps.items():
        for m, st in mats.items():
            t = len(st["mean"])
            lab = st["labels"]
            lines += [f"**{g}** — {'CMC top-1' if m == 'cmc1' else 'mAP'} (n={st['n']})", "",
                      "| query \\ gallery | " + " | ".join(f"step {k} ({lab[k]})"
                                                          for k in range(t)) + " |",
                      "|---|" + "---|" * t]
            for i in range(t):
                cells = []
                for k in range(t):
                    mu, sd = st["mean"][i][k], st["std"][i][k]
                    cells.append("" if mu is None else
                                 (f"{mu:.3f}" if st["n"] == 1 else f"{mu:.3f} ± {sd:.3f}"))
                lines.append(f"| step {i} ({lab[i]}) | " + " | ".join(cells) + " |")
            lines.append("")
    return lines


def plot_steps(steps: Dict[str, Dict[str, dict]], out: Path, plt) -> List[Path]:
    """One heat map per group: the mean T×T matrices side by side."""
    files = []
    for idx, (g, mats) in enumerate(steps.items()):
        fig, axes = plt.subplots(1, len(mats), figsize=(4.6 * len(mats), 4.2), squeeze=False)
        for ax, (m, st) in zip(axes[0], mats.items()):
            t = len(st["mean"])
            grid = [[float("nan") if v is None else v for v in row] for row in st["mean"]]
            im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis")
            for i in range(t):
                for k in range(i + 1):
                    if st["mean"][i][k] is not None:
                        ax.text(k, i, f"{st['mean'][i][k]:.2f}", ha="center", va="center",
                                color="white" if st["mean"][i][k] < 0.6 else "black",
                                fontsize=8)
            ax.set_xticks(range(t), [f"{k}: {x}" for k, x in enumerate(st["labels"])],
                          rotation=30, ha="right", fontsize=8)
            ax.set_yticks(range(t), [f"{k}: {x}" for k, x in enumerate(st["labels"])],
                          fontsize=8)
            ax.set_xlabel("gallery: step model (what it learned)")
            ax.set_ylabel("query: step model (what it learned)")
            _title(ax, f"{'CMC top-1' if m == 'cmc1' else 'mAP'} (n={st['n']})", 40)
            fig.colorbar(im, ax=ax, fraction=0.046)
        fig.suptitle("\n".join(textwrap.wrap(g, 90)), fontsize=8)
        fig.tight_layout()
        f = out / f"steps_{idx}.png"
        _save_png(fig, f)
        plt.close(fig)
        files.append(f)
    return files


def numeric_metrics(runs) -> set:
    return {k for r in runs for k, v in r.items() if "/" in k and keys.is_number(v)}


def pick_metrics(runs, requested: Optional[List[str]] = None, every: bool = False) -> List[str]:
    """``requested`` as given; ``every``: every numeric metric; else the readable default."""
    if requested:
        return list(requested)
    have = numeric_metrics(runs)
    if every:
        return sorted(have)
    shown = [m for m in ACCURACY + COMPAT + GEOMETRY if m in have]
    return shown or ["test/acc1"]


def cell(stats: dict) -> str:
    if stats["n"] == 1:
        return f"{stats['mean']:.4f} (n=1)"
    return f"{stats['mean']:.4f} ± {stats['std']:.4f} (n={stats['n']})"


def _save_png(fig, path: Path) -> None:
    """A figure as a PNG file, written whole or not at all (a stop or a full disk leaves the
    previous file)."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")


def write_tables(table, metrics, problems, out: Path, steps=None, compared=None, reported=()):
    """report.csv and report.md; ``reported``: every numeric metric the runs hold (for the
    nearest of a chosen metric that none of them reports)."""
    out.mkdir(parents=True, exist_ok=True)
    steps = steps or {}
    with atomic_path(out / "report.csv") as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["group", "metric", "mean", "std", "n"])
        for g, row in table.items():
            for m in metrics:
                if m in row:
                    w.writerow([g, m, row[m]["mean"], row[m]["std"], row[m]["n"]])
            for m, st in steps.get(g, {}).items():
                for i, r in enumerate(st["mean"]):
                    for k, mu in enumerate(r):
                        if mu is not None:
                            w.writerow([g, f"compat/steps/{m}[{i}][{k}]", mu, st["std"][i][k],
                                        st["n"]])
    shown = [m for m in metrics if any(m in r for r in table.values())]

    def row_line(cells):
        return "| " + " | ".join(cells) + " |"

    lines = ["# ortho-run report", "", row_line(["group", *shown]), "|---|" + "---|" * len(shown)]
    for g, row in table.items():
        lines.append(row_line([g, *(cell(row[m]) if m in row else "" for m in shown)]))
    lines += ["", "Each cell: mean ± sample std over the runs of the group (seeds), and n; a "
                  "group of one run shows its value alone.", "", "## Metrics", ""]
    by_text: Dict[str, List[str]] = {}
    for m in shown:
        by_text.setdefault(describe(m), []).append(m)
    lines += [", ".join(f"`{m}`" for m in ms).join(["- ", f": {text}"])
              for text, ms in by_text.items()]
    lines += [f"- `{m}`: no run reports it, so the table has no column for it (the runs' "
              f"nearest: {', '.join(f'`{n}`' for n in keys.nearest_metrics(m, reported)) or 'none'})"
              for m in metrics if m not in shown]
    if compared:
        lines += [""] + compared
    if steps:
        lines += [""] + step_lines(steps)
    if problems:
        lines += ["", "## Runs left out, whole or in part", ""] + [f"- `{d}`: {why}"
                                                                  for d, why in problems]
    atomic_write_texts({out / "report.md": "\n".join(lines) + "\n"})


def split_labels(groups: List[str]):
    """(the overrides all groups share, each group's own overrides): plot labels show what
    differs, the title what is shared."""
    tokens = [g.split() for g in groups]
    shared = set(tokens[0]).intersection(*tokens[1:]) if tokens else set()
    if len(groups) == 1:
        shared = set()
    own = [" ".join(t for t in ts if t not in shared) or "(all runs)" for ts in tokens]
    return " ".join(t for t in tokens[0] if t in shared) if tokens else "", own


def _title(ax, text: str, width: int = 60) -> None:
    ax.set_title("\n".join(textwrap.wrap(text, width)) or text, fontsize=9)


def plot(table, metrics, runs, out: Path, steps=None, curves=None) -> List[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    files = []
    groups = list(table)
    for m in metrics:
        rows = [(g, table[g][m]) for g in groups if m in table[g]]
        if not rows:
            continue
        shared, own = split_labels([g for g, _ in rows])
        fig, ax = plt.subplots(figsize=(max(5, 1.3 * len(rows) + 2.5), 4.5))
        ax.bar(range(len(rows)), [r["mean"] for _, r in rows],
               yerr=[r["std"] for _, r in rows], capsize=4, color="tab:blue")
        ax.set_xticks(range(len(rows)), ["\n".join(textwrap.wrap(label, 28)) + f"\n(n={r['n']})"
                                         for label, (_, r) in zip(own, rows)], fontsize=8)
        ax.set_xlabel("group (the overrides that differ)")
        ax.set_ylabel(m)
        _title(ax, f"{m}: mean ± std over seeds" + (f" | {shared}" if shared else ""))
        fig.tight_layout()
        f = out / f"{m.replace('/', '_')}.png"
        _save_png(fig, f)
        plt.close(fig)
        files.append(f)
    files.append(plot_curves(runs, curves or {}, out, plt, MaxNLocator))
    return files + plot_steps(steps or {}, out, plt)


def read_curves(runs: List[dict]):
    """Each run's metrics.jsonl rows, by run dir, and (run dir, why) for each line that is no
    row (a torn or edited line): the curves leave such a line out, and the report says so."""
    curves: Dict[str, List[dict]] = {}
    problems = []
    for r in runs:
        f = Path(r["_dir"]) / "metrics.jsonl"
        try:
            lines = f.read_text(errors="replace").splitlines()
        except FileNotFoundError:  # a run without curves (a summary made by other code)
            continue
        except OSError as exc:
            problems.append((r["_dir"], f"unreadable metrics.jsonl ({exc}): no curves"))
            continue
        rows = curves.setdefault(r["_dir"], [])
        for n, line in enumerate(lines, 1):
            try:
                row, errors = keys.parse_metrics_row(json.loads(line))
            except ValueError as exc:
                row, errors = None, [f"not JSON ({exc})"]
            if row is None:
                problems.append((r["_dir"], f"metrics.jsonl line {n}: {'; '.join(errors)}: "
                                            f"the curves leave that line out"))
            else:
                rows.append(row)
    return curves, problems


def _series(runs_rows: List[List[dict]], key):
    """epoch -> the values of ``key`` in those rows (one list per run's rows)."""
    series = defaultdict(list)
    for rows in runs_rows:
        for row in rows:
            if key in row:
                series[row["epoch"]].append(row[key])
    return series


def plot_curves(runs, curves: Dict[str, List[dict]], out: Path, plt, MaxNLocator) -> Path:
    """Training curves, mean over seeds per group: the loss the methods share (``train/ce``) when
    every group logs it, else each method's own objective (labelled as such), and test/acc1."""
    by_group = defaultdict(list)
    for r in runs:
        by_group[group_key(r)].append(curves.get(r["_dir"], []))
    names = sorted(by_group)
    shared, own = split_labels(names) if names else ("", [])
    common_ce = all(_series(by_group[g], "train/ce") for g in names)
    loss_key = "train/ce" if common_ce else "train/loss"
    panels = [(loss_key, "training cross-entropy" if common_ce else
               "training loss: each method's own objective (not comparable across methods)"),
              ("test/acc1", "test top-1 accuracy")]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for i, (g, label) in enumerate(zip(names, own)):
        for ax, (key, _) in zip(axes, panels):
            series = _series(by_group[g], key)
            if series:  # one colour per group on both panels
                xs = sorted(series)
                ax.plot(xs, [statistics.fmean(series[x]) for x in xs], marker=".", label=label,
                        color=f"C{i % 10}")
    for ax, (key, what) in zip(axes, panels):
        ax.set_xlabel("epoch")
        ax.set_ylabel(key)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        _title(ax, f"{what} (mean over seeds)", 50)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    if shared:
        fig.suptitle("\n".join(textwrap.wrap(shared, 110)), fontsize=8)
    fig.tight_layout()
    f = out / "curves.png"
    _save_png(fig, f)
    plt.close(fig)
    return f


def unshown(runs: List[dict], metrics: List[str]) -> List[tuple]:
    """(run dir, why) for the finished runs that no table shows: none of the table's metrics,
    or a multi-step update without its matrices."""
    out = []
    for r in runs:
        if not any(keys.is_number(r.get(m)) for m in metrics):
            out.append((r["_dir"], "finished, but holds none of the table's metrics ("
                        + ", ".join(metrics[:4]) + "); pick others with --metrics or --all"))
        elif _multistep(r) and not isinstance(r.get(keys.steps_matrix("cmc1")), list):
            out.append((r["_dir"], "a multi-step update without its step matrices "
                                   "(compat.evaluate=false?): in the table, not in the matrices"))
    return out


def _multistep(run: dict) -> bool:
    """Whether the run's resolved config sets compat.steps (an unreadable one: no claim)."""
    from omegaconf import OmegaConf

    try:
        return bool(OmegaConf.select(OmegaConf.load(Path(run["_dir"]) / "resolved_config.yaml"),
                                     "compat.steps"))
    except Exception:
        return False


def against_references(runs: List[dict], name: Optional[str] = None):
    """(rows, problems). Rows: per group whose runs name a reference (or against ``name``), per
    published value of its method: our mean ± std (n), the published value, Δ, the verdict and
    how the runs' setting differs from the paper's. Problems: (run dir, why) for the runs that
    name a reference this version does not have."""
    from ortho_run import references
    from omegaconf import OmegaConf

    groups: Dict[str, List[dict]] = defaultdict(list)
    for r in runs:
        if name or r.get(keys.REFERENCE):
            groups[group_key(r)].append(r)
    rows, problems = [], []
    for g, rs in sorted(groups.items()):
        ref_name = name or rs[0][keys.REFERENCE]
        if ref_name not in references.REFERENCES:  # a run of a version that had another one
            problems += [(r["_dir"], f"names reference={ref_name}, which is no published "
                                     f"result here ({', '.join(sorted(references.REFERENCES))}):"
                                     f" in the table, not compared") for r in rs]
            continue
        ref = references.REFERENCES[ref_name]
        published = ref.rows.get(str(rs[0].get("method")), {})
        try:
            config = OmegaConf.to_container(OmegaConf.load(Path(rs[0]["_dir"]) /
                                                           "resolved_config.yaml"))
        except Exception:
            config = {}
        diffs = references.differences(ref, config) if config else ["(no resolved_config.yaml)"]
        for metric, pub in published.items():
            vals = [float(r[metric]) for r in rs if keys.is_number(r.get(metric))]
            mark, why = references.verdict(vals, pub)
            st = _stats([100 * v for v in vals]) if vals else None
            rows.append({"group": g, "reference": ref.name, "metric": metric, "ours": st,
                         "published": pub, "delta": (st["mean"] - pub.value) if st else None,
                         "verdict": mark, "why": why, "differences": diffs})
    return rows, problems


def reference_lines(rows: List[dict]) -> List[str]:
    if not rows:
        return []
    lines = ["## Against published results", "",
             "Ours in percent (mean ± sample std, n) next to the published value of the "
             "reference each run names (`--against NAME` for another). ✅: within the published "
             "spread, or within 2σ of our seeds when none is published; ❌: outside; n < 3: "
             "too few seeds to judge.", "",
             "| group | reference | metric | ours | published | Δ | verdict | setting differs |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        st, pub = r["ours"], r["published"]
        ours = "" if st is None else (f"{st['mean']:.2f}" + (f" ± {st['std']:.2f}" if st["n"] > 1
                                                          else "") + f" (n={st['n']})")
        published = f"{pub.value:.2f}" + (f" ± {pub.spread}" if pub.spread is not None else "") \
            + (f" (n={pub.n})" if pub.n else "")
        delta = "" if r["delta"] is None else f"{r['delta']:+.2f}"
        lines.append(f"| {r['group']} | {r['reference']} | {r['metric']} | {ours} | {published} "
                     f"| {delta} | {r['verdict']} ({r['why']}) | "
                     f"{'; '.join(r['differences']) or 'none'} |")
    return lines + [""]


def report(dirs, out=None, metrics=None, plots: bool = True, every: bool = False,
           against: Optional[str] = None):
    """Write report.md / report.csv (and PNGs) for the runs under ``dirs``; return the table.
    Every run read is in a table or in the list of runs left out, with its reason."""
    runs, problems = collect([Path(d) for d in dirs])
    out = Path(out or dirs[0])
    metrics = pick_metrics(runs, metrics, every)
    curves, unplotted = read_curves(runs) if plots else ({}, [])  # the curves' rows
    compared, uncompared = against_references(runs, against)
    problems = problems + unshown(runs, metrics) + unplotted + uncompared
    table = aggregate(runs, metrics)
    steps = step_matrices(runs)
    write_tables(table, metrics, problems, out, steps, reference_lines(compared),
                 reported=numeric_metrics(runs))
    files = plot(table, metrics, runs, out, steps, curves) if plots and runs else []
    return table, problems, files, out


def references_text() -> str:
    """The published results in ``ortho_run.references``, one block each."""
    from ortho_run.references import REFERENCES

    lines = []
    for r in REFERENCES.values():
        lines += [f"{r.name}: {r.paper}", f"  {r.table}", f"  source: {r.source}",
                  "  setting: " + ", ".join(s.label for s in r.setting)]
        for method, vals in r.rows.items():
            lines.append(f"  method={method}: " + ", ".join(
                f"{k} {v.value}" + (f" ± {v.spread}" if v.spread is not None else "")
                for k, v in vals.items()))
        if r.note:
            lines.append(f"  also: {r.note}")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> None:
    from ortho_run.errors import stops_with

    with stops_with("ortho-report: stopped; each file it wrote is whole, the others are as "
                    "they were"):
        _main(argv)


def _main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="ortho-report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dirs", nargs="*", type=Path, help="run or sweep folders (or a summary.json)")
    p.add_argument("--out", type=Path, default=None, help="where to write (default: first DIR)")
    p.add_argument("--metrics", nargs="+", default=None, metavar="METRIC",
                   help="the table's columns, e.g. --metrics test/acc1 compat/new_old/cmc1 "
                        "geometry/effective_rank (any numeric key of summary.json)")
    p.add_argument("--all", action="store_true", dest="every",
                   help="every numeric metric of the runs (wide)")
    p.add_argument("--no-plots", action="store_true", help="tables only")
    p.add_argument("--against", default=None, metavar="NAME",
                   help="compare every group with this published reference (--references)")
    p.add_argument("--references", action="store_true",
                   help="list the published results the presets target, and exit")
    a = p.parse_args(argv)
    if a.references:
        print(references_text())
        return
    if not a.dirs:
        p.error("give run or sweep folders (or --references)")
    if a.against is not None:
        from ortho_run.references import REFERENCES

        if a.against not in REFERENCES:
            p.error(f"--against {a.against}: no such published result; references: "
                    f"{', '.join(sorted(REFERENCES))} (--references lists them)")
    dirs = []
    for d in a.dirs:
        if d.is_file() and d.name == "summary.json":
            d = d.parent
        if not d.is_dir():
            p.error(f"{d} is not a folder: give run dirs or sweep dirs (they hold summary.json)")
        dirs.append(d)
    if not any(next(d.rglob(name), None) for d in dirs for name in ("summary.json", ".hydra")):
        p.error(f"no run under {', '.join(map(str, dirs))} (no summary.json, no .hydra/ below "
                f"it): give the run dirs or sweep dirs that ortho-run wrote")
    out = a.out or dirs[0]
    why = unwritable(out)
    if why:
        p.error(f"--out {out}: cannot write the report there ({why}): give a folder you can "
                f"write to for report.md, report.csv and the plots")
    table, problems, files, out = report(dirs, out, a.metrics, not a.no_plots, a.every,
                                         a.against)
    n = sum(max((v["n"] for v in row.values()), default=0) for row in table.values())
    print(f"{n} finished runs in {len(table)} groups; {len(problems)} left out")
    print((out / "report.md").read_text())
    for f in files:
        print(f"wrote {f}")


if __name__ == "__main__":
    main()
