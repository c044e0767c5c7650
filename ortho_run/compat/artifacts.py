"""What the compatibility service computes for methods: the frozen old model and what a method
declared it needs from it (class means, its head), computed once. The container handed to the
method, ``CompatArtifacts``, is part of the method interface (``ortho_run.methods.base``)."""

from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class FrozenNet(nn.Module):
    """A trained Net (backbone + head), frozen and always in eval mode."""

    def __init__(self, net: nn.Module, cfg):
        super().__init__()
        self.net = net
        self.cfg = cfg
        self.net.requires_grad_(False)
        self.net.eval()

    def train(self, mode: bool = True):  # never leaves eval mode (BN statistics stay put)
        return super().train(False)

    @torch.no_grad()
    def embed(self, x: Tensor) -> Tensor:
        batch, out = self.net(x)
        return self.net.method.embeddings(out, batch)["new"].float()

    @property
    def dim(self) -> int:
        """The dim of its retrieval embedding (the method's, not always the backbone's)."""
        return self.net.method.embedding_dim()


@torch.no_grad()
def class_means(frozen: FrozenNet, loader, num_classes: int) -> Tuple[Tensor, Tensor]:
    """Per-class means of the frozen model's features over ``loader``: (raw, of unit features).
    The second is what the BT²/OCA code uses (their old features are L2-normalised)."""
    sums = unit_sums = None
    counts = torch.zeros(num_classes)
    for x, y in loader:
        e = frozen.embed(x)
        if sums is None:
            sums = torch.zeros(num_classes, e.shape[1], device=e.device)
            unit_sums = torch.zeros_like(sums)
        sums.index_add_(0, y, e)
        unit_sums.index_add_(0, y, F.normalize(e, dim=1))
        counts += torch.bincount(y.cpu(), minlength=num_classes).float()
    n = counts.clamp_min(1).to(sums.device)[:, None]
    return sums / n, unit_sums / n


@torch.no_grad()
def embed_all(frozen: FrozenNet, loader) -> Tuple[Tensor, Tensor]:
    """The frozen model's embeddings of every batch of ``loader`` and their labels (of the
    whole split where the loader reads one rank's shard of it)."""
    embs, labels = [], []
    for x, y in loader:
        embs.append(frozen.embed(x))
        labels.append(y)
    whole = getattr(loader, "unshard", lambda t: t)
    return whole(torch.cat(embs)), whole(torch.cat(labels))
