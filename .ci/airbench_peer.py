"""The `airbench` package's train94 on the same CIFAR-10 as ours, for `.ci/gpu-check airbench`.

    python .ci/airbench_peer.py DECODED_ROOT OUT_DIR [--runs 10]

Writes DECODED_ROOT's CIFAR-10 (the python-pickle layout `python -m ortho_run.datasets
from-jpeg` writes) as the `cifar10/train.pt` / `test.pt` the package reads (uint8 N×32×32×3
`images`, `labels`, `classes`; the training images in a seeded random order, as CIFAR-10 stores
them: the package whitens from the first 5,000), then runs its warm-up and `--runs` timed runs
and prints the mean ± std of its TTA accuracy and the median of its own total time (whitening,
training and the final TTA evaluation). Needs a CUDA GPU and the package (pip install airbench).
"""

import argparse
import contextlib
import io
import json
import os
import pickle
import statistics
import sys
from pathlib import Path

import numpy as np
import torch


def write_pt(root: Path, out: Path) -> None:
    folder = root / "cifar-10-batches-py"

    def load(names):
        xs, ys = [], []
        for n in names:
            with open(folder / n, "rb") as f:
                d = pickle.load(f, encoding="latin1")
            xs.append(np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            ys.append(np.asarray(d["labels"], dtype=np.int64))
        return np.concatenate(xs).transpose(0, 2, 3, 1), np.concatenate(ys)

    with open(folder / "batches.meta", "rb") as f:
        classes = pickle.load(f, encoding="latin1")["label_names"]
    xtr, ytr = load([f"data_batch_{i}" for i in range(1, 6)])
    order = np.random.default_rng(0).permutation(len(ytr))
    xte, yte = load(["test_batch"])
    out.mkdir(parents=True, exist_ok=True)
    torch.save({"images": torch.from_numpy(np.ascontiguousarray(xtr[order])),
                "labels": torch.from_numpy(ytr[order]), "classes": classes}, out / "train.pt")
    torch.save({"images": torch.from_numpy(np.ascontiguousarray(xte)),
                "labels": torch.from_numpy(yte), "classes": classes}, out / "test.pt")


def last_row(text: str) -> dict:
    """The package's final table row: tta_val_acc and total_time_seconds."""
    cols = ["run", "epoch", "train_loss", "train_acc", "val_acc", "tta_val_acc",
            "total_time_seconds"]
    rows = [ln for ln in text.splitlines() if ln.startswith("|") and "eval" in ln]
    cells = [c.strip() for c in rows[-1].strip("|").split("|")]
    return {k: float(v) for k, v in zip(cols, cells) if v and k in cols[5:]}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("root")
    p.add_argument("out")
    p.add_argument("--runs", type=int, default=10)
    a = p.parse_args()
    work = Path(a.out) / "airbench_peer"
    write_pt(Path(a.root), work / "cifar10")
    os.chdir(work)  # the package reads ./cifar10
    import airbench

    airbench.warmup94()
    accs, times = [], []
    for run in range(a.runs):
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            airbench.train94(run=run, verbose=True)
        row = last_row(buf.getvalue())
        accs.append(row["tta_val_acc"])
        times.append(row["total_time_seconds"])
        print(f"airbench train94 run {run}: tta_val_acc {accs[-1]:.4f}  time {times[-1]:.2f} s",
              flush=True)
    res = {"runs": a.runs, "acc_mean": statistics.fmean(accs),
           "acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
           "time_median_s": statistics.median(times), "accs": accs, "times": times,
           "airbench": getattr(airbench, "__version__", "installed"),
           "torch": torch.__version__, "device": torch.cuda.get_device_name()}
    print(f"airbench train94: {res['acc_mean']:.4f} ± {res['acc_std']:.4f} (n={a.runs}), "
          f"median time {res['time_median_s']:.2f} s")
    (Path(a.out) / "airbench_peer.json").write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    sys.exit(main())
