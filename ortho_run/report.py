"""``ortho-report DIR...``: tables and plots from the run dirs of runs and sweeps.

Reads every ``summary.json`` under the given folders, groups runs by their overrides other than
the seed (and output/logging keys), and writes ``report.md`` and ``report.csv`` (mean ± std and
n per group for each metric) plus PNG plots: each metric per group with error bars, and training
curves from ``metrics.jsonl``. Runs that did not finish, or whose files cannot be read, are
listed in the report, never silently dropped.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Dict, List

DEFAULT_METRICS = ["test/acc1", "test/acc5"]
AUTO_PREFIXES = ("compat/", "geometry/")
IGNORED_KEYS = ("seed", "output_root", "logger.", "trainer.progress", "hydra.", "cache_dir")


def group_key(summary: dict) -> str:
    ovs = [o for o in summary.get("overrides", [])
           if not any(o.split("=")[0].lstrip("+~").startswith(k) for k in IGNORED_KEYS)]
    if not ovs:
        ovs = [f"method={summary.get('method')}", f"data={summary.get('data')}"]
    return " ".join(sorted(ovs))


def collect(dirs: List[Path]):
    runs, problems = [], []
    for d in dirs:
        for f in sorted(Path(d).rglob("summary.json")):
            if "models" in f.parts and ".cache" in str(f):
                continue
            try:
                s = json.loads(f.read_text())
            except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
                problems.append((str(f.parent), f"unreadable summary.json ({exc})"))
                continue
            if not isinstance(s, dict):
                problems.append((str(f.parent), f"summary.json is not a JSON object "
                                                  f"({type(s).__name__})"))
                continue
            if s.get("status") != "finished":
                problems.append((str(f.parent), f"status {s.get('status')}: "
                                                  f"{str(s.get('error', ''))[:200]}"))
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
            vals = [float(r[m]) for r in rs if isinstance(r.get(m), (int, float))]
            if vals:
                row[m] = {"mean": statistics.fmean(vals),
                          "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
                          "n": len(vals)}
        table[g] = row
    return table


def pick_metrics(runs, requested):
    if requested:
        return requested
    extra = sorted({k for r in runs for k in r if k.startswith(AUTO_PREFIXES)
                    and isinstance(r[k], (int, float))})
    return DEFAULT_METRICS + extra


def write_tables(table, metrics, problems, out: Path):
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "report.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["group", "metric", "mean", "std", "n"])
        for g, row in table.items():
            for m in metrics:
                if m in row:
                    w.writerow([g, m, row[m]["mean"], row[m]["std"], row[m]["n"]])
    shown = [m for m in metrics if any(m in r for r in table.values())]
    lines = ["# ortho-run report", "", "| group | " + " | ".join(shown) + " |",
             "|---|" + "---|" * len(shown)]
    for g, row in table.items():
        cells = [f"{row[m]['mean']:.4f} ± {row[m]['std']:.4f} (n={row[m]['n']})" if m in row
                 else "" for m in shown]
        lines.append(f"| {g} | " + " | ".join(cells) + " |")
    if problems:
        lines += ["", "## Runs left out", ""] + [f"- `{d}`: {why}" for d, why in problems]
    (out / "report.md").write_text("\n".join(lines) + "\n")


def plot(table, metrics, runs, out: Path) -> List[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    groups = list(table)
    for m in metrics:
        rows = [(g, table[g][m]) for g in groups if m in table[g]]
        if not rows:
            continue
        fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(rows) + 2), 4))
        ax.bar(range(len(rows)), [r["mean"] for _, r in rows],
               yerr=[r["std"] for _, r in rows], capsize=4, color="tab:blue")
        ax.set_xticks(range(len(rows)), [f"{g}\n(n={r['n']})" for g, r in rows], rotation=20,
                      ha="right", fontsize=8)
        ax.set_ylabel(m)
        ax.set_title(f"{m}: mean ± std over seeds")
        fig.tight_layout()
        f = out / f"{m.replace('/', '_')}.png"
        fig.savefig(f, dpi=120)
        plt.close(fig)
        files.append(f)
    # training curves: mean over seeds per group
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    by_group = defaultdict(list)
    for r in runs:
        by_group[group_key(r)].append(Path(r["_dir"]) / "metrics.jsonl")
    for g, paths in sorted(by_group.items()):
        for ax, key in zip(axes, ("train/loss", "test/acc1")):
            series = defaultdict(list)
            for p in paths:
                try:
                    for line in p.read_text().splitlines():
                        row = json.loads(line)
                        if key in row and isinstance(row[key], (int, float)):
                            series[row["epoch"]].append(row[key])
                except (OSError, json.JSONDecodeError):
                    continue
            if series:
                xs = sorted(series)
                ax.plot(xs, [statistics.fmean(series[x]) for x in xs], marker=".", label=g)
    for ax, key in zip(axes, ("train/loss", "test/acc1")):
        ax.set_xlabel("epoch")
        ax.set_ylabel(key)
        ax.set_title(f"{key} (mean over seeds)")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    f = out / "curves.png"
    fig.savefig(f, dpi=120)
    plt.close(fig)
    files.append(f)
    return files


def report(dirs, out=None, metrics=None, plots: bool = True):
    """Write report.md / report.csv (and PNGs) for the runs under ``dirs``; return the table."""
    runs, problems = collect([Path(d) for d in dirs])
    out = Path(out or dirs[0])
    metrics = pick_metrics(runs, metrics)
    table = aggregate(runs, metrics)
    write_tables(table, metrics, problems, out)
    files = plot(table, metrics, runs, out) if plots and runs else []
    return table, problems, files, out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="ortho-report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dirs", nargs="+", type=Path, help="run or sweep folders")
    p.add_argument("--out", type=Path, default=None, help="where to write (default: first DIR)")
    p.add_argument("--metrics", nargs="*", default=None)
    p.add_argument("--no-plots", action="store_true")
    a = p.parse_args(argv)
    dirs = []
    for d in a.dirs:
        if d.is_file() and d.name == "summary.json":
            d = d.parent
        if not d.is_dir():
            p.error(f"{d} is not a folder: give run dirs or sweep dirs (they hold summary.json)")
        dirs.append(d)
    table, problems, files, out = report(dirs, a.out, a.metrics, not a.no_plots)
    n = sum(max((v["n"] for v in row.values()), default=0) for row in table.values())
    print(f"{n} finished runs in {len(table)} groups; {len(problems)} left out")
    print((out / "report.md").read_text())
    for f in files:
        print(f"wrote {f}")


if __name__ == "__main__":
    main()
