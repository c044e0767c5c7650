"""The JPEG archive format of CIFAR-10, and ``python -m ortho_run.datasets from-jpeg NPZ ROOT``,
which decodes it once into the python-pickle layout that ``data=cifar10`` reads.

An archive is a ``.npz`` holding, for each split (``train``, ``test``):

    <split>_jpeg     uint8, the bytes of every JPEG file concatenated
    <split>_offsets  N + 1 integers: image i is <split>_jpeg[offsets[i]:offsets[i + 1]]
    <split>_labels   N integers, class ids in 0 .. len(classes) - 1

and ``classes``, the class names in id order. Every part is checked before any image is decoded,
an image that does not decode (or is not 32×32) is named by its split and index, and the layout
is written into a temporary folder that replaces ``ROOT/cifar-10-batches-py`` only once it is
complete: a refused or interrupted conversion leaves ROOT as it was.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import threading
import zipfile
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from ortho_run.datasets.cifar import SPECS, write_cifar
from ortho_run.errors import DataError, OrthoRunError, described, stops_with

SPLITS = ("train", "test")
FORMAT = ("an archive holds <split>_jpeg (uint8 JPEG bytes, concatenated), <split>_offsets "
          "(N + 1 integers from 0 to the byte count) and <split>_labels (N class ids) for "
          "train and test, and classes (the class names)")


def _bad(path, what: str) -> DataError:
    return DataError(f"{path}: {what}; {FORMAT}")


def read_archive(path: str | os.PathLike, classes: Optional[int] = None) -> Dict[str, np.ndarray]:
    """Every array of the archive at ``path``, checked against the format (with ``classes``,
    also that it names that many classes); a ``DataError`` names each part that is wrong."""
    try:
        z = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise DataError(f"{path}: no such file; give the .npz archive of JPEG images") from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):
        raise _bad(path, "not a .npz archive (neither a zip of .npy arrays nor one .npy)") from None
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise _bad(path, "a single .npy array, not a .npz archive")
    with z:
        need = [f"{s}_{k}" for s in SPLITS for k in ("jpeg", "offsets", "labels")] + ["classes"]
        missing = [k for k in need if k not in z.files]
        if missing:
            raise _bad(path, f"{', '.join(missing)} missing (it holds {', '.join(z.files) or 'nothing'})")
        try:
            arrays = {k: z[k] for k in need}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
            raise _bad(path, f"an array cannot be read ({described(exc)})") from None
    errors = _problems(arrays, classes)
    if errors:
        raise _bad(path, "; ".join(errors))
    return arrays


def _problems(a: Dict[str, np.ndarray], classes: Optional[int]) -> List[str]:
    names = a["classes"]
    errors = []
    if names.ndim != 1 or not len(names) or names.dtype.kind not in "US":
        errors.append(f"classes must be a list of names, not {names.dtype} of shape {names.shape}")
    elif len(set(names.tolist())) != len(names):
        errors.append("classes holds a name twice")
    elif classes is not None and len(names) != classes:
        errors.append(f"classes names {len(names)} classes; the layout written holds {classes}")
    k = len(names) if names.ndim == 1 else 0
    for s in SPLITS:
        blob, offsets, labels = a[f"{s}_jpeg"], a[f"{s}_offsets"], a[f"{s}_labels"]
        if blob.ndim != 1 or blob.dtype != np.uint8:
            errors.append(f"{s}_jpeg must be 1-D uint8 bytes, not {blob.dtype} of shape {blob.shape}")
        if labels.ndim != 1 or labels.dtype.kind not in "iu" or not len(labels):
            errors.append(f"{s}_labels must be a non-empty list of integer class ids, not "
                          f"{labels.dtype} of shape {labels.shape}")
        elif k and (labels.min() < 0 or labels.max() >= k):
            errors.append(f"{s}_labels holds ids outside 0..{k - 1} (from {labels.min()} to "
                          f"{labels.max()}) for the {k} names of classes")
        if offsets.ndim != 1 or offsets.dtype.kind not in "iu":
            errors.append(f"{s}_offsets must be 1-D integers, not {offsets.dtype} of shape "
                          f"{offsets.shape}")
            continue
        if labels.ndim == 1 and len(offsets) != len(labels) + 1:
            errors.append(f"{s}_offsets holds {len(offsets)} offsets for {len(labels)} labels "
                          f"(one more than the images)")
        elif len(offsets) and (offsets[0] != 0 or offsets[-1] != blob.size):
            errors.append(f"{s}_offsets runs from {offsets[0]} to {offsets[-1]}, not from 0 to "
                          f"the {blob.size} bytes of {s}_jpeg")
        elif (np.diff(offsets) <= 0).any():
            i = int(np.flatnonzero(np.diff(offsets) <= 0)[0])
            errors.append(f"{s}_offsets does not increase at image {i} "
                          f"({offsets[i]} -> {offsets[i + 1]}): each image has bytes of its own")
    return errors


def _decode(args) -> np.ndarray:
    import io

    from PIL import Image

    split, blob, offsets, index = args
    out = np.empty((len(index), 3, 32, 32), dtype=np.uint8)
    for j, i in enumerate(index):
        try:
            img = Image.open(io.BytesIO(blob[offsets[i]:offsets[i + 1]].tobytes()))
            img = img.convert("RGB")
        except (OSError, ValueError, SyntaxError) as exc:  # PIL's errors of a broken file
            raise DataError(f"{split} image {i} (bytes {offsets[i]}..{offsets[i + 1]}) is no "
                            f"image Pillow can decode ({type(exc).__name__}): the archive is "
                            f"damaged; write it again") from None
        if img.size != (32, 32):
            raise DataError(f"{split} image {i} is {img.size[0]}×{img.size[1]}: the CIFAR-10 "
                            f"layout holds 32×32 images")
        out[j] = np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)
    return out


def decode_split(arrays: Dict[str, np.ndarray], split: str, limit: Optional[int] = None,
                 workers: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """uint8 N×3×32×32 images and their labels of ``split`` (``read_archive``'s arrays); with
    ``limit``, that many images spread evenly over the split (its rows may be sorted by class)."""
    blob, offsets, labels = (arrays[f"{split}_{k}"] for k in ("jpeg", "offsets", "labels"))
    n = len(labels) if limit is None else min(limit, len(labels))
    index = (np.arange(n) if n == len(labels)
             else np.linspace(0, len(labels) - 1, n).round().astype(np.int64))
    workers = workers or min(16, os.cpu_count() or 1)
    chunks = [c for c in np.array_split(index, workers * 4) if len(c)]
    if workers > 1 and len(chunks) > 1 and n >= 1000:  # below that a pool costs more than it saves
        from concurrent.futures import ProcessPoolExecutor

        ex = ProcessPoolExecutor(workers)
        try:
            parts = list(ex.map(_decode, [(split, blob, offsets, c) for c in chunks]))
        finally:  # a failed image or a stop: the chunks not begun are dropped, not decoded
            ex.shutdown(wait=True, cancel_futures=True)
    else:
        parts = [_decode((split, blob, offsets, index))]
    return np.concatenate(parts), labels[index].astype(np.int64)


def decode_jpeg_npz(npz_path: str, split: str, limit: Optional[int] = None, workers: int = 0):
    """One split of the archive at ``npz_path``: images, labels and the class names."""
    arrays = read_archive(npz_path)
    x, y = decode_split(arrays, split, limit, workers)
    return x, y, [str(c) for c in arrays["classes"]]


def convert(npz: str, root: str, limit: Optional[int] = None, workers: int = 0,
            overwrite: bool = False) -> Tuple[Path, int, int]:
    """Write ``root/cifar-10-batches-py`` from the archive ``npz``; return the folder and the
    train and test image counts. A folder that already holds files is replaced only with
    ``overwrite``, and only once the new one is complete."""
    spec = SPECS["cifar10"]
    root_p = Path(os.path.expanduser(root))
    target = root_p / spec["folder"]
    if root_p.exists() and not root_p.is_dir():
        raise DataError(f"{root_p} is a file: give the folder to write {spec['folder']}/ in")
    if target.exists() and not overwrite and (not target.is_dir() or any(target.iterdir())):
        raise DataError(f"{target} already exists and holds files: it is left as it is; give "
                        f"another ROOT, or --overwrite to replace it")
    arrays = read_archive(npz, classes=spec["num_classes"])
    (xtr, ytr), (xte, yte) = (decode_split(arrays, s, limit, workers) for s in SPLITS)
    try:
        root_p.mkdir(parents=True, exist_ok=True)
        tmp = Path(_fresh(root_p, ".from-jpeg"))
        try:
            write_cifar(str(tmp), "cifar10", xtr, ytr, xte, yte,
                        [str(c) for c in arrays["classes"]])
            old = None
            with _signals_held():  # the swap is whole: a stop lands before or after it
                if target.exists():
                    old = Path(_fresh(root_p, f".{spec['folder']}.old"))
                    os.replace(target, old / spec["folder"])
                try:
                    os.replace(tmp / spec["folder"], target)
                except OSError:
                    if old is not None:  # the old layout goes back where it was
                        os.replace(old / spec["folder"], target)
                        old.rmdir()
                    raise
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as exc:
        raise DataError(f"writing {target} failed ({exc.strerror or exc}): {root_p} is left as "
                        f"it was; free space or pick another ROOT") from None
    return target, len(ytr), len(yte)


@contextlib.contextmanager
def _signals_held():
    """SIGINT and SIGTERM wait (where the platform can hold them) until the block is done."""
    import signal

    held = {signal.SIGINT, signal.SIGTERM}
    can = (hasattr(signal, "pthread_sigmask")
           and threading.current_thread() is threading.main_thread())
    if can:
        signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        if can:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, held)


def _fresh(parent: Path, prefix: str) -> str:
    import tempfile

    return tempfile.mkdtemp(prefix=f"{prefix}.{os.getpid()}.", dir=parent)


def _positive(text: str) -> int:
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {v}")
    return v


def _count(text: str) -> int:
    v = int(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be 0 (one per core, at most 16) or more, not {v}")
    return v


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m ortho_run.datasets")
    sub = p.add_subparsers(dest="cmd", required=True)
    q = sub.add_parser("from-jpeg", help="write the CIFAR-10 pickle layout from a JPEG .npz",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    q.add_argument("npz", help="the archive")
    q.add_argument("root", help="the folder to write cifar-10-batches-py/ in (data.root)")
    q.add_argument("--limit", type=_positive, default=None,
                   help="images per split, spread evenly over it")
    q.add_argument("--workers", type=_count, default=0,
                   help="decoding processes (0: one per core, at most 16)")
    q.add_argument("--overwrite", action="store_true",
                   help="replace ROOT/cifar-10-batches-py when it holds files")
    a = p.parse_args(argv)
    # a stop: the decoding processes stop, ROOT is kept
    with stops_with(f"stopped: nothing was written, {a.root} is left as it was"):
        try:
            folder, n_train, n_test = convert(a.npz, a.root, a.limit, a.workers, a.overwrite)
        except OrthoRunError as exc:
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(exc.exit_code)
    print(f"wrote {n_train} train / {n_test} test images to {folder}")
