"""``oca``: Orthogonal Compatible Aligned representations (Ricci et al., 2024; z3n0e/OCA).

The new backbone outputs d_old + k dims (``model.embed_dim``), normalised: ĥ. An orthogonal
layer T(ĥ) = Qĥ + c (Q ∈ O(d_old + k) through ``torch.nn.utils.parametrizations.orthogonal``;
the official code keeps the bias c: ``bias``) feeds the new classifier W_new, bias-free as in
the official code (``fc_bias``). The first d_old dims of ĥ are tied to the old space by the
frozen pseudo-classifier P:

    L = a·CE(W_new T(ĥ), y) + b·CE(s_p · norm(ĥ[:d_old]) Pᵀ, y) + c·(1 − cos(P_y, ĥ[:d_old]))

P follows the official code by default (``pseudo=unit_mean``): the per-class mean of the old
model's *unit* features, not renormalised, so its rows have norm below 1 and set the alignment
logits' scale; ``pseudo=renormalized`` uses unit rows instead. The cosine term normalises P_y
itself either way. a, b, c = 5, 10, 5 are what the official code hard-codes (its YAML's 1, 10,
5 are ignored); s_p = 1 is the plain form. Retrieval uses ĥ before T: all dims new/new, the
first d_old new/old (the evaluator truncates and renormalises).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import orthogonal

from ortho_run.config import Choice, MethodConfig, at_least, at_most, positive
from ortho_run.errors import ConfigError
from ortho_run.methods.base import (ROW_ORTHOGONALITY, Method, MethodOutput, Needs, register,
                                    row_orthogonality)
from ortho_run.orthogonality import gram_error


class Pseudo(Choice):
    unit_mean = "unit_mean"  # mean of the old unit features per class (official)
    renormalized = "renormalized"  # the same rows scaled to unit norm


def pseudo_classifier(art, pseudo) -> torch.Tensor:
    """P: the old model's per-class means of its unit features (``unit_mean``, official OCA and
    BT²: rows of norm below 1) or those rows renormalised (``renormalized``)."""
    p = art.unit_class_means.detach().clone()
    return F.normalize(p, dim=1) if str(pseudo) == "renormalized" else p


@dataclass
class OCAConfig(MethodConfig):
    name: str = "oca"
    extra_dims: int = 32
    a: float = 5.0
    b: float = 10.0
    c: float = 5.0
    p_scale: float = 1.0
    bias: bool = True  # the orthogonal layer's bias c (official: kept)
    fc_bias: bool = False  # the new classifier's bias (official: none)
    pseudo: Pseudo = Pseudo.unit_mean
    checks: ClassVar[list] = (positive("p_scale") + at_least(0, "extra_dims", "a", "b", "c")
                              + at_most(2 ** 16, "extra_dims"))


@register("oca")
class OCA(Method):
    DIAGNOSTICS = {**ROW_ORTHOGONALITY,
                   "transform_orth_err": "‖QQᵀ − I‖_F of the orthogonal layer"}
    Config = OCAConfig

    @classmethod
    def needs(cls, cfg):
        return Needs(old_model=True, class_means=True)

    @classmethod
    def feature_dim(cls, cfg, old_dim, embed_dim):
        return old_dim + cfg.extra_dims

    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        art = self.artifacts
        d_old, d = art.old_dim, ctx.feature_dim
        if d != d_old + self.cfg.extra_dims:
            raise ConfigError(f"method=oca: the new feature dim must be d_old + extra_dims = "
                              f"{d_old} + {self.cfg.extra_dims}; set model.embed_dim="
                              f"{d_old + self.cfg.extra_dims} (it is {d})")
        self.d_old = d_old
        self.transform = orthogonal(nn.Linear(d, d, bias=self.cfg.bias))
        self.fc = nn.Linear(d, ctx.num_classes, bias=self.cfg.fc_bias)
        self.register_buffer("pseudo", pseudo_classifier(art, self.cfg.pseudo))

    def forward(self, batch):
        h = F.normalize(batch.features.float(), dim=1)
        return MethodOutput(logits=self.fc(self.transform(h)), embedding=h)

    def loss(self, out, batch):
        h, targets = out.embedding, batch.targets
        ce = self.ce(out.logits, targets)
        h_old = F.normalize(h[:, : self.d_old], dim=1)
        align_ce = self.ce(self.cfg.p_scale * h_old @ self.pseudo.t(), targets)
        cos = F.cosine_similarity(h_old, self.pseudo[targets], dim=1).mean()
        loss = self.cfg.a * ce + self.cfg.b * align_ce + self.cfg.c * (1 - cos)
        return {"loss": loss, "ce": ce, "align_ce": align_ce, "align_cos": cos}

    def diagnostics(self):
        out = row_orthogonality(self.fc.weight)
        out["transform_orth_err"] = float(gram_error(self.transform.weight.detach()))
        return out
