"""``bct``: Backward-Compatible Training (Shen et al., CVPR 2020).

L = CE(W_new φ_new(x), y) + α·CE(W_old φ_new(x), y), W_old frozen. ``influence=old_head`` (the
paper): W_old is the old model's linear head for the classes it saw, and for classes it never
saw its rows are synthesised as the old model's mean feature of that class.
``influence=class_means`` (the OCA/BT² re-implementation): the whole pseudo-classifier P is the
old model's class means over all classes, no bias, no logit scale, and both sides are unit
features as in their code (``norm_feature: True``): logits = norm(φ_new) Pᵀ with P the mean of
the old model's L2-normalised features per class; they use α = 10.
The new backbone's feature dim must equal the old one's (``model.embed_dim`` on both).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from ortho_run.config import Choice, at_least
from ortho_run.errors import ConfigError
from ortho_run.methods.base import Needs, register
from ortho_run.methods.ce import CE, CEConfig


class Influence(Choice):
    old_head = "old_head"
    class_means = "class_means"


@dataclass
class BCTConfig(CEConfig):
    name: str = "bct"
    alpha: float = 1.0
    influence: Influence = Influence.old_head
    checks: ClassVar[list] = at_least(0, "alpha")


@register("bct")
class BCT(CE):
    Config = BCTConfig

    @classmethod
    def needs(cls, cfg):
        return Needs(old_model=True, class_means=True,
                     old_head=str(cfg.influence) == "old_head")

    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        self.require_old_dim("the old classifier scores the new features")
        art = self.compat
        #: class_means scores unit features against means of the old model's unit features
        self.unit_features = str(self.cfg.influence) == "class_means"
        if self.unit_features:
            w, b = art.unit_class_means, None
        else:
            w, b = self.old_head_with_new_rows(art)
        self.register_buffer("old_w", w.detach().clone())
        self.register_buffer("old_b", None if b is None else b.detach().clone())

    @staticmethod
    def old_head_with_new_rows(art):
        """(W, b): the old head's rows for the classes it saw, the old model's class means as
        the rows of the classes it never saw (bias 0)."""
        if art.old_head is None:
            raise ConfigError("method.influence=old_head needs an old model with a linear head "
                              "(compat.old_method=ce); use method.influence=class_means")
        w_old, b_old = art.old_head
        c_old = art.num_old_classes
        w = torch.cat([w_old.detach(), art.class_means[c_old:]], 0)
        b = torch.zeros(len(w), device=w.device)
        if b_old is not None:
            b[:c_old] = b_old.detach()
        return w, b

    def loss(self, out, batch):
        targets = batch.targets
        ce = self.ce(out.logits, targets)
        f = batch.features.float()
        if self.unit_features:
            f = F.normalize(f, dim=1)
        infl = self.ce(F.linear(f, self.old_w, self.old_b), targets)
        return {"loss": ce + self.cfg.alpha * infl, "ce": ce, "bct_influence": infl}
