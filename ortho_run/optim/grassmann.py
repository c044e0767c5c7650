"""``grassmann_sgd``: Riemannian SGD with momentum on orthonormal bases (GCR's head).

Asked for by name through ``OPTIMIZERS`` by a method's ``ParamGroup(optimizer="grassmann_sgd")``;
not a choice for ``optim=`` (it only applies to parameters that hold orthonormal bases).
The momentum buffer M accumulates the Euclidean gradient, G = (I − SSᵀ)M is its tangent part,
and the step follows the Grassmann geodesic (``retraction=geodesic``, the paper's step) or the
QR retraction (``retraction=qr``); every ``reorth_every`` steps a Newton–Schulz polar step
re-orthonormalises (same span, sign-preserving, no host sync).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ortho_run.optim.base import OPTIMIZERS


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


@OPTIMIZERS.register("grassmann_sgd", internal=True)
def build_grassmann_sgd(groups, cfg, device):
    """One GrassmannSGD per group: lr = optim.lr x lr_scale; options from the method."""
    return [GrassmannSGD(list(g.params), lr=cfg.lr * g.lr_scale, **g.options) for g in groups]
