"""What every data source returns, and the split/subset logic shared by all of them.

Array sources (digits, synthetic, cifar*) return uint8 NCHW tensors in host memory so that the
loader can keep them on the device and augment with tensor ops. File sources (imagefolder)
return (path, label) lists read by a DataLoader.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ortho_run.config import DataConfig
from ortho_run.errors import ConfigError, DataError
from ortho_run.registry import Registry

log = logging.getLogger("ortho_run")

#: name -> loader(cfg) -> DataSet; each source file registers itself with its schema
SOURCES: Registry[Callable[[Any], "DataSet"]] = Registry(
    "data source", group="data", package="ortho_run.datasets", base_schema=DataConfig)


@dataclass
class Split:
    """One split: ``x`` (uint8 N×C×H×W), ``files`` (paths) or ``records`` (an indexable of
    images, read lazily: a Hugging Face or torchvision data set too large to decode into
    memory), and int64 labels ``y``."""

    y: torch.Tensor
    x: Optional[torch.Tensor] = None
    files: Optional[List[str]] = None
    records: Optional[Any] = None

    def __len__(self) -> int:
        return len(self.y)

    def select(self, idx: torch.Tensor) -> "Split":
        idx = idx.long()
        return Split(
            y=self.y[idx],
            x=None if self.x is None else self.x[idx],
            files=None if self.files is None else [self.files[i] for i in idx.tolist()],
            records=None if self.records is None else Subset(self.records, idx.tolist()),
        )


class Subset:
    """Records ``items[indices[i]]``."""

    def __init__(self, items, indices: List[int]):
        self.items, self.indices = items, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        return self.items[self.indices[i]]


@dataclass
class DataSet:
    name: str
    train: Split
    test: Split
    num_classes: int
    channels: int
    image_size: int
    class_names: List[str] = field(default_factory=list)
    val: Optional[Split] = None
    mean: Tuple[float, ...] = ()
    std: Tuple[float, ...] = ()
    class_ids: List[int] = field(default_factory=list)  # original label of each class index
    source_classes: int = 0  # the source's number of classes, before ``data.classes``
    #: labels that were names (a CSV's "cat"): each name's class id (recorded in summary.json)
    label_names: Optional[Dict[str, int]] = None

    @property
    def is_array(self) -> bool:
        return self.train.x is not None


def label_ids(columns: Sequence[Sequence], key: str
              ) -> Tuple[List[List[int]], Optional[List[str]]]:
    """The label columns of a data set's splits as class ids. Integers (also written as
    integral floats, as CSV files hold them) stay as they are; labels that are names (``"cat"``)
    become the ids of their sorted set over every split, and that set is returned as the class
    names (else None). ``key`` names the label column in errors."""
    values = [v for col in columns for v in col]

    def integral(v):
        if isinstance(v, bool):
            return True
        if isinstance(v, (int,)) or (hasattr(v, "dtype") and getattr(v, "ndim", 1) == 0):
            try:
                return float(v) == int(v)
            except (TypeError, ValueError):
                return False
        return isinstance(v, float) and v.is_integer()

    if all(integral(v) for v in values):
        return [[int(v) for v in col] for col in columns], None
    if any(v is None or (isinstance(v, float) and v != v) for v in values):
        raise DataError(f"{key}: the label column has missing values (None/NaN): give every "
                        f"image a label, or drop those rows")
    fractional = next((v for v in values if isinstance(v, (float, np.floating))
                       and not float(v).is_integer()), None)
    if fractional is not None:  # a number that is no class id: a score or a target, not a class
        raise DataError(f"{key}: labels must be class ids (integers) or class names (strings); "
                        f"this column holds the number {fractional}: is it the label column?")
    names = sorted({str(v) for v in values})
    ids = {n: i for i, n in enumerate(names)}
    return [[ids[str(v)] for v in col] for col in columns], names


def channel_stats(x: torch.Tensor) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    xf = x.float().div_(255)
    mean = xf.mean(dim=(0, 2, 3))
    std = xf.std(dim=(0, 2, 3)).clamp_min(1e-3)
    return tuple(mean.tolist()), tuple(std.tolist())


#: ``first_<name>``: the first fraction of the class ids (class-incremental steps)
FRACTIONS = {"quarter": 1 / 4, "third": 1 / 3, "half": 1 / 2, "two_thirds": 2 / 3,
             "three_quarters": 3 / 4}
CLASS_SPECS = ("first_quarter, first_third, first_half, first_two_thirds, first_three_quarters, "
               "first_<n>, second_half, all, null or a list of class ids")


def resolve_classes(spec: Any, num_classes: int, key: str = "data.classes"
                    ) -> Optional[List[int]]:
    """Class ids selected by ``spec`` (None: all). ``key`` names the option in errors."""
    if spec is None:
        return None
    if isinstance(spec, str):
        count = spec[len("first_"):] if spec.startswith("first_") else ""
        frac = FRACTIONS.get(count)
        if frac is not None:
            ids = list(range(int(num_classes * frac)))
        elif count.isdigit():
            if int(count) > num_classes:
                raise ConfigError(f"{key}={spec!r}: the data set has only {num_classes} classes")
            ids = list(range(int(count)))
        elif spec == "second_half":
            ids = list(range(num_classes // 2, num_classes))
        elif spec == "all":
            return None
        else:
            raise ConfigError(f"{key}={spec!r}: use {CLASS_SPECS}")
    else:
        try:
            ids = sorted({int(c) for c in spec})
        except (TypeError, ValueError):
            raise ConfigError(f"{key}={spec!r}: expected a list of integer class ids") from None
        bad = [c for c in ids if not 0 <= c < num_classes]
        if bad or not ids:
            raise ConfigError(f"{key}: ids {bad or ids} not in 0..{num_classes - 1}")
    if len(ids) < 2:
        raise ConfigError(f"{key}={spec!r} selects {len(ids)} class of {num_classes}: a "
                          f"classifier (and retrieval) needs at least 2 classes")
    return ids


def _subset(split: Split, ids: List[int]) -> Split:
    lut = torch.full((max(ids) + 1,), -1, dtype=torch.long)
    lut[torch.tensor(ids)] = torch.arange(len(ids))
    keep = torch.nonzero(torch.isin(split.y, torch.tensor(ids)), as_tuple=True)[0]
    out = split.select(keep)
    out.y = lut[out.y]
    return out


def class_fraction(y: torch.Tensor, class_ids: Sequence[int], fraction: float,
                   seed: int) -> torch.Tensor:
    """Sorted indices keeping ``fraction`` of each class's items (at least one). Each class is
    shuffled by a generator seeded with its original id, so a smaller fraction keeps a subset
    of a larger one's items, whatever other classes are present."""
    keep = []
    for label, original in enumerate(class_ids):
        idx = torch.nonzero(y == label, as_tuple=True)[0]
        if not len(idx):
            continue
        gen = torch.Generator().manual_seed(seed + 7919 * (int(original) + 1))
        n = max(1, int(round(len(idx) * fraction)))
        keep.append(idx[torch.randperm(len(idx), generator=gen)[:n]])
    return torch.sort(torch.cat(keep)).values if keep else torch.zeros(0, dtype=torch.long)


def stratified_holdout(y: torch.Tensor, fraction: float, seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Indices (keep, held) with ``fraction`` of each class held out, seeded."""
    gen = torch.Generator().manual_seed(seed)
    keep, held = [], []
    for c in torch.unique(y).tolist():
        idx = torch.nonzero(y == c, as_tuple=True)[0]
        idx = idx[torch.randperm(len(idx), generator=gen)]
        n = int(round(len(idx) * fraction))
        held.append(idx[:n])
        keep.append(idx[n:])
    return torch.sort(torch.cat(keep)).values, torch.sort(torch.cat(held)).values


def finalize(ds: DataSet, cfg) -> DataSet:
    """Apply class subset, validation split, sample cap and normalisation stats."""
    ids = resolve_classes(cfg.classes, ds.num_classes)
    train, test = ds.train, ds.test
    class_ids = list(range(ds.num_classes))
    names = ds.class_names
    if ids is not None:
        train, test = _subset(train, ids), _subset(test, ids)
        class_ids = ids
        names = [names[i] for i in ids] if names else []
    val = None
    if cfg.val_fraction > 0:
        keep, held = stratified_holdout(train.y, cfg.val_fraction, cfg.split_seed)
        if len(held) == 0:
            raise ConfigError(f"data.val_fraction={cfg.val_fraction} holds out no image: each "
                              f"class has too few training images ({len(train)} in all) for "
                              f"that fraction; raise it or set data.val_fraction=0")
        train, val = train.select(keep), train.select(held)
    if cfg.train_fraction < 1.0:
        train = train.select(class_fraction(train.y, class_ids, cfg.train_fraction, cfg.split_seed))
    if cfg.max_train_samples is not None and cfg.max_train_samples < len(train):
        gen = torch.Generator().manual_seed(cfg.split_seed + 1)
        idx = torch.sort(torch.randperm(len(train), generator=gen)[: cfg.max_train_samples]).values
        train = train.select(idx)
    if len(train) == 0 or len(test) == 0:
        raise ConfigError(f"data set {ds.name!r} has an empty train or test split after "
                          f"data.classes / data.max_train_samples")
    if len(class_ids) < 2:
        raise DataError(f"data set {ds.name!r} has {len(class_ids)} class: a classifier (and "
                        f"retrieval) needs at least 2")
    _warn_unseen(train, test, names or [str(c) for c in class_ids], ds.name)
    mean, std = ds.mean, ds.std
    if train.x is not None and not mean:
        mean, std = channel_stats(train.x)
    elif not mean:  # images read lazily: ImageNet's statistics (grey: a mid-grey centre)
        mean, std = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)) if ds.channels == 3 \
            else ((0.5,) * ds.channels, (0.25,) * ds.channels)
    return replace(ds, train=train, test=test, val=val, num_classes=len(class_ids),
                   class_names=names, class_ids=class_ids, mean=mean, std=std,
                   source_classes=ds.num_classes)


def _warn_unseen(train: Split, test: Split, names: Sequence[str], name: str) -> None:
    """Say so when test classes have no training images (they cannot be learned)."""
    n = len(names)
    have = torch.bincount(train.y, minlength=n)[:n]
    test_n = torch.bincount(test.y, minlength=n)[:n]
    unseen = [i for i in range(n) if have[i] == 0 and test_n[i] > 0]
    if unseen:
        log.warning("%s: %d test class(es) have no training images (%s; %d test images): they "
                    "count as errors in test accuracy", name, len(unseen),
                    ", ".join(names[i] for i in unseen[:10]), int(test_n[unseen].sum()))


def load_dataset(cfg) -> DataSet:
    """Build the data set named by ``cfg.name`` (a ``DataConfig``)."""
    source = SOURCES.get(cfg.name)
    try:
        ds = source(cfg)
    except PermissionError as exc:
        raise DataError(f"data={cfg.name}: no permission to read {exc.filename}: make it "
                        f"readable (chmod) or point data.root elsewhere") from None
    except (IsADirectoryError, NotADirectoryError, FileNotFoundError) as exc:
        raise DataError(f"data={cfg.name}: {exc.strerror}: {exc.filename}; check data.root")\
            from None
    return finalize(ds, cfg)


def to_uint8(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    return ((x - lo) / (hi - lo) * 255).round().clamp(0, 255).to(torch.uint8)


def names_or_ids(names: Sequence[str], n: int) -> List[str]:
    return list(names) if names else [str(i) for i in range(n)]


__all__ = ["DataSet", "Split", "SOURCES", "load_dataset", "finalize", "Dict"]
