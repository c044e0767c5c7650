"""Images from other libraries' data sets (Hugging Face ``datasets``, torchvision): decoded once
into uint8 arrays when they fit in memory (so the device-resident path applies), read lazily
through the DataLoader path otherwise."""

from __future__ import annotations

import logging
from typing import Optional, Sequence

import numpy as np
import torch

from ortho_run.datasets.base import Split
from ortho_run.errors import DataError

log = logging.getLogger("ortho_run")


def to_pil(img, what: str = "the data set"):
    """A PIL image from what data sets hold: PIL images, arrays (H×W or H×W×C), tensors; a
    value that is none of them is a DataError (``what`` names where it was read)."""
    from PIL import Image

    if isinstance(img, Image.Image):
        return img
    if isinstance(img, torch.Tensor):
        img = img.numpy()
        if img.ndim == 3 and img.shape[0] in (1, 3):
            img = img.transpose(1, 2, 0)
    try:
        arr = np.asarray(img)
    except (TypeError, ValueError):  # ragged nested lists
        arr = np.asarray(None)
    if (arr.dtype.kind not in "uifb" or arr.ndim not in (2, 3)
            or (arr.ndim == 3 and arr.shape[-1] not in (1, 3, 4)) or 0 in arr.shape):
        shown = repr(img) if len(repr(img)) <= 40 else repr(img)[:40] + "..."
        raise DataError(f"{what}: the image column holds {type(img).__name__} values such as "
                        f"{shown}, not images (a PIL image, an H×W or H×W×C array of numbers, or "
                        f"a tensor): point the image key at the column that holds the images")
    if arr.dtype != np.uint8:
        arr = (arr * 255).clip(0, 255).astype(np.uint8) if arr.max() <= 1.0 else arr.astype(np.uint8)
    return Image.fromarray(arr.squeeze(-1) if arr.ndim == 3 and arr.shape[-1] == 1 else arr)


def image_split(records, labels: Sequence[int], channels: int, image_size: Optional[int],
                in_memory_mb: float, what: str) -> Split:
    """A Split of the images ``records[i]``: uint8 arrays when they fit in ``in_memory_mb`` and
    share a size (or ``image_size`` resizes them), else ``records`` read lazily."""
    y = torch.as_tensor(list(labels), dtype=torch.long)
    n = len(records)
    if n == 0:
        raise DataError(f"{what}: the split is empty")
    first = to_pil(records[0], what)
    w, h = (image_size, image_size) if image_size else first.size
    if n * channels * w * h / 2**20 > in_memory_mb:
        log.info("%s: %d images of %dx%d exceed data.in_memory_mb=%g: read lazily", what, n, w,
                 h, in_memory_mb)
        return Split(y=y, records=records)
    mode = "L" if channels == 1 else "RGB"
    x = np.empty((n, h, w, channels), dtype=np.uint8)
    for i in range(n):
        img = to_pil(records[i], what).convert(mode)
        if img.size != (w, h):
            if not image_size:
                raise DataError(f"{what}: images of different sizes ({first.size} and "
                                f"{img.size} at index {i}); set data.image_size to resize them")
            img = img.resize((w, h))
        arr = np.asarray(img)
        x[i] = arr[..., None] if arr.ndim == 2 else arr
    return Split(y=y, x=torch.from_numpy(x).permute(0, 3, 1, 2).contiguous())


class Field:
    """``data[i][key]`` for each i: the image column of a Hugging Face data set (key: its
    name) or of a torchvision one (key 0 of its (image, target) pairs), read lazily."""

    def __init__(self, data, key):
        self.data, self.key = data, key

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        return self.data[int(i)][self.key]


def channels_of(img, what: str = "the data set") -> int:
    return 1 if to_pil(img, what).mode in ("L", "1", "I", "F", "I;16") else 3
