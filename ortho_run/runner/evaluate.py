"""Evaluation: loss and top-k accuracy, and the geometry of the learned representation."""

from __future__ import annotations

from typing import Dict

import torch
import torch.nn.functional as F
from torch import Tensor


def tta_logits(net, x: Tensor, logits: Tensor, flip: bool, translate: bool) -> Tensor:
    """Test-time augmentation of ``logits`` (the net's on ``x``). ``flip``: the mean with the
    mirror's. ``translate`` (airbench's level 2, with ``flip``): ½·that + ½·the mean of the same
    for ``x`` moved one pixel up-left and one down-right (reflect padding)."""
    def view(inputs, known=None):
        out = net(inputs)[1].logits.float() if known is None else known
        if flip:
            out = 0.5 * (out + net(inputs.flip(3))[1].logits.float())
        return out

    out = view(x, logits)
    if translate:
        h, w = x.shape[-2:]
        padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
        shifted = torch.stack([view(padded[:, :, :h, :w]), view(padded[:, :, 2:, 2:])]).mean(0)
        out = 0.5 * out + 0.5 * shifted
    return out


@torch.no_grad()
def evaluate(net, loader, autocast, collect: bool = False, reduce=None,
             tta_flip: bool = False, tta_translate: bool = False) -> Dict[str, object]:
    """Top-1/top-5 accuracy and CE loss; with ``collect`` also every named embedding space of
    the method (``new`` first) and the labels.

    Sums stay on the device and are read once at the end (one host sync per evaluation). A
    split where any image's logits are not finite (a diverged net) has NaN accuracies.
    ``reduce`` (data-parallel) sums the counters across ranks; the embeddings are those of
    the whole split, gathered from every rank's shard (the loader's ``unshard``). ``tta_flip``
    averages the logits of each image and its horizontal mirror, ``tta_translate`` adds airbench's
    one-pixel translations (``tta_logits``); embeddings stay those of the image.
    """
    net.eval()
    dev = next(net.parameters()).device
    # loss, top1, top5, n, images whose logits hold a NaN or an infinity
    tot = torch.zeros(5, device=dev, dtype=torch.float64)
    embs: Dict[str, list] = {}
    labels = []
    has_logits = True
    for x, y in loader:
        with autocast():
            batch, out = net(x)
            logits = None
            if out.logits is not None:
                logits = out.logits.float()
                if tta_flip or tta_translate:
                    logits = tta_logits(net, x, logits, tta_flip, tta_translate)
        if logits is not None:
            k = min(5, logits.shape[1])
            topk = logits.topk(k, dim=1).indices
            correct = topk == y[:, None]
            tot[0] += F.cross_entropy(logits, y, reduction="sum")
            tot[1] += correct[:, :1].sum()
            tot[2] += correct.any(dim=1).sum()
            tot[4] += (~torch.isfinite(logits)).any(dim=1).sum()
        else:
            has_logits = False
        tot[3] += len(y)
        if collect:
            for k, v in net.method.embeddings(out, batch).items():
                embs.setdefault(k, []).append(v.float())
            labels.append(y)
    if reduce is not None:
        reduce(tot)
    tot = tot.tolist()
    n = max(tot[3], 1)
    res: Dict[str, object] = {"n": int(tot[3])}
    if has_logits:
        res.update(loss=tot[0] / n, acc1=tot[1] / n, acc5=tot[2] / n)
        if tot[4]:  # no prediction is read from a non-finite logit: the accuracy is unmeasured
            res.update(acc1=float("nan"), acc5=float("nan"))
    if collect:  # a shard of the split (one rank's of several): the whole split, in order
        whole = getattr(loader, "unshard", lambda t: t)
        res["embeddings"] = {k: whole(torch.cat(v)) for k, v in embs.items()}
        res["labels"] = whole(torch.cat(labels))
    return res


@torch.no_grad()
def feature_geometry(emb: Tensor, labels: Tensor) -> Dict[str, float]:
    """Mean intra-class cosine, mean |cos| between class means, effective rank.

    Effective rank (Roy & Vetterli 2007): exp of the entropy of the normalised singular values
    of the centred embeddings. Embeddings holding a NaN or an infinity (a diverged model) give
    NaN for each.
    """
    if not bool(torch.isfinite(emb).all()):
        return dict.fromkeys(("intra_class_cos", "class_mean_abs_cos", "effective_rank"),
                             float("nan"))
    v = F.normalize(emb.double(), dim=1)
    classes = torch.unique(labels)
    onehot = (labels[:, None] == classes[None, :]).double()  # N×C
    counts = onehot.sum(0)
    sums = onehot.t() @ v  # C×D
    # Σ_{i≠j in c} cos = ‖Σ v‖² − n_c
    pair = (sums.pow(2).sum(1) - counts) / (counts * (counts - 1)).clamp_min(1)
    intra = pair[counts > 1].mean() if bool((counts > 1).any()) else torch.tensor(float("nan"))
    means = F.normalize(sums / counts[:, None], dim=1)
    g = means @ means.t()
    c = len(classes)
    between = (g.abs().sum() - g.diagonal().abs().sum()) / max(c * (c - 1), 1)
    x = emb.double() - emb.double().mean(0, keepdim=True)
    s = torch.linalg.svdvals(x)
    p = s / s.sum().clamp_min(1e-12)
    p = p[p > 0]
    erank = torch.exp(-(p * p.log()).sum())
    return {"intra_class_cos": float(intra), "class_mean_abs_cos": float(between),
            "effective_rank": float(erank)}
