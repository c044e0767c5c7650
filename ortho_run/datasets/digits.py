"""``digits``: scikit-learn's bundled 8×8 handwritten digits (real, offline), 10 classes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ortho_run.config import DataConfig
from ortho_run.datasets.base import SOURCES, DataSet, Split, stratified_holdout, to_uint8


@dataclass
class DigitsConfig(DataConfig):
    name: str = "digits"
    batch_size: int = 64
    test_fraction: float = 0.2  # the fixed stratified hold-out used as the test split
    checks: ClassVar[list] = [("test_fraction", lambda v: 0 < v < 1, "in (0, 1)")]


@SOURCES.register("digits", schema=DigitsConfig)
def load_digits(cfg) -> DataSet:
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    x = to_uint8(torch.from_numpy(d.images).float(), 0.0, 16.0).unsqueeze(1)  # N×1×8×8
    y = torch.from_numpy(d.target).long()
    # a fixed stratified hold-out (seed 0, not the run seed): every run sees the same test set
    train_idx, test_idx = stratified_holdout(y, cfg.test_fraction, seed=0)
    return DataSet(name="digits", train=Split(y=y[train_idx], x=x[train_idx]),
                   test=Split(y=y[test_idx], x=x[test_idx]), num_classes=10, channels=1,
                   image_size=8, class_names=[str(i) for i in range(10)])
