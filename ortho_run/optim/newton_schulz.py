"""Newton–Schulz orthogonalisation of a matrix or of a stack of matrices, and the coefficient
sequences users can choose (``optim.ns_coefficients``).

One function serves every orthogonalised optimiser: ``newton_schulz(x, steps, coefficients)``
takes ``x`` of shape ``(rows, cols)`` or ``(n, rows, cols)`` and runs the quintic iteration
X ← aX + (bA + cA²)X with A = XXᵀ on the wide orientation, from X = x/‖x‖_F (per matrix). A stack
is one batched matmul chain (``baddbmm``): the step of every same-shape matrix of a model costs
the launches of one.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

Triple = Tuple[float, float, float]

MUON_COEFFICIENTS: Triple = (3.4445, -4.7750, 2.0315)

#: ``optim.ns_coefficients``: one (a, b, c) per step; a sequence shorter than the number of steps
#: repeats its last triple, a longer one is cut.
NS_COEFFICIENTS = {
    # K. Jordan's single triple (Muon, torch.optim.Muon, timm "original"): the default
    "original": (MUON_COEFFICIENTS,),
    # the per-step quintic tuned for modded-nanogpt (train_gpt_medium.py; timm "quintic")
    "quintic": (
        (4.0848, -6.8946, 2.9270),
        (3.9505, -6.3029, 2.6377),
        (3.7418, -5.5913, 2.3037),
        (2.8769, -3.1427, 1.2046),
        (2.8366, -3.0525, 1.2012),
    ),
    # Polar Express (Amsel et al. 2025, arXiv:2505.16932), the safety-1e-2 sequence as timm
    # ships it ("polar_express")
    "polar_express": (
        (8.237312490495555, -23.157747414558198, 16.680568411445915),
        (4.082441999064835, -2.893047735332586, 0.5252849256975648),
        (3.9263479922546582, -2.8547468034765298, 0.5318022422894988),
        (3.2982187133085143, -2.424541981026706, 0.48632008358844075),
        (2.2970369434552573, -1.63662558125903, 0.4002628455953627),
        (1.8763805351440397, -1.2347896577722228, 0.35891887501668385),
        (1.8564423485617974, -1.2132449880935525, 0.3568003487825883),
        (1.8749994008682747, -1.2499988017229169, 0.3749994008546422),
    ),
}


def coefficient_sequence(coefficients: Sequence[Triple], steps: int) -> Tuple[Triple, ...]:
    """``steps`` triples: the sequence cut to ``steps``, or its last triple repeated (one triple
    alone is a sequence of one)."""
    if len(coefficients) == 3 and not isinstance(coefficients[0], (tuple, list)):
        coefficients = (coefficients,)
    seq = tuple(tuple(float(v) for v in t) for t in coefficients)
    if len(seq) >= steps:
        return seq[:steps]
    return seq + (seq[-1],) * (steps - len(seq))


def unit_frobenius(x: Tensor, eps: float, add_eps: bool, safety: float = 1.0) -> Tensor:
    """Each matrix of ``x`` divided by its Frobenius norm (times ``safety``), guarded by ``eps``
    as the rule's code guards it: x / (‖x‖_F + eps) with ``add_eps`` (K. Jordan's Newton–Schulz
    and the code that ships it: NorMuon, ROOT, AuON), else x / max(‖x‖_F, eps)
    (torch.optim.Muon's). The two differ by about eps/‖x‖_F, which is large for a small x."""
    norm = x.norm(dim=(-2, -1), keepdim=True)
    if safety != 1.0:
        norm = norm * safety
    return x / (norm + eps if add_eps else norm.clamp(min=eps))


def newton_schulz(x: Tensor, steps: int = 5, coefficients: Sequence[Triple] = (MUON_COEFFICIENTS,),
                  eps: float = 1e-7, dtype: Optional[torch.dtype] = torch.bfloat16,
                  add_eps: bool = False, safety: float = 1.0) -> Tensor:
    """Orthogonalise ``x`` (``rows × cols`` or ``n × rows × cols``) by ``steps`` Newton–Schulz
    steps in ``dtype`` (None: ``x``'s own). The start is X = x / max(‖x‖_F·safety, eps) per
    matrix (``add_eps``: x / (‖x‖_F + eps), the form of the code that ROOT and AuON ship). With
    Muon's coefficients the singular values land in about [0.7, 1.2] rather than at 1 (a
    steeper slope at 0 for fewer steps); with the cubic (1.5, −0.5, 0) they converge to 1.
    Returns that dtype."""
    seq = coefficient_sequence(coefficients, steps)
    x = x.to(dtype or x.dtype)
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT
    x = unit_frobenius(x, eps, add_eps, safety)
    mm = torch.baddbmm if x.ndim == 3 else torch.addmm
    for a, b, c in seq:
        gram = x @ x.mT
        x = mm(x, mm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.mT if tall else x
