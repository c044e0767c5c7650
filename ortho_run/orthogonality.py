"""The orthogonality error of a weight, shared by methods (λ-orthogonality's adapter, OCA's
layer), regularisers and their diagnostics."""

from __future__ import annotations

import torch
from torch import Tensor


def smaller_gram(w: Tensor) -> Tensor:
    """G = WWᵀ or WᵀW, whichever is smaller, for ``w`` as a matrix (out × in·k·k): the one that
    can equal I for a rectangular W (orthonormal rows when wide, columns when tall)."""
    m = w.reshape(w.shape[0], -1)
    return m @ m.T if m.shape[0] <= m.shape[1] else m.T @ m


def gram_error(w: Tensor) -> Tensor:
    """‖G − I‖_F with G the smaller Gram matrix of ``w``."""
    g = smaller_gram(w)
    return torch.linalg.matrix_norm(g - torch.eye(len(g), device=g.device, dtype=g.dtype))
