"""``cosine``: normalised cosine classifier, logits = s·cos(x, w_c).

GCR's gain partly comes from normalisation and the scale s; this row makes the comparison fair
(GCR with k = 1 is s·|cos|).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ortho_run.config import MethodConfig, positive
from ortho_run.methods.base import (ROW_ORTHOGONALITY, Method, MethodOutput, register,
                                    row_orthogonality)


@dataclass
class CosineConfig(MethodConfig):
    name: str = "cosine"
    scale: float = 16.0
    checks: ClassVar[list] = positive("scale")


@register("cosine")
class Cosine(Method):
    DIAGNOSTICS = ROW_ORTHOGONALITY
    Config = CosineConfig

    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        self.weight = nn.Parameter(torch.empty(ctx.num_classes, ctx.feature_dim))
        nn.init.normal_(self.weight, std=0.01)

    def forward(self, batch):
        cos = F.normalize(batch.features, dim=1) @ F.normalize(self.weight, dim=1).t()
        return MethodOutput(logits=self.cfg.scale * cos)

    def diagnostics(self):
        return row_orthogonality(self.weight)
