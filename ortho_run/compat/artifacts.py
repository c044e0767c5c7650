"""What the compatibility service hands to methods: the frozen old model and what a method
declared it needs from it (class means, its head), computed once."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

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


@dataclass
class CompatArtifacts:
    """``ctx.compat`` of a compatibility method: only what its ``needs`` declared is set."""

    old_dim: int
    num_old_classes: int
    class_means: Optional[Tensor] = None  # C_new × d_old: mean raw old feature per class
    unit_class_means: Optional[Tensor] = None  # C_new × d_old: mean of unit old features
    old_head: Optional[object] = None  # the old classifier (a methods.LinearHead)

    def shapes(self) -> dict:
        """What a checkpoint records to rebuild a net of this run without its old model."""
        head = self.old_head
        return {"old_dim": self.old_dim, "num_old_classes": self.num_old_classes,
                "old_head_bias": None if head is None else head.bias is not None}

    @classmethod
    def placeholder(cls, shapes: dict, num_classes: int) -> "CompatArtifacts":
        """Zeros of the recorded shapes: enough to build the net, whose state dict then holds
        the values its method derived from the old model (class means, the old head)."""
        from ortho_run.methods.base import LinearHead

        d, n_old = shapes["old_dim"], shapes["num_old_classes"]
        art = cls(old_dim=d, num_old_classes=n_old, class_means=torch.zeros(num_classes, d),
                  unit_class_means=torch.zeros(num_classes, d))
        if shapes.get("old_head_bias") is not None:
            art.old_head = LinearHead(torch.zeros(n_old, d),
                                      torch.zeros(n_old) if shapes["old_head_bias"] else None)
        return art


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
    """The frozen model's embeddings of every batch of ``loader`` and their labels."""
    embs, labels = [], []
    for x, y in loader:
        embs.append(frozen.embed(x))
        labels.append(y)
    return torch.cat(embs), torch.cat(labels)
