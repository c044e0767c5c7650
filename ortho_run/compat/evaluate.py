"""The compatibility matrix: old/old, new/old, new/new retrieval and the ECC verdicts, computed
from embeddings already at hand (the trainer's last evaluation and the old model's gallery)."""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ortho_run import keys
from ortho_run.retrieval import compatibility_summary, multistep_scores, retrieval_metrics


def compat_matrix(spaces: Dict[str, Tensor], old: Tensor, labels: Tensor) -> Dict[str, float]:
    """``spaces``: the new model's named embedding spaces of the test split (``new`` first),
    ``old``: the old model's embeddings of the same images (query = gallery, self excluded)."""
    matrix = {"old_old": retrieval_metrics(old, old, labels)}
    for name, e in spaces.items():
        matrix[f"{name}_old"] = retrieval_metrics(e, old, labels)
        matrix[f"{name}_{name}"] = retrieval_metrics(e, e, labels)
    out = {keys.compat(pair, m): v for pair, ms in matrix.items() for m, v in ms.items()}
    out.update({keys.ecc(k[len("ecc_"):] if k != "ecc" else ""): v
                for k, v in compatibility_summary(matrix).items()})
    return out


def multistep_matrix(embeddings: Sequence[Tensor], labels: Tensor, classes: Sequence[int],
                     fractions: Optional[Sequence[float]] = None,
                     known: Optional[Dict[Tuple[int, int], Dict[str, float]]] = None
                     ) -> Dict[str, object]:
    """The multi-step protocol on the last step's test split: ``embeddings[t]`` is step t's
    model's embedding of it (query = gallery = the split, self excluded). ``compat/steps/<m>``
    is the T×T matrix C[t][k] = m(step t query, step k gallery) for k ≤ t (None above the
    diagonal), for m = cmc1 and map; AC/AM from CMC@1 (the protocol's) and from mAP; the steps'
    class counts and training-data fractions. ``known`` holds the metrics of pairs (t, k)
    already computed (the one-step matrix's), which are not computed again."""
    t = len(embeddings)
    mats: Dict[str, List[list]] = {"cmc1": [[None] * t for _ in range(t)],
                                   "map": [[None] * t for _ in range(t)]}
    for i in range(t):
        for k in range(i + 1):
            m = (known or {}).get((i, k)) or retrieval_metrics(embeddings[i], embeddings[k],
                                                               labels)
            for name in mats:
                mats[name][i][k] = m[name]
    out: Dict[str, object] = {keys.steps_matrix(name): mat for name, mat in mats.items()}
    out[keys.STEPS_CLASSES] = list(classes)
    out[keys.STEPS_FRACTIONS] = list(fractions or [1.0] * t)
    for name, suffix in (("cmc1", ""), ("map", "_map")):
        dense = torch.tensor([[v if v is not None else 0.0 for v in row] for row in mats[name]])
        for k, v in multistep_scores(dense).items():
            out[keys.multistep(k, "map" if suffix else "")] = v
    return out
