"""``data=torchvision``: any ``torchvision.datasets`` class by name (``data.dataset``), e.g.
CIFAR10, CIFAR100, SVHN, STL10, Flowers102, Food101, or ImageFolder for a
``<root>/<train_split>/<class>/...`` + ``<root>/<test_split>/<class>/...`` tree.

The class's own split argument is used: ``train=True/False`` where it has one, else
``split=data.train_split/data.test_split``, else (folder data sets) the sub-folders of those
names under ``data.root``. ``data.download=true`` lets torchvision fetch the files. Decoded once
to uint8 arrays when they fit in ``data.in_memory_mb`` (images of one size, or resized to
``data.image_size``), read lazily through the DataLoader path otherwise. (The plugin's own name
is ``data.name``; the torchvision class is ``data.dataset``.)
"""

from __future__ import annotations

import difflib
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Optional

from omegaconf import MISSING

from ortho_run.config import DataConfig, at_least
from ortho_run.datasets.base import SOURCES, DataSet, label_ids
from ortho_run.datasets.records import Field, channels_of, image_split
from ortho_run.errors import ConfigError, DataError, first_line


@dataclass
class TorchvisionDataConfig(DataConfig):
    name: str = "torchvision"
    dataset: str = MISSING  # a torchvision.datasets class name
    root: str = "data"
    download: bool = False
    train_split: str = "train"
    test_split: str = "test"
    image_size: Optional[int] = None
    in_memory_mb: float = 4096.0
    checks: ClassVar[list] = at_least(1, "image_size") + at_least(0, "in_memory_mb")


def _open(cls, cfg, split_name: str, train: bool):
    params = inspect.signature(cls.__init__).parameters
    root = str(Path(str(cfg.root)).expanduser())
    kw = {"download": cfg.download} if "download" in params else {}
    if "train" in params:
        return cls(root, train=train, **kw)
    if "split" in params:
        return cls(root, split=split_name, **kw)
    return cls(str(Path(root) / split_name))  # folder data sets: one folder per split


def _labels(d):
    for attr in ("targets", "labels", "_labels", "y"):
        v = getattr(d, attr, None)
        if v is not None and len(v) == len(d):
            return list(v)
    return [d[i][1] for i in range(len(d))]


def expected_files(cls, root: Path, train_split: str, test_split: str) -> str:
    """The files a torchvision data set class reads, as far as its class attributes say
    (``base_folder``, ``filename``, ``train_list``/``test_list``, ``split_list``,
    ``resources``, ``url``), joined for a message; empty when it names none."""
    folder = getattr(cls, "base_folder", None)
    names = []

    def add(v):
        if isinstance(v, (list, tuple)):
            v = next((x for x in v if isinstance(x, str) and "." in Path(x).name
                      and not x.startswith("http")), None) or (
                Path(v[0]).name if v and isinstance(v[0], str) else None)
        if isinstance(v, str) and v and v not in names:
            names.append(Path(v).name if v.startswith("http") else v)

    for attr in ("filename", "zip_filename", "tgz_filename"):
        add(getattr(cls, attr, None))
    for attr in ("train_list", "test_list", "resources", "mirrors_resources"):
        for entry in getattr(cls, attr, None) or []:
            add(entry)
    split_list = getattr(cls, "split_list", None)
    if isinstance(split_list, dict):
        for split in (train_split, test_split):
            if split in split_list:
                add(split_list[split])
    for entry in (getattr(cls, "_file_dict", None) or {}).values():
        add(entry)
    for attr in ("url", "_URL", "_URLS"):
        if not names and isinstance(getattr(cls, attr, None), str):
            add(getattr(cls, attr))
    if isinstance(getattr(cls, "raw_folder", None), property):  # MNIST and its kin
        folder = f"{cls.__name__}/raw"
    if not names and not folder:
        if not {"train", "split"} & set(inspect.signature(cls.__init__).parameters):
            return f"one folder per split: {root / train_split}/ and {root / test_split}/"
        return ""
    where = root / folder if folder else root
    return f"{where}/" + (f" with {', '.join(names[:8])}" if names else "")


def dataset_class(name: str):
    """The torchvision data set class ``name``, checked to be one that ``_open`` can build (a
    root folder, and nothing else it must be given); a ConfigError naming the key otherwise."""
    import torchvision

    cls = getattr(torchvision.datasets, name, None)
    if not isinstance(cls, type):
        known = [n for n in dir(torchvision.datasets) if n[0].isupper()]
        close = difflib.get_close_matches(name, known, n=5)
        raise ConfigError(f"data.dataset={name} is not a torchvision data set"
                          + (f"; close names: {', '.join(close)}" if close else ""))
    params = inspect.signature(cls.__init__).parameters
    needed = [n for n, q in list(params.items())[1:] if q.default is inspect.Parameter.empty
              and q.kind in (q.POSITIONAL_OR_KEYWORD, q.KEYWORD_ONLY) and n != "root"]
    if "root" not in params or needed:
        raise ConfigError(f"data.dataset={name}: data=torchvision builds a class from a root "
                          f"folder (with train=, split= or one folder per split, and download=)"
                          f"; {name}({', '.join(list(params)[1:])}) "
                          + (f"also needs {', '.join(needed)}" if "root" in params
                             else "takes no root") + ": pick a data set of files of that form")
    return cls


@SOURCES.register("torchvision", schema=TorchvisionDataConfig)
def load_torchvision(cfg) -> DataSet:
    name = str(cfg.dataset)
    cls = dataset_class(name)
    try:
        parts = [_open(cls, cfg, cfg.train_split, True), _open(cls, cfg, cfg.test_split, False)]
    except (RuntimeError, FileNotFoundError, OSError, ValueError) as exc:
        files = expected_files(cls, Path(str(cfg.root)).expanduser(), cfg.train_split,
                               cfg.test_split)
        raise DataError(f"data=torchvision {name}: {first_line(exc)} (data.root="
                        f"{cfg.root}). " + (f"It reads {files}. " if files else "")
                        + "Put those files under data.root, or set data.download=true on a "
                          "machine with network.") from None
    labels, named = label_ids([_labels(d) for d in parts], f"data=torchvision {name} targets")
    classes = named or list(getattr(parts[0], "classes", None) or [])
    k = len(classes) if classes else max(max(ys) for ys in labels) + 1
    channels = channels_of(parts[0][0][0], f"data=torchvision {name}")
    splits = [image_split(Field(d, 0), ys, channels, cfg.image_size, cfg.in_memory_mb,
                          f"data=torchvision {name}") for d, ys in zip(parts, labels)]
    size = splits[0].x.shape[-1] if splits[0].x is not None else (cfg.image_size or 224)
    return DataSet(name=f"torchvision/{name}", train=splits[0], test=splits[1], num_classes=k,
                   channels=channels, image_size=int(size),
                   class_names=[str(c) for c in classes] or [str(i) for i in range(k)],
                   label_names={n: i for i, n in enumerate(named)} if named else None)


# the pre-flight's (validate): the class is looked up and checked before any work
load_torchvision.check = lambda run_cfg: dataset_class(str(run_cfg.data.dataset))
