"""``data=hf``: a Hugging Face ``datasets`` data set, from the hub or local files.

``data.path`` is a hub name (``load_dataset(path, data.config_name)``), a folder written by
``save_to_disk`` (``load_from_disk``), or a data file or folder that ``load_dataset`` reads by
its type (``.parquet``, ``.csv``, ``.json``/``.jsonl``, ``.arrow``). Images come from the
``data.image_key`` column, labels from ``data.label_key`` (a ClassLabel gives the class names);
``data.train_split``/``data.test_split`` name the splits, and a data set without a test split
gets a stratified ``data.test_fraction`` hold-out. Class subsets and validation splits work as
for every source. Decoded once to uint8 arrays when they fit in ``data.in_memory_mb`` (the
device-resident path), read lazily through the DataLoader path otherwise. Needs the
``datasets`` package: ``pip install 'ortho-run[hf]'``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Optional

import torch
from omegaconf import MISSING

from ortho_run.config import DataConfig, at_least
from ortho_run.datasets.base import SOURCES, DataSet, label_ids, stratified_holdout
from ortho_run.datasets.records import Field, channels_of, image_split
from ortho_run.errors import ConfigError, DataError, described

FILE_TYPES = {".parquet": "parquet", ".csv": "csv", ".json": "json", ".jsonl": "json",
              ".arrow": "arrow"}


@dataclass
class HFConfig(DataConfig):
    name: str = "hf"
    path: str = MISSING  # hub name, save_to_disk folder, or a data file
    config_name: Optional[str] = None
    image_key: str = "image"
    label_key: str = "label"
    train_split: str = "train"
    test_split: str = "test"
    test_fraction: float = 0.2  # without a test split: a stratified, seeded hold-out
    image_size: Optional[int] = None  # resize to this; images must share a size otherwise
    in_memory_mb: float = 4096.0
    checks: ClassVar[list] = (at_least(1, "image_size") + at_least(0, "in_memory_mb")
                              + [("test_fraction", lambda v: 0 < v < 1, "in (0, 1)")])


def require_datasets():
    try:
        import datasets
    except ImportError:
        raise ConfigError("data=hf needs the datasets package: pip install 'ortho-run[hf]' "
                          "(or pip install datasets)") from None
    return datasets


def open_hf(cfg):
    datasets = require_datasets()
    p = Path(str(cfg.path)).expanduser()
    try:
        if p.is_dir() and ((p / "dataset_dict.json").exists() or (p / "dataset_info.json").exists()
                           or (p / "state.json").exists()):
            d = datasets.load_from_disk(str(p))
        elif p.exists():
            kind = FILE_TYPES.get(p.suffix) if p.is_file() else None
            if p.is_file() and kind is None:
                raise DataError(f"data.path={p}: a {p.suffix or 'suffix-less'} file; give a "
                                f"{', '.join(FILE_TYPES)} file, a save_to_disk folder or a hub name")
            d = (datasets.load_dataset(kind, data_files=str(p)) if kind
                 else datasets.load_dataset(str(p), cfg.config_name))
        else:
            d = datasets.load_dataset(str(cfg.path), cfg.config_name)
    except DataError:
        raise
    except Exception as exc:  # no network, no such data set, unreadable files
        raise DataError(f"data.path={cfg.path}: cannot load it ("
                        f"{described(exc)}). Give a local save_to_disk folder "
                        f"or data file, or a hub name reachable from this machine.") from None
    if isinstance(d, datasets.Dataset):
        d = datasets.DatasetDict({cfg.train_split: d})
    return d


@SOURCES.register("hf", schema=HFConfig)
def load_hf(cfg) -> DataSet:
    d = open_hf(cfg)
    if cfg.train_split not in d:
        raise DataError(f"data.train_split={cfg.train_split}: not a split of {cfg.path}; its "
                        f"splits: {', '.join(d)}")
    train = d[cfg.train_split]
    for key, opt in ((cfg.image_key, "data.image_key"), (cfg.label_key, "data.label_key")):
        if key not in train.column_names:
            raise DataError(f"{opt}={key}: no such column in {cfg.path}; its columns: "
                            f"{', '.join(train.column_names)}")
    feature = train.features.get(cfg.label_key)
    names = list(getattr(feature, "names", None) or [])
    key = f"data.label_key={cfg.label_key}"
    test = d[cfg.test_split] if cfg.test_split in d else None
    others = [s for s in d if s != cfg.train_split]
    if test is None and others:  # a hold-out only where the data set has no other split
        raise DataError(f"data.test_split={cfg.test_split}: not a split of {cfg.path}; its "
                        f"splits: {', '.join(d)}. Name the one to test on (a data set with a "
                        f"training split alone gets a stratified data.test_fraction hold-out)")
    columns = [train[cfg.label_key]] + ([test[cfg.label_key]] if test is not None else [])
    ids, named = label_ids(columns, key)
    if named:
        names = named
    labels = ids[0]
    if test is not None:
        parts = [(train, labels), (test, ids[1])]
    else:  # one split: a stratified hold-out as the test split
        keep, held = stratified_holdout(torch.tensor(labels), cfg.test_fraction, seed=0)
        parts = [(train.select(keep.tolist()), [labels[i] for i in keep.tolist()]),
                 (train.select(held.tolist()), [labels[i] for i in held.tolist()])]
    k = len(names) if names else max(labels) + 1
    bad = [v for _, ys in parts for v in ys if not 0 <= v < k]
    if bad:
        raise DataError(f"data.label_key={cfg.label_key}: labels must be class indices 0..{k - 1}"
                        f" (found {bad[0]})")
    channels = channels_of(parts[0][0][0][cfg.image_key],
                           f"data.image_key={cfg.image_key} in {cfg.path}")
    splits = [image_split(Field(s, cfg.image_key), ys, channels, cfg.image_size,
                          cfg.in_memory_mb, f"data=hf {cfg.path}") for s, ys in parts]
    size = splits[0].x.shape[-1] if splits[0].x is not None else (cfg.image_size or 224)
    return DataSet(name="hf", train=splits[0], test=splits[1], num_classes=k, channels=channels,
                   image_size=int(size), class_names=names or [str(i) for i in range(k)],
                   label_names={n: i for i, n in enumerate(named)} if named else None)


__all__ = ["load_hf"]
