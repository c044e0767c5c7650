"""``ce``: the baseline — a linear head with bias on the penultimate feature, softmax CE."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ortho_run.config import MethodConfig
from ortho_run.methods.base import Method, MethodOutput, register, row_orthogonality


@dataclass
class CEConfig(MethodConfig):
    name: str = "ce"
    bias: bool = True


@register("ce")
class CE(Method):
    Config = CEConfig

    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        self.fc = nn.Linear(ctx.feature_dim, ctx.num_classes, bias=cfg.bias)

    def forward(self, batch):
        return MethodOutput(logits=self.fc(batch.features))

    def classifier(self):
        return self.fc.weight, self.fc.bias

    def diagnostics(self):
        return row_orthogonality(self.fc.weight)
