"""``bt2``: Backward-compatible Training with Basis Transformation (Zhou et al., ICCV 2023;
YifeiZhou02/BT-2, ``models/resnet.py`` ``ResNet_ortho`` and ``trainers/transfer_trainer.py``).

The new backbone is widened to D + D_old outputs h (D = ``model.embed_dim``, the dim of the
independently trained new model; D_old the old model's). With k = ``extra_dims`` and C = ``c``:

    g  = fc3(relu(h))                         (a linear map with bias to D_old: the 1×1 conv)
    f̂  = normalize(h[:, :D])                  (the new model's own feature)
    z  = [normalize(g[:, :k]) ; O_p(C·f̂)]     (k + D dims)
    b  = O_2 · z[:, :D_old]                   (the backward-compatible part, in the old space)
    t  = z[:, D_old:]                         (the dims added beyond the old space)

O_p ∈ O(D) and O_2 ∈ O(D_old) are exact orthogonal maps (``parametrizations.orthogonal``, no
penalty): the basis transformation. The embedding for retrieval is [b ; t] (D + k dims when
D = D_old, the paper's 128 + 32); against an old gallery the evaluator truncates it to its
first D_old dims, b. The classifier is a bias-free linear map of f̂. The loss:

    L = CE(W f̂, y) + w_influence·CE(b̂ Pᵀ, y) + w_old·(1 − ⟨φ_old, b̂⟩) + w_new·(1 − ⟨φ′_new, f̂⟩)

with b̂ = normalize(b), P the old model's per-class means of its unit features over all
classes, not renormalised (``pseudo=unit_mean``, as the code builds its pseudo-classifier),
φ_old the old model's unit embedding of the image and φ′_new an independently trained new
model's (``ce`` on this run's classes, cached and shared with every method). Defaults are the
official CIFAR-100 config (``configs/cifar100_transfer.yaml``): k = 32, C = 2, lambda_2 = 10
(``w_influence``), lambda_3 = 5 (``w_old``), lambda_1 = 1 (``w_new``); the CE terms are plain
(that config's label smoothing 0.1 is never read by the transfer trainer: ``label_smoothing``
0; null uses ``trainer.label_smoothing``). Its recipe: Adam 1e-3, weight decay 3.05e-5, batch
128, 100 epochs, cosine with 5 warm-up epochs.

Where ours differs from that code: φ_old and φ′_new are computed on the same augmented view
as the batch (the code caches one augmented view per image before training and reuses it every
epoch); the independent model is the one λ-orthogonality uses, a plain ``ce`` model (the code's
is trained on unit features, ``norm_feature: True``; φ′_new is normalised either way); P is
averaged over the training images without augmentation; t is "the dims beyond D_old" (the code slices the last D + k − D_old dims, which is all
of z when D + k = D_old, as happens at a third step of a multi-step update). Later steps of a
multi-step update have D_old = D + k: then b spans all of z and t is empty (the embedding stops
growing), which needs D_old ≤ D + k.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import orthogonal

from ortho_run.config import MethodConfig, at_least, at_most, positive
from ortho_run.errors import ConfigError
from ortho_run.methods.base import (ROW_ORTHOGONALITY, Method, MethodOutput, Needs, register,
                                    row_orthogonality)
from ortho_run.methods.oca import Pseudo, pseudo_classifier
from ortho_run.orthogonality import gram_error


@dataclass
class BT2Config(MethodConfig):
    name: str = "bt2"
    extra_dims: int = 32  # k (``to_add_dim``)
    c: float = 2.0  # C, the scale of f̂ before O_p
    w_influence: float = 10.0  # lambda_2: CE of b̂ against the old pseudo-classifier
    w_old: float = 5.0  # lambda_3: 1 − cos(φ_old, b̂)
    w_new: float = 1.0  # lambda_1: 1 − cos(φ′_new, f̂)
    label_smoothing: Optional[float] = 0.0  # of the CE terms; null: trainer.label_smoothing
    pseudo: Pseudo = Pseudo.unit_mean
    checks: ClassVar[list] = (positive("c", "extra_dims") + at_most(2 ** 16, "extra_dims")
                              + at_least(0, "w_influence", "w_old", "w_new")
                              + at_least(0, "label_smoothing"))


@register("bt2")
class BT2(Method):
    DIAGNOSTICS = {**ROW_ORTHOGONALITY,
                   "o_p_orth_err": "‖O_pO_pᵀ − I‖_F of the basis transformation of f̂",
                   "o_2_orth_err": "‖O_2O_2ᵀ − I‖_F of the basis transformation into the old "
                                   "space"}
    Config = BT2Config

    @classmethod
    def needs(cls, cfg):
        return Needs(old_model=True, old_embedding=True, class_means=True,
                     independent_embedding=True)

    @classmethod
    def check(cls, run_cfg):
        super().check(run_cfg)
        if not run_cfg.model.embed_dim:
            raise ConfigError("method=bt2 widens the backbone to model.embed_dim + the old "
                              "model's dim: set model.embed_dim (the new model's own dim, e.g. "
                              "the old model's)")

    @classmethod
    def feature_dim(cls, cfg, old_dim, embed_dim):
        return embed_dim + old_dim

    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        art = self.artifacts
        d_old, k = art.old_dim, self.cfg.extra_dims
        d = ctx.feature_dim - d_old
        if d < 1:
            raise ConfigError(f"method=bt2: the backbone has {ctx.feature_dim} dims, at most the "
                              f"old model's {d_old}; it must be model.embed_dim + {d_old}")
        if k > d_old or d_old > d + k:
            raise ConfigError(f"method=bt2: method.extra_dims={k} must be at most the old dim "
                              f"{d_old}, and the old dim at most model.embed_dim + extra_dims = "
                              f"{d + k}; raise model.embed_dim or method.extra_dims")
        self.d, self.d_old, self.k = d, d_old, k
        self.fc3 = nn.Linear(d + d_old, d_old)
        self.o_p = orthogonal(nn.Linear(d, d, bias=False))
        self.o_2 = orthogonal(nn.Linear(d_old, d_old, bias=False))
        self.fc = nn.Linear(d, ctx.num_classes, bias=False)
        self.register_buffer("pseudo", pseudo_classifier(art, self.cfg.pseudo))
        ls = self.cfg.label_smoothing
        self.smoothing = ctx.label_smoothing if ls is None else ls

    def forward(self, batch):
        h = batch.features.float()
        g = self.fc3(F.relu(h))
        f_hat = F.normalize(h[:, : self.d], dim=1)
        z = torch.cat([F.normalize(g[:, : self.k], dim=1), self.o_p(self.cfg.c * f_hat)], dim=1)
        b = self.o_2(z[:, : self.d_old])
        emb = torch.cat([b, z[:, self.d_old:]], dim=1)
        return MethodOutput(logits=self.fc(f_hat), embedding=emb,
                            extras={"b": b, "f_hat": f_hat})

    def embedding_dim(self):
        return self.d_old + max(0, self.d + self.k - self.d_old)

    def _ce(self, logits, targets):
        return F.cross_entropy(logits.float(), targets, label_smoothing=self.smoothing)

    def loss(self, out, batch):
        targets, c = batch.targets, self.cfg
        b_hat = F.normalize(out.extras["b"], dim=1)
        f_hat = out.extras["f_hat"]
        if batch.independent.shape[1] != self.d:
            raise ConfigError(f"method=bt2: the independent new model has "
                              f"{batch.independent.shape[1]} dims, the new feature "
                              f"f has {self.d} (model.embed_dim): they must match")
        phi_old = F.normalize(batch.old.float(), dim=1)
        phi_new = F.normalize(batch.independent.float(), dim=1)
        ce = self._ce(out.logits, targets)
        influence = self._ce(b_hat @ self.pseudo.t(), targets)
        old_cos = (phi_old * b_hat).sum(1).mean()
        new_cos = (phi_new * f_hat).sum(1).mean()
        loss = (ce + c.w_influence * influence + c.w_old * (1 - old_cos)
                + c.w_new * (1 - new_cos))
        return {"loss": loss, "ce": ce, "influence": influence, "old_cos": old_cos,
                "new_cos": new_cos}

    @torch.no_grad()
    def diagnostics(self):
        out = row_orthogonality(self.fc.weight)
        out["o_p_orth_err"] = float(gram_error(self.o_p.weight.detach()))
        out["o_2_orth_err"] = float(gram_error(self.o_2.weight.detach()))
        return out
