"""``bct``: Backward-Compatible Training (Shen et al., CVPR 2020).

L = CE(W_new φ_new(x), y) + α·CE(W_old φ_new(x), y), W_old frozen. Two forms of W_old:

- ``influence=old_head`` (the paper, the default): W_old is the old model's linear head (with its
  bias) for the classes it saw; the rows of the classes it never saw are synthesised from the
  old model's features of those classes. ``new_rows=raw_mean`` (default, the paper's wording:
  "the old model's mean feature of the class") uses the raw means; their norm can be several
  times the trained rows' norm, so new-class logits dominate the influence loss.
  ``new_rows=scaled_unit_mean`` uses the mean of the old unit features, rescaled to the trained
  rows' mean norm, which keeps old- and new-class logits on one scale. The default stays the
  paper's so that ``method=bct`` is BCT as published; the other is one override away.
  Head and features are CE's (bias, raw features); α = 1. The influence loss feeds the old
  head what it was trained on: unit features when the old model had ``norm_feature``.
- ``influence=class_means`` (the BT²/OCA re-implementation, ``trainers/bct_trainer.py`` of
  YifeiZhou02/BT-2): the whole pseudo-classifier P is the per-class mean of the old model's
  *unit* features over all classes (not renormalised, so rows have norm < 1), no bias, no logit
  scale; the influence logits are norm(φ_new) Pᵀ; the new model's own head is a bias-free
  linear layer on the L2-normalised feature (their ``norm_feature: True``); α = 10.

``alpha``, ``bias`` and ``norm_feature`` left null follow the chosen form (1 / with bias / raw
for old_head; 10 / bias-free / unit for class_means). The new feature dim must equal the old
one's (``model.embed_dim`` on both).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
import torch.nn.functional as F

from ortho_run.config import Choice, at_least
from ortho_run.errors import ConfigError
from ortho_run.methods.base import Needs, register
from ortho_run.methods.ce import CE, CEConfig


class Influence(Choice):
    old_head = "old_head"
    class_means = "class_means"


class NewRows(Choice):
    raw_mean = "raw_mean"
    scaled_unit_mean = "scaled_unit_mean"


@dataclass
class BCTConfig(CEConfig):
    name: str = "bct"
    influence: Influence = Influence.old_head
    alpha: Optional[float] = None  # null: 1 with old_head (paper), 10 with class_means (BT²)
    new_rows: NewRows = NewRows.raw_mean  # old_head: rows of the classes the old model never saw
    norm_feature: Optional[bool] = None  # null: False with old_head, True with class_means
    checks: ClassVar[list] = at_least(0, "alpha")


def _class_means(cfg) -> bool:
    return str(cfg.influence) == "class_means"


@register("bct")
class BCT(CE):
    Config = BCTConfig

    @classmethod
    def needs(cls, cfg):
        means = _class_means(cfg)
        return Needs(old_model=True, class_means=True, old_head=not means)

    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        self.require_old_dim("the old classifier scores the new features")
        art = self.artifacts
        self.alpha = self.cfg.alpha if self.cfg.alpha is not None else (
            10.0 if _class_means(self.cfg) else 1.0)
        #: class_means scores unit features against means of the old model's unit features;
        #: old_head scores what the old head was trained on (unit features for a
        #: norm_feature old model, raw features otherwise)
        if _class_means(self.cfg):
            w, b, self.unit_influence = art.unit_class_means, None, True
        else:
            w, b = self.old_head_with_new_rows(art, str(self.cfg.new_rows))
            self.unit_influence = bool(art.old_head.unit_features)
        self.register_buffer("old_w", w.detach().clone())
        self.register_buffer("old_b", None if b is None else b.detach().clone())

    def head_on_unit_features(self) -> bool:
        if self.cfg.norm_feature is not None:
            return bool(self.cfg.norm_feature)
        return _class_means(self.cfg)

    @staticmethod
    def old_head_with_new_rows(art, new_rows: str = "raw_mean"):
        """(W, b): the old head's rows for the classes it saw; for the classes it never saw,
        their old-feature mean (``raw_mean``) or unit-feature mean scaled to the trained rows'
        mean norm (``scaled_unit_mean``), with bias 0."""
        if art.old_head is None:
            raise ConfigError("method.influence=old_head needs an old model with a linear head "
                              "(compat.old_method=ce); use method.influence=class_means")
        w_old, b_old = art.old_head.weight, art.old_head.bias
        c_old = art.num_old_classes
        w_old = w_old.detach()
        if new_rows == "scaled_unit_mean":
            unit = F.normalize(art.unit_class_means[c_old:], dim=1)
            rows = unit * w_old.norm(dim=1).mean()
        else:
            rows = art.class_means[c_old:]
        w = torch.cat([w_old, rows.to(w_old.dtype)], 0)
        b = torch.zeros(len(w), device=w.device)
        if b_old is not None:
            b[:c_old] = b_old.detach()
        return w, b

    def loss(self, out, batch):
        targets = batch.targets
        ce = self.ce(out.logits, targets)
        f = batch.features.float()
        if self.unit_influence:
            f = F.normalize(f, dim=1)
        infl = self.ce(F.linear(f, self.old_w, self.old_b), targets)
        return {"loss": ce + self.alpha * infl, "ce": ce, "bct_influence": infl}
