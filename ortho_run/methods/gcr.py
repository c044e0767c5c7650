"""``gcr``: Grassmann Class Representation (Wang, Li et al., ICCV 2023; innerlee/GCR).

Class c owns a k-dim subspace with orthonormal basis S_c ∈ R^{D×k} (all classes: one C×D×k
tensor, initialised by QR of a Gaussian); logit_c = s·‖S_cᵀ x̂‖ (defaults s = 25, k = 8;
k = 1 gives s·|cos|).

The bases are trained by ``GrassmannSGD`` (below), a Riemannian SGD with momentum: the buffer M
accumulates the Euclidean gradient, G = (I − SSᵀ)M is its tangent part, and the step follows
the geodesic S ← (S V cos(ηΣ) − U sin(ηΣ)) Vᵀ for G = UΣVᵀ (``retraction=geodesic``, the
paper's step) or the QR retraction S ← qf(S − ηG) (``retraction=qr``); every
``reorth_every`` steps the bases are re-orthonormalised (a Newton–Schulz polar step: same
span, no host sync). No weight decay on the head;
its lr is the main lr times ``head_lr_scale`` and follows the same schedule.

Why our own step and not geoopt: the step is ~30 lines, batched over classes with no Python
loop, and runs on CPU and CUDA (the official SVD driver is CUDA-only). The geodesic is
computed from matrix functions of the small k×k Gram matrix GᵀG (see ``geodesic_step``), so
it needs no D×k SVD, is exact for zero singular values, and never syncs with the host.
geoopt's Stiefel RiemannianSGD would be an equivalent alternative (the logit is invariant to
S → SQ), but adds a dependency and uses a different retraction from the paper's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ortho_run.config import Choice, MethodConfig
from ortho_run.methods.base import Method, MethodOutput, register


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
    reorth_every: int = 5


def orthonormalize(s: Tensor) -> Tensor:
    """Batched QR: an orthonormal basis of each column span (sign of Q is irrelevant here)."""
    q, _ = torch.linalg.qr(s)
    return q


def polar_refresh(s: Tensor) -> Tensor:
    """One Newton–Schulz step towards the polar factor: S(3I − SᵀS)/2 (S: C×D×k).

    For a basis that has drifted by e = ‖SᵀS − I‖ it leaves O(e²): two small batched matmuls,
    no linear-algebra library call and so no host sync (a CUDA QR checks its status on the
    host). Same column span, so GCR's logits are unchanged.
    """
    k = s.shape[-1]
    eye = torch.eye(k, dtype=s.dtype, device=s.device).expand(len(s), k, k)
    return torch.bmm(s, torch.baddbmm(eye, s.transpose(1, 2), s, beta=1.5, alpha=-0.5))


def geodesic_step(s: Tensor, g: Tensor, lr: float, halvings: int = 3, terms: int = 5) -> Tensor:
    """Move each S (…×D×k) along the Grassmann geodesic in direction −G (G tangent at S).

    With G = UΣVᵀ, S(η) = S V cos(ηΣ) Vᵀ − U sin(ηΣ) Vᵀ = S·cos(η√A) − G·η·sinc(η√A), where
    A = GᵀG (k×k) and f(√A) = V f(Σ) Vᵀ. Both matrix functions are evaluated by a Taylor series
    on A/4^halvings followed by double-angle steps: small batched matmuls only, exact at zero
    singular values, and no host synchronisation (an SVD/eigh on CUDA checks its status on the
    host every step). Accurate to fp64 round-off for step angles ηΣ up to ~4 rad.

    Every update of the form X − c·(Y@Z) is one fused ``baddbmm`` kernel: the whole step is
    ~20 kernel launches, which is what it costs on a GPU where the loop is launch-bound.
    """
    lead, (d, k) = s.shape[:-2], s.shape[-2:]
    s3, g3 = s.reshape(-1, d, k), g.reshape(-1, d, k)
    dt = torch.float64 if s.device.type == "cpu" else torch.float32
    g_dt = g3.to(dt)
    eye = torch.eye(k, dtype=dt, device=s.device).expand(len(s3), k, k)
    b = torch.baddbmm(eye, g_dt.transpose(1, 2), g_dt, beta=0.0,
                      alpha=lr * lr / 4.0 ** halvings)  # (η/2^h)²·GᵀG
    # cos(√B) = Σ (−B)ⁿ/(2n)!,  sin(√B)/√B = Σ (−B)ⁿ/(2n+1)!  in Horner form: I − c·(B@X)
    cos, sinc = eye, eye
    for n in range(terms, 0, -1):
        cos = torch.baddbmm(eye, b, cos, alpha=-1.0 / ((2 * n - 1) * (2 * n)))
        sinc = torch.baddbmm(eye, b, sinc, alpha=-1.0 / ((2 * n) * (2 * n + 1)))
    for _ in range(halvings):  # sin(2x)/(2x) = sinc(x)·cos(x); cos(2x) = 2cos²(x) − I
        sinc = torch.bmm(sinc, cos)
        cos = torch.baddbmm(eye, cos, cos, beta=-1.0, alpha=2.0)
    out = torch.baddbmm(torch.bmm(s3, cos.to(s.dtype)), g3, sinc.to(s.dtype), alpha=-lr)
    return out.reshape(*lead, d, k)


class GrassmannSGD(torch.optim.Optimizer):
    """Riemannian SGD with momentum for parameters holding orthonormal bases (C×D×k)."""

    def __init__(self, params, lr: float, momentum: float = 0.9, retraction: str = "geodesic",
                 reorth_every: int = 5):
        if retraction not in ("geodesic", "qr"):
            raise ValueError(f"retraction must be geodesic or qr, got {retraction!r}")
        defaults = dict(lr=lr, momentum=momentum, retraction=str(retraction),
                        reorth_every=reorth_every)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            lr, mom = group["lr"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                grad = p.grad.to(p.dtype)
                buf = state.get("momentum_buffer")
                if buf is None:
                    buf = state["momentum_buffer"] = grad.clone()
                else:
                    buf.mul_(mom).add_(grad)
                s = p.data
                # (I − SSᵀ)M as one fused kernel after SᵀM
                g = torch.baddbmm(buf, s, s.transpose(-1, -2) @ buf, alpha=-1.0)
                if group["retraction"] == "geodesic":
                    new = geodesic_step(s, g, lr)
                else:
                    new = orthonormalize(s - lr * g)
                state["step"] = state.get("step", 0) + 1
                if group["reorth_every"] > 0 and state["step"] % group["reorth_every"] == 0:
                    new = polar_refresh(new)
                p.data.copy_(new)
        return loss


@register("gcr")
class GCR(Method):
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

    def forward(self, features):
        x = F.normalize(features, dim=1)
        c, d, k = self.bases.shape
        proj = (x @ self.bases.permute(1, 0, 2).reshape(d, c * k)).view(-1, c, k)
        return MethodOutput(logits=self.cfg.scale * torch.linalg.vector_norm(proj.float(), dim=-1))

    def param_groups(self, optim_cfg):
        return []  # the bases are kept out of the main optimiser (and its weight decay)

    def extra_optimizers(self, optim_cfg):
        return [GrassmannSGD([self.bases], lr=optim_cfg.lr * self.cfg.head_lr_scale,
                             momentum=self.cfg.momentum, retraction=str(self.cfg.retraction),
                             reorth_every=self.cfg.reorth_every)]

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
