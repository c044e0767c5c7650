"""The orthogonality error of a weight, shared by methods (λ-orthogonality's adapter, OCA's
layer), regularisers and their diagnostics: for one weight, or for a stack of same-shape
matrices at once (the regularisers' batched penalties)."""

from __future__ import annotations

import torch
from torch import Tensor


def smaller_gram(w: Tensor) -> Tensor:
    """G = WWᵀ or WᵀW, whichever is smaller, for ``w`` as a matrix (out × in·k·k): the one that
    can equal I for a rectangular W (orthonormal rows when wide, columns when tall)."""
    m = w.reshape(w.shape[0], -1)
    return m @ m.T if m.shape[0] <= m.shape[1] else m.T @ m


def gram_deviation(stack: Tensor) -> Tensor:
    """G − I for each matrix of ``stack`` (n × rows × cols), G its smaller Gram matrix: one
    batched matmul for the whole stack, the identity subtracted on the diagonal in place."""
    g = stack @ stack.mT if stack.shape[-2] <= stack.shape[-1] else stack.mT @ stack
    g.diagonal(dim1=-2, dim2=-1).sub_(1.0)
    return g


def gram_error(w: Tensor) -> Tensor:
    """‖G − I‖_F with G the smaller Gram matrix of ``w`` (as a matrix)."""
    return torch.linalg.matrix_norm(gram_deviation(w.reshape(1, w.shape[0], -1)))[0]
