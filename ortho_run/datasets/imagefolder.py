"""``imagefolder``: a class-per-folder tree (ImageNet layout, custom data sets).

    <root>/train/<class>/*.jpg     <root>/test/<class>/*.jpg   (or val/ instead of test/)

Read by the DataLoader pipeline (workers, pinned memory); images are resized/cropped to
``data.image_size``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from omegaconf import MISSING

from ortho_run.config import Augment, DataConfig, Pipeline, at_least, report
from ortho_run.datasets.base import SOURCES, DataSet, Split
from ortho_run.errors import DataError, described

log = logging.getLogger("ortho_run")


@dataclass
class ImageFolderConfig(DataConfig):
    name: str = "imagefolder"
    root: str = MISSING  # holds train/<class>/... and test/<class>/... (or val/)
    image_size: int = 224
    batch_size: int = 256
    augment: Augment = Augment.crop_flip
    pipeline: Pipeline = Pipeline.loader
    num_workers: int = report(8)
    # open every image once at load time and leave out (with a count) those that cannot be
    # decoded; off: a bad image stops the run naming the file
    verify_images: bool = False
    checks: ClassVar[list] = at_least(1, "image_size")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _scan(folder: Path, classes=None, allow_empty: bool = False):
    from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

    if classes is None:
        classes = sorted(e.name for e in os.scandir(folder) if e.is_dir())
    if not classes:
        raise DataError(f"{folder} holds no class folders: expected {folder}/<class>/<image>")
    idx = {c: i for i, c in enumerate(classes)}
    try:
        samples = make_dataset(str(folder), idx, extensions=IMG_EXTENSIONS,
                               allow_empty=allow_empty)
    except FileNotFoundError as exc:
        raise DataError(f"{folder}: {exc}") from None
    return classes, samples


def check_image(path: str) -> None:
    """Decode one image fully; DataError naming the file if it cannot be."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.convert("RGB").load()
    except Exception as exc:  # UnidentifiedImageError, truncated files, OSError
        raise DataError(f"cannot decode the image {path} ("
                        f"{described(exc)}): remove or replace it, "
                        f"or set data.verify_images=true to leave out every such file") from None


def _verified(samples, split: str):
    good, bad = [], []
    for path, label in samples:
        try:
            check_image(path)
            good.append((path, label))
        except DataError:
            bad.append(path)
    if bad:
        log.warning("imagefolder: left out %d %s image(s) that cannot be decoded, e.g. %s",
                    len(bad), split, ", ".join(bad[:3]))
    return good


@SOURCES.register("imagefolder", schema=ImageFolderConfig)
def load_imagefolder(cfg) -> DataSet:
    root = Path(os.path.expanduser(cfg.root))
    train_dir = root / "train"
    test_dir = next((root / s for s in ("test", "val") if (root / s).is_dir()), None)
    if not train_dir.is_dir() or test_dir is None:
        raise DataError(f"data=imagefolder: expected {root}/train/<class>/... and "
                        f"{root}/test/<class>/... (or val/); set data.root to that folder.")
    classes, train = _scan(train_dir)
    # a class the test split lacks still trains; the test split measures the others
    _, test = _scan(test_dir, classes, allow_empty=True)
    if not test:
        raise DataError(f"{test_dir} holds no image of the classes of {train_dir} "
                        f"({', '.join(classes[:10])}): expected {test_dir}/<class>/<image>")
    untested = sorted(set(classes) - {classes[label] for _, label in test})
    if untested:
        log.warning("imagefolder: %d class(es) of train have no image in %s (%s): they still "
                    "train, and the test split measures the other classes", len(untested),
                    test_dir.name, ", ".join(untested[:10]))
    extra = sorted(set(e.name for e in os.scandir(test_dir) if e.is_dir()) - set(classes))
    if extra:
        n = sum(len(list((test_dir / c).iterdir())) for c in extra)
        log.warning("imagefolder: %d class folder(s) of %s have no training folder and are left "
                    "out of the test split (%s; %d files)", len(extra), test_dir.name,
                    ", ".join(extra[:10]), n)
    if cfg.verify_images:
        train, test = _verified(train, "train"), _verified(test, test_dir.name)

    def split(samples):
        return Split(y=torch.tensor([s[1] for s in samples], dtype=torch.long),
                     files=[s[0] for s in samples])

    return DataSet(name="imagefolder", train=split(train), test=split(test),
                   num_classes=len(classes), channels=3, image_size=cfg.image_size,
                   class_names=classes, mean=IMAGENET_MEAN, std=IMAGENET_STD)
