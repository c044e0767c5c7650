"""Retrieval metrics: query = gallery = the test split, each query's own item excluded.

Cosine similarity, ranking by decreasing similarity; CMC top-k (a correct item among the first
k, ties broken by gallery index) and tie-aware mAP over the full ranking, both over the queries
that have a relevant item. Computed in query blocks, so a 50k gallery fits in memory. Where query and gallery dims differ, both are
truncated to the smaller dim and renormalised.
"""

from __future__ import annotations

from typing import Dict, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def align_dims(q: Tensor, g: Tensor):
    d = min(q.shape[1], g.shape[1])
    return F.normalize(q[:, :d].float(), dim=1), F.normalize(g[:, :d].float(), dim=1)


@torch.no_grad()
def retrieval_metrics(query: Tensor, gallery: Tensor, labels: Tensor, ks: Sequence[int] = (1, 5),
                      block: int = 256, same_items: bool = True) -> Dict[str, float]:
    """CMC@k and mAP. ``same_items``: query i and gallery i are the same item (excluded).

    mAP is tie-aware, as scikit-learn's ``average_precision_score`` (which the BT²/openBCT
    evaluation calls) defines it: gallery items with equal similarity form one threshold, and
    AP = Σ over distinct thresholds of (recall gain) × (precision at that threshold), so the
    order of tied items cannot change it. CMC@k counts a hit when a relevant item is among the
    first k (ties broken by gallery index) and is averaged over the queries that have at least
    one relevant item, as in that evaluation; mAP likewise. Embeddings holding a NaN or an
    infinity give NaN for every metric.
    """
    if not (bool(torch.isfinite(query).all()) and bool(torch.isfinite(gallery).all())):
        # a diverged model's embeddings: their ranking means nothing, so no metric is made up
        return {**{f"cmc{k}": float("nan") for k in ks}, "map": float("nan")}
    q, g = align_dims(query, gallery)
    labels = labels.to(q.device)
    n = len(q)
    hits = {k: 0.0 for k in ks}
    ap_sum, n_valid = 0.0, 0
    for s in range(0, n, block):
        e = min(n, s + block)
        sim = q[s:e] @ g.t()
        if same_items:
            sim[torch.arange(e - s), torch.arange(s, e)] = float("-inf")
        sim, order = torch.sort(sim, dim=1, descending=True, stable=True)
        rel = (labels[order] == labels[s:e, None])
        if same_items:  # the excluded self sits last; drop that column
            rel, sim = rel[:, :-1], sim[:, :-1]
        n_rel = rel.sum(dim=1)
        valid = n_rel > 0
        for k in ks:
            hits[k] += float(rel[:, :k].any(dim=1).sum())
        ap_sum += float(tie_aware_ap(sim, rel)[valid].sum())
        n_valid += int(valid.sum())
    out = {f"cmc{k}": hits[k] / max(n_valid, 1) for k in ks}
    out["map"] = ap_sum / max(n_valid, 1)
    return out


def tie_aware_ap(sorted_scores: Tensor, rel: Tensor) -> Tensor:
    """Average precision per row of scores sorted in decreasing order (``rel``: relevance in
    that order), with tied scores as one threshold (scikit-learn's definition); 0 for a row
    without a relevant item."""
    cum = rel.cumsum(dim=1).double()
    width = rel.shape[1]
    # the last position of each run of equal scores is where a threshold "closes"
    last = torch.ones_like(rel)
    last[:, :-1] = sorted_scores[:, :-1] != sorted_scores[:, 1:]
    at_end = torch.where(last, cum, torch.zeros_like(cum))
    before = torch.cummax(at_end, dim=1).values  # relevant items up to the latest threshold
    before = torch.cat([torch.zeros_like(before[:, :1]), before[:, :-1]], dim=1)
    gain = torch.where(last, cum - before, torch.zeros_like(cum))  # relevant in this tie group
    ranks = torch.arange(1, width + 1, device=rel.device, dtype=torch.float64)
    n_rel = cum[:, -1] if width else torch.zeros(len(rel), dtype=torch.float64)
    return (gain * cum / ranks).sum(dim=1) / n_rel.clamp_min(1)


def compatibility_summary(matrix: Dict[str, Dict[str, float]]) -> Dict[str, float]:
    """ECC: M(new query, old gallery) > M(old, old). ``ecc`` uses CMC top-1; ``ecc_<m>`` each
    metric (BCT, for one, is known to pass on mAP but not on top-1: BT²'s CIFAR-100 table)."""
    out = {f"ecc_{m}": _greater(matrix["new_old"][m], matrix["old_old"][m])
           for m in matrix["old_old"]}
    out["ecc"] = out["ecc_cmc1"]
    return out


def _greater(a: float, b: float) -> float:
    """1.0 if a > b, 0.0 if not, NaN where either is NaN (no verdict on a diverged model)."""
    return float("nan") if a != a or b != b else float(a > b)


def multistep_scores(c: Tensor) -> Dict[str, float]:
    """AC and AM of a T×T matrix C[t, k] = M(model t query, model k gallery), as the multi-step
    protocol's code (miccunifi/iamcl2r ``compatibility_metrics.py``) computes them: AC = 1 − the
    share of pairs t > k with C[t, k] ≤ C[k, k] (a tie is not compatible; a single model has
    AC = 1), AM = the mean of the lower triangle with the diagonal. (That code reads an entry of
    exactly 0 as missing; here every entry counts; a NaN entry makes AC NaN.)"""
    t = c.shape[0]
    pairs = [(i, k) for i in range(t) for k in range(i)]
    incompatible = sum(1.0 - _greater(float(c[i, k]), float(c[k, k])) for i, k in pairs)
    lower = [float(c[i, k]) for i in range(t) for k in range(i + 1)]
    return {"ac": 1.0 - incompatible / max(len(pairs), 1), "am": sum(lower) / len(lower)}
