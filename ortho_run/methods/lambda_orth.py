"""``lambda_orth``: λ-orthogonality regularisation (Ricci et al., NeurIPS 2025).

Old and new backbones are both frozen and independently trained (the new one is the cached
``ce`` model on all classes, loaded into this run's backbone); only adapters learn:

- backward adapter B(h) = Wh + b (new → old, W ∈ R^{d_old×d_new}), regularised by
  L_λ = σ(α(‖G − I‖_F − λ))·‖G − I‖_F: only deviations beyond λ are penalised (λ = 0 is
  soft orthogonality, λ = ∞ an unconstrained affine map). G is the Gram matrix on the smaller
  side, WWᵀ when d_old ≤ d_new (B has orthonormal rows: a co-isometry onto the old space) and
  WᵀW when d_new < d_old (orthonormal columns: an isometric embedding of the new space), the
  one that can reach I for a rectangular W; for d_new = d_old both are the paper's WWᵀ.
  W starts at the (rectangular) identity. ``strict=true``: B = exp(P) with P skew-symmetric
  (exactly orthogonal; needs d_new = d_old);
- on L2-normalised embeddings h (the protocol's), L_B = ‖B(h_new) − h_old‖²; a forward adapter
  F of the old embeddings into the adapted space (d_old → d_old), L_F = ‖F(h_old) − B(h_new)‖²;
- supervised contrastive terms L_C on (F(h_old), B(h_new)) and (F(h_old), h_old);
- L = w1·L_F + w2·L_B + w3·L_C + weight·L_λ.

Every term lives in the old space, so the old and new models may have different dims (the
paper's headline maps a ResNet-18 space to a ViT-L/16 one): the new dim is the independent
model's (``model.embed_dim``), the old one the old model's (e.g.
``compat.old_overrides=[model.embed_dim=16]``). With equal dims this is the same computation as
the paper's equal-dim form.

α, w1..w3 and the contrastive temperature are not published: our defaults (α = 5, w1 = w2 = 1,
w3 = 0.1, temperature 0.1) are sweepable. The retrieval embedding is B(h_new); the raw h_new
space is reported too (``compat/raw_old/*``), and ‖WWᵀ − I‖_F at the end
(``geometry/b_orth_dev``; the paper's λ = 12 run ends at 12.05).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ortho_run.config import MethodConfig, at_least, positive
from ortho_run.methods.base import Method, MethodOutput, Needs, register
from ortho_run.orthogonality import gram_error


@dataclass
class LambdaOrthConfig(MethodConfig):
    name: str = "lambda_orth"
    lambda_: float = 12.0
    alpha: float = 5.0
    weight: float = 1.0
    w1: float = 1.0  # L_F
    w2: float = 1.0  # L_B
    w3: float = 0.1  # L_C
    temperature: float = 0.1
    strict: bool = False
    checks: ClassVar[list] = (positive("alpha", "temperature")
                              + at_least(0, "lambda_", "weight", "w1", "w2", "w3"))


def lambda_penalty(w: Tensor, lam: float, alpha: float) -> Tensor:
    """σ(α(‖G − I‖_F − λ))·‖G − I‖_F, G the smaller Gram matrix of W."""
    dev = gram_error(w)
    return torch.sigmoid(alpha * (dev - lam)) * dev


def supcon(anchor: Tensor, other: Tensor, labels: Tensor, temperature: float) -> Tensor:
    """Supervised contrastive loss of anchors against the other view (positives: same label)."""
    a, o = F.normalize(anchor, dim=1), F.normalize(other, dim=1)
    logits = a @ o.t() / temperature
    pos = (labels[:, None] == labels[None, :]).float()
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    return -((pos * log_prob).sum(1) / pos.sum(1)).mean()


class SkewExp(nn.Module):
    """B(h) = exp(P − Pᵀ) h + b: exactly orthogonal."""

    def __init__(self, d: int):
        super().__init__()
        self.p = nn.Parameter(torch.zeros(d, d))
        self.bias = nn.Parameter(torch.zeros(d))

    @property
    def weight(self) -> Tensor:
        return torch.linalg.matrix_exp(self.p - self.p.t())

    def forward(self, h):
        return h @ self.weight.t() + self.bias


@register("lambda_orth")
class LambdaOrth(Method):
    DIAGNOSTICS = {"b_orth_dev": "‖G − I‖_F of the backward adapter (G its smaller Gram matrix)"}
    Config = LambdaOrthConfig

    @classmethod
    def needs(cls, cfg):
        # both backbones frozen: the old one embeds each batch, the new one is an
        # independently trained model loaded into this run's backbone
        return Needs(old_model=True, old_embedding=True, independent_backbone=True)

    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        d_old, d_new = self.artifacts.old_dim, ctx.feature_dim
        if self.cfg.strict:
            self.require_old_dim("method.strict=true makes B an exact rotation")
        self.backward_adapter = SkewExp(d_old) if self.cfg.strict else nn.Linear(d_new, d_old)
        if not self.cfg.strict:
            nn.init.eye_(self.backward_adapter.weight)
            nn.init.zeros_(self.backward_adapter.bias)
        self.forward_adapter = nn.Linear(d_old, d_old)

    def forward(self, batch):
        h_new = F.normalize(batch.features.float(), dim=1)  # the protocol's L2-normalised embeddings
        b = self.backward_adapter(h_new)
        extras = {"h_new": h_new}
        if batch.old is not None:
            h_old = F.normalize(batch.old.float(), dim=1)
            extras.update(h_old=h_old, f=self.forward_adapter(h_old))
        return MethodOutput(logits=None, embedding=b, extras=extras)

    def loss(self, out, batch):
        targets = batch.targets
        b, h_old, f = out.embedding, out.extras["h_old"], out.extras["f"]
        l_b = (b - h_old).pow(2).sum(1).mean()
        l_f = (f - b).pow(2).sum(1).mean()
        t = self.cfg.temperature
        l_c = supcon(f, b, targets, t) + supcon(f, h_old, targets, t)
        l_lam = lambda_penalty(self.backward_adapter.weight, self.cfg.lambda_, self.cfg.alpha)
        c = self.cfg
        loss = c.w1 * l_f + c.w2 * l_b + c.w3 * l_c + c.weight * l_lam
        return {"loss": loss, "l_f": l_f, "l_b": l_b, "l_c": l_c, "l_lambda": l_lam}

    def embedding_dim(self):
        return self.artifacts.old_dim  # B maps into the old space

    def embeddings(self, out, batch):
        return {"new": out.embedding, "raw": out.extras["h_new"]}

    @torch.no_grad()
    def diagnostics(self):
        w = self.backward_adapter.weight.detach().float()
        return {"b_orth_dev": float(gram_error(w))}
