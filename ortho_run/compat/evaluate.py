"""The compatibility matrix: old/old, new/old, new/new retrieval and the ECC verdicts, computed
from embeddings already at hand (the trainer's last evaluation and the old model's gallery)."""

from __future__ import annotations

from typing import Dict

from torch import Tensor

from ortho_run.retrieval import compatibility_summary, retrieval_metrics


def compat_matrix(spaces: Dict[str, Tensor], old: Tensor, labels: Tensor) -> Dict[str, float]:
    """``spaces``: the new model's named embedding spaces of the test split (``new`` first),
    ``old``: the old model's embeddings of the same images (query = gallery, self excluded)."""
    matrix = {"old_old": retrieval_metrics(old, old, labels)}
    for name, e in spaces.items():
        matrix[f"{name}_old"] = retrieval_metrics(e, old, labels)
        matrix[f"{name}_{name}"] = retrieval_metrics(e, e, labels)
    out = {f"compat/{pair}/{m}": v for pair, ms in matrix.items() for m, v in ms.items()}
    out.update({f"compat/{k}": v for k, v in compatibility_summary(matrix).items()})
    return out
