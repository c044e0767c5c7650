"""``ce``: the baseline — a linear head with bias on the penultimate feature, softmax CE.

``norm_feature=true`` is the head of the BT²/OCA code's models (``norm_feature: True`` in their
configs): the feature is L2-normalised before a linear head, which is then bias-free unless
``bias`` says otherwise (``bias`` null: with bias on raw features, without on unit features).
``scale_by_width`` and ``init_std=1`` with ``bias=false`` make airbench's head (logits of a
bias-free linear layer divided by the feature width, weights initialised to unit std).
The compatibility presets train their old models this way (``compat.old_norm_feature``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ortho_run.config import MethodConfig
from ortho_run.methods.base import (ROW_ORTHOGONALITY, LinearHead, Method, MethodOutput, register,
                                    row_orthogonality)


@dataclass
class CEConfig(MethodConfig):
    name: str = "ce"
    bias: Optional[bool] = None  # null: True on raw features, False with norm_feature
    norm_feature: bool = False  # L2-normalise the feature before the head (BT²/OCA models)
    scale_by_width: bool = False  # logits divided by the feature width (airbench's head)
    init_std: Optional[float] = None  # initial head weights rescaled to this std (airbench: 1)
    checks: ClassVar[list] = [("init_std", lambda v: v is None or v > 0, "> 0 or null")]


@register("ce")
class CE(Method):
    Config = CEConfig
    DIAGNOSTICS = ROW_ORTHOGONALITY

    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        self.unit = self.head_on_unit_features()
        bias = self.cfg.bias if self.cfg.bias is not None else not self.unit
        self.fc = nn.Linear(ctx.feature_dim, ctx.num_classes, bias=bias)
        if self.cfg.init_std is not None:
            with torch.no_grad():
                self.fc.weight.mul_(self.cfg.init_std / self.fc.weight.std())
        self.logit_divisor = ctx.feature_dim if self.cfg.scale_by_width else None

    def head_on_unit_features(self) -> bool:
        return bool(self.cfg.norm_feature)

    def head_input(self, features):
        return F.normalize(features, dim=1) if self.unit else features

    def logits(self, features):
        out = self.fc(self.head_input(features))
        return out if self.logit_divisor is None else out / self.logit_divisor

    def forward(self, batch):
        return MethodOutput(logits=self.logits(batch.features))

    def embeddings(self, out, batch):
        return {"new": self.head_input(batch.features)}

    def classifier(self):
        return LinearHead(self.fc.weight, self.fc.bias, self.unit)

    def diagnostics(self):
        return row_orthogonality(self.fc.weight)
