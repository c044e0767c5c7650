"""``cifar10`` / ``cifar100`` in the standard python-pickle layout under ``data.root``.

    <root>/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}
    <root>/cifar-100-python/{train, test, meta}

The pickles are read once into uint8 N×3×32×32 tensors (no per-sample PIL). With
``data.download=true`` the archive is fetched and its MD5 checked; offline, or with download off,
a missing file is a clear error saying where to put the files.

``write_cifar`` writes the layout (the tests' fixtures, and ``python -m ortho_run.datasets
from-jpeg``: ``jpeg_archive.py``).
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import List, Tuple

import numpy as np
import torch

from dataclasses import dataclass

from ortho_run.config import Augment, DataConfig
from ortho_run.datasets.base import SOURCES, DataSet, Split
from ortho_run.errors import DataError


@dataclass
class CifarConfig(DataConfig):
    """cifar10 and cifar100 (each gets this schema with its own ``name``)."""

    root: str = "data"  # holds cifar-10-batches-py/ or cifar-100-python/
    download: bool = False
    augment: Augment = Augment.crop_flip

SPECS = {
    "cifar10": dict(
        folder="cifar-10-batches-py",
        url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        md5="c58f30108f718f92721af3b95e74349a",
        train=[f"data_batch_{i}" for i in range(1, 6)], test=["test_batch"],
        meta="batches.meta", label_key="labels", names_key="label_names", num_classes=10),
    "cifar100": dict(
        folder="cifar-100-python",
        url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        md5="eb9058c3a382ffc7106e4002c42a8d85",
        train=["train"], test=["test"], meta="meta", label_key="fine_labels",
        names_key="fine_label_names", num_classes=100),
}


def _missing_message(name: str, root: Path, missing: List[str], why: str) -> str:
    spec = SPECS[name]
    return (f"{name}: {why}: {', '.join(missing)} not found under {root / spec['folder']}. "
            f"Put the extracted python version of {name} there (download {spec['url']} and run "
            f"`tar xzf {Path(spec['url']).name} -C {root}`), set data.root to the folder that "
            f"holds {spec['folder']}/, or run with data.download=true on a machine with network "
            f"access.")


def _download(name: str, root: Path) -> None:
    from torchvision.datasets.utils import download_and_extract_archive

    spec = SPECS[name]
    try:
        download_and_extract_archive(spec["url"], str(root), md5=spec["md5"])
    except Exception as exc:  # network down, proxy, checksum mismatch
        raise DataError(_missing_message(name, root, [spec["folder"]],
                                         f"download failed ({type(exc).__name__}: {exc})")) from None


def _read_batch(path: Path, label_key: str) -> Tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            obj = pickle.load(f, encoding="latin1")
        raw = np.asarray(obj["data"])
        labels = np.asarray(obj[label_key], dtype=np.int64)
    except (pickle.UnpicklingError, EOFError, KeyError, ValueError, TypeError, AttributeError,
            ImportError, IndexError) as exc:
        raise DataError(f"{path} is not a readable CIFAR python batch ({type(exc).__name__}: "
                        f"{exc}). It is truncated or in another format: delete it and extract the "
                        f"python version of the archive again.") from None
    if raw.dtype != np.uint8 and not (np.issubdtype(raw.dtype, np.integer) and raw.size
                                      and raw.min() >= 0 and raw.max() <= 255):
        what = (f"{raw.dtype} values in [{raw.min():.3g}, {raw.max():.3g}]" if raw.size
                and np.issubdtype(raw.dtype, np.number) else f"dtype {raw.dtype}")
        raise DataError(f"{path}: 'data' holds {what}; the CIFAR format stores uint8 pixels "
                        f"0..255 (floats in [0, 1] would all round to black). Write the batch as "
                        f"uint8 (x * 255).round().astype('uint8') or extract the original files.")
    data = raw.astype(np.uint8)
    if data.ndim != 2 or data.shape[1] != 3072 or len(data) != len(labels):
        raise DataError(f"{path}: expected 'data' of shape N×3072 and N labels, got "
                        f"{data.shape} and {len(labels)}: delete it and extract it again.")
    return data.reshape(-1, 3, 32, 32), labels


def read_cifar(name: str, root: str, download: bool = False) -> DataSet:
    spec = SPECS[name]
    root_p = Path(os.path.expanduser(root))
    folder = root_p / spec["folder"]
    files = spec["train"] + spec["test"]
    missing = [f for f in files if not (folder / f).is_file()]
    if missing and download:
        _download(name, root_p)
        missing = [f for f in files if not (folder / f).is_file()]
    if missing:
        raise DataError(_missing_message(name, root_p, missing, "data files missing"))

    def load(parts):
        xs, ys = zip(*(_read_batch(folder / p, spec["label_key"]) for p in parts))
        return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))

    xtr, ytr = load(spec["train"])
    xte, yte = load(spec["test"])
    k = spec["num_classes"]
    for split, y in (("train", ytr), ("test", yte)):
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= k):
            raise DataError(f"{folder}: {split} labels outside 0..{k - 1}; is this {name}?")
    names = [str(i) for i in range(k)]
    meta = folder / spec["meta"]
    if meta.is_file():
        try:
            with open(meta, "rb") as f:
                names = list(pickle.load(f, encoding="latin1")[spec["names_key"]])
        except Exception:
            pass  # names are cosmetic
    return DataSet(name=name, train=Split(y=ytr, x=xtr), test=Split(y=yte, x=xte),
                   num_classes=k, channels=3, image_size=32, class_names=names)


@SOURCES.register("cifar10", schema=CifarConfig)
def load_cifar10(cfg) -> DataSet:
    return read_cifar("cifar10", cfg.root, cfg.download)


@SOURCES.register("cifar100", schema=CifarConfig)
def load_cifar100(cfg) -> DataSet:
    return read_cifar("cifar100", cfg.root, cfg.download)


# --- writing the format (tests, and the shared JPEG archive) ---------------------------------
def write_cifar(root: str, name: str, x_train: np.ndarray, y_train: np.ndarray,
                x_test: np.ndarray, y_test: np.ndarray, class_names: List[str]) -> Path:
    """Write uint8 N×3×32×32 arrays in the official python-pickle layout of ``name``."""
    spec = SPECS[name]
    folder = Path(root) / spec["folder"]
    folder.mkdir(parents=True, exist_ok=True)

    def dump(fname, x, y):
        # one row per image, also for a batch left empty (fewer than 5 training images)
        obj = {"data": np.ascontiguousarray(x, dtype=np.uint8).reshape(
                   len(x), int(np.prod(x.shape[1:]))),
               spec["label_key"]: [int(v) for v in y], "batch_label": fname}
        with open(folder / fname, "wb") as f:
            pickle.dump(obj, f, protocol=2)

    chunks = np.array_split(np.arange(len(x_train)), len(spec["train"]))
    for fname, idx in zip(spec["train"], chunks):
        dump(fname, x_train[idx], y_train[idx])
    dump(spec["test"][0], x_test, y_test)
    with open(folder / spec["meta"], "wb") as f:
        pickle.dump({spec["names_key"]: list(class_names)}, f, protocol=2)
    return folder
