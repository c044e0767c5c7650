"""``gcr``: Grassmann Class Representation (Wang, Li et al., ICCV 2023; innerlee/GCR).

Class c owns a k-dim subspace with orthonormal basis S_c ∈ R^{D×k} (all classes: one C×D×k
tensor, initialised by QR of a Gaussian); logit_c = s·‖S_cᵀ x̂‖ (defaults s = 25, k = 8;
k = 1 gives s·|cos|).

The bases are trained by ``GrassmannSGD`` (``ortho_run/optim/grassmann.py``, asked for by
name through the optimiser registry), a Riemannian SGD with momentum: the buffer M accumulates
the Euclidean gradient, G = (I − SSᵀ)M is its tangent part, and the step follows the geodesic
S ← (S V cos(ηΣ) − U sin(ηΣ)) Vᵀ for G = UΣVᵀ (``retraction=geodesic``, the paper's step) or
the QR retraction S ← qf(S − ηG) (``retraction=qr``); every ``reorth_every`` steps the bases
are re-orthonormalised. No weight decay on the head; its lr is the main lr times
``head_lr_scale`` and follows the same schedule.

Where we differ from the official code, on purpose: innerlee/GCR (``gcr/rsgd.py``)
re-orthonormalises with QR, whose Q may flip the sign of a basis column while the momentum
buffer keeps the old sign, so the next steps push that column the wrong way for a while (an
artefact of the implementation, not of the method). We re-orthonormalise with a Newton–Schulz
polar step, which keeps every column's sign and span (no flip, no host sync): the paper's
algorithm. Like the official code, the momentum buffer holds the Euclidean gradient and is not
transported.

Why our own step and not geoopt: the step is ~30 lines, batched over classes with no Python
loop, and runs on CPU and CUDA (the official SVD driver is CUDA-only). The geodesic is
computed from matrix functions of the small k×k Gram matrix GᵀG (see ``geodesic_step``), so
it needs no D×k SVD, is exact for zero singular values, and never syncs with the host.
geoopt's Stiefel RiemannianSGD would be an equivalent alternative (the logit is invariant to
S → SQ), but adds a dependency and uses a different retraction from the paper's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ortho_run.config import Choice, MethodConfig, at_least, at_most, in_unit_interval, positive
from ortho_run.methods.base import Method, MethodOutput, register
from ortho_run.optim import ParamGroup
from ortho_run.optim.grassmann import orthonormalize


class Retraction(Choice):
    geodesic = "geodesic"
    qr = "qr"


@dataclass
class GCRConfig(MethodConfig):
    name: str = "gcr"
    k: int = 8
    scale: float = 25.0
    head_lr_scale: float = 1.0
    momentum: float = 0.9
    retraction: Retraction = Retraction.geodesic
    reorth_every: int = 5  # steps between re-orthonormalisations (0: never)
    checks: ClassVar[list] = (positive("scale", "head_lr_scale") + at_least(1, "k")
                              + at_most(4096, "k")
                              + at_least(0, "reorth_every")
                              + in_unit_interval("momentum"))


@register("gcr")
class GCR(Method):
    DIAGNOSTICS = {
        "classifier_orth_err": "the largest ‖SᵀS − I‖_F over the class bases (orthonormality "
                               "of each basis, another quantity than a linear head's)",
        "subspace_mean_cos2": "mean squared cosine of the principal angles between two "
                              "classes' subspaces",
    }
    Config = GCRConfig

    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        if not 1 <= cfg.k <= ctx.feature_dim:
            from ortho_run.errors import ConfigError

            raise ConfigError(f"method.k={cfg.k} must be between 1 and the feature dim "
                              f"{ctx.feature_dim}")
        gen = torch.Generator().manual_seed(ctx.seed)
        init = torch.randn(ctx.num_classes, ctx.feature_dim, cfg.k, generator=gen)
        self.bases = nn.Parameter(orthonormalize(init))

    def forward(self, batch):
        x = F.normalize(batch.features, dim=1)
        c, d, k = self.bases.shape
        proj = (x @ self.bases.permute(1, 0, 2).reshape(d, c * k)).view(-1, c, k)
        return MethodOutput(logits=self.cfg.scale * torch.linalg.vector_norm(proj.float(), dim=-1))

    def param_groups(self):
        """The bases go to their own Riemannian optimiser (no weight decay), scheduled with the
        same learning-rate schedule as the rest."""
        return [ParamGroup("method", [self.bases], optimizer="grassmann_sgd",
                           lr_scale=self.cfg.head_lr_scale, weight_decay=0.0,
                           options=dict(momentum=self.cfg.momentum,
                                        retraction=str(self.cfg.retraction),
                                        reorth_every=self.cfg.reorth_every))]

    @torch.no_grad()
    def diagnostics(self):
        s = self.bases.detach().float()
        c, d, k = s.shape
        eye = torch.eye(k, device=s.device)
        orth = torch.linalg.matrix_norm(s.transpose(-1, -2) @ s - eye).max()
        flat = s.permute(0, 2, 1).reshape(c * k, d)
        cross = (flat @ flat.t()).view(c, k, c, k).pow(2).sum(dim=(1, 3)) / k  # mean cos² of principal angles
        off = cross.sum() - cross.diagonal().sum()
        return {"classifier_orth_err": float(orth),
                "subspace_mean_cos2": float(off / max(c * (c - 1), 1))}
