"""Published results the presets target, as data: ``ortho-report`` puts a run's numbers next
to them (``--against``), says whether they reproduce, and how the run's setting differs from
the paper's. A preset names its reference (``reference: <name>``, recorded in summary.json).

Only numbers read in a source are here (the source says where); values are in percent, as
published. ``ortho-report --references`` lists them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from ortho_run import keys


@dataclass(frozen=True)
class Published:
    value: float  # percent
    spread: Optional[float] = None  # the published ± (percent), when given
    n: Optional[int] = None  # the runs behind the value, when given


@dataclass(frozen=True)
class Setting:
    """One item of a paper's setting: the config key, the values of ours that match it, and
    how the paper says it."""

    key: str
    accepts: Tuple
    label: str


@dataclass(frozen=True)
class Reference:
    name: str
    paper: str
    table: str  # the table or README section
    source: str  # where the numbers were read (a repository file, a paper)
    setting: Tuple[Setting, ...]
    #: method name → summary key → the published value
    rows: Dict[str, Dict[str, Published]] = field(default_factory=dict)
    note: str = ""


def _acc(value, spread=None, n=None):
    return {keys.TEST_ACC1: Published(value, spread, n)}


def _compat(**pairs) -> Dict[str, Published]:
    """compat/<pair>/<metric> values: pair=(top-1, top-5, mAP)."""
    out = {}
    for pair, (top1, top5, mean_ap) in pairs.items():
        out[keys.compat(pair, "cmc1")] = Published(top1)
        out[keys.compat(pair, "cmc5")] = Published(top5)
        out[keys.compat(pair, "map")] = Published(mean_ap)
    return out


_CIFAR100_RESNET56 = (
    Setting("data.name", ("cifar100",), "CIFAR-100"),
    Setting("model.name", ("resnet56",), "ResNet-56"),
    Setting("trainer.max_epochs", (200,), "200 epochs"),
    Setting("data.batch_size", (128,), "batch 128"),
)
_BT2_CIFAR100 = (
    Setting("data.name", ("cifar100",), "CIFAR-100"),
    Setting("model.name", ("resnet50_cifar", "tv_resnet50"), "ResNet-50"),
    Setting("trainer.max_epochs", (100,), "100 epochs"),
    Setting("compat.old_classes", ("first_half",), "old model on classes 0-49"),
    Setting("model.embed_dim", (128,), "128-d embeddings"),
)


def _imagenet(model_names, label, epochs=None):
    s = [Setting("data.name", ("imagenet",), "ImageNet"),
         Setting("model.name", tuple(model_names), label)]
    if epochs:
        s.append(Setting("trainer.max_epochs", (epochs,), f"{epochs} epochs"))
    return tuple(s)


REFERENCES: Dict[str, Reference] = {r.name: r for r in [
    Reference(
        "opl_cifar100", "Ranasinghe et al., Orthogonal Projection Loss (ICCV 2021)",
        "project page, Results across tasks: Classification, CIFAR-100",
        "kahnchana/opl index.html (the CIFAR script cifar/scripts/train.sh trains ResNet-56)",
        _CIFAR100_RESNET56, {"ce": _acc(72.40), "opl": _acc(73.52)}),
    Reference(
        "opl_imagenet_resnet18", "Ranasinghe et al., Orthogonal Projection Loss (ICCV 2021)",
        "ImageNet top-1, ResNet-18", "the OPL paper (arXiv:2103.14021), ImageNet table", _imagenet(["tv_resnet18"], "ResNet-18"),
        {"ce": _acc(69.91), "opl": _acc(70.27)}),
    Reference(
        "opl_imagenet_resnet50", "Ranasinghe et al., Orthogonal Projection Loss (ICCV 2021)",
        "ImageNet top-1, ResNet-50", "the OPL paper (arXiv:2103.14021), ImageNet table", _imagenet(["tv_resnet50"], "ResNet-50"),
        {"ce": _acc(76.15), "opl": _acc(76.98)}),
    Reference(
        "gcr_imagenet", "Wang, Li et al., Grassmann Class Representation (ICCV 2023)",
        "ImageNet top-1, ResNet50-D, 100 epochs, k = 8", "the GCR paper (ICCV 2023), "
        "ImageNet table (code: innerlee/GCR)", _imagenet(["timm"], "ResNet50-D", 100),
        {"ce": _acc(78.05), "gcr": _acc(79.26)},
        note="k = 1, 4, 16, 32: 78.42, 78.68, 79.21, 78.63; Swin-T 81.06 -> 81.63"),
    Reference(
        "ebv_imagenet", "Shen et al., Equiangular Basis Vectors (CVPR 2023)",
        "ImageNet top-1, ResNet-50, 100 epochs + 5 warm-up", "aassxun/Equiangular-Basis-"
        "Vectors training logs (evaluated at 256 px)",
        _imagenet(["tv_resnet50"], "ResNet-50", 100), {"ebv": _acc(78.99)}),
    Reference(
        "bt2_cifar100", "Zhou et al., BT^2: Backward-compatible Training with Basis "
        "Transformation (ICCV 2023)", "README, CIFAR-100 (50 -> 100 classes)",
        "YifeiZhou02/BT-2 README.md", _BT2_CIFAR100, {
            "independent": _compat(old_old=(33.6, 55.4, 24.4), new_old=(0.8, 4.9, 1.5),
                                   new_new=(62.7, 74.6, 49.9)),
            "bct": _compat(old_old=(33.6, 55.4, 24.4), new_old=(25.0, 62.1, 24.7),
                           new_new=(60.0, 71.9, 47.3)),
            "bt2": _compat(old_old=(33.6, 55.4, 24.4), new_old=(38.7, 64.6, 27.7),
                           new_new=(62.4, 75.1, 50.5)),
        }),
    Reference(
        "lambda_orth_cifar100", "Ricci et al., lambda-Orthogonality regularisation "
        "(NeurIPS 2025)", "CIFAR-100 downstream, ResNet-18 -> ViT-L/16, CMC top-1",
        "the lambda-orthogonality paper (NeurIPS 2025), CIFAR-100 table",
        (Setting("data.name", ("cifar100",), "CIFAR-100"),
         Setting("model.name", ("timm",), "ResNet-18 (old) -> ViT-L/16 (new)")),
        {"independent": {keys.compat("new_old", "cmc1"): Published(0.8)},
         "lambda_orth": {keys.compat("old_old", "cmc1"): Published(51.13),
                         keys.compat("new_old", "cmc1"): Published(71.85),
                         keys.compat("new_new", "cmc1"): Published(78.23)}},
        note="new/new of the independent ViT-L/16 alone: 74.08; ImageNet 500 -> 1000 classes "
             "(ResNet-34): old/old 43.56, strict B/old 43.94"),
    Reference(
        "airbench94", "K. Jordan, cifar10-airbench (airbench94_muon.py)",
        "docstring: 94.01 mean accuracy (n = 200) in 2.59 s on an A100",
        "KellerJordan/cifar10-airbench airbench94_muon.py",
        (Setting("data.name", ("cifar10",), "CIFAR-10 (its own pixels)"),
         Setting("model.name", ("airbench94",), "airbench94 net"),
         Setting("trainer.max_epochs", (8,), "8 epochs"),
         Setting("data.batch_size", (2000,), "batch 2000"),
         Setting("optim.name", ("muon",), "Muon")),
        {"ce": _acc(94.01, n=200)}),
]}


def get(name: str) -> Reference:
    from ortho_run.errors import ConfigError

    if name not in REFERENCES:
        raise ConfigError(f"reference={name}: no such published result; references: "
                          f"{', '.join(sorted(REFERENCES))} (ortho-report --references)")
    return REFERENCES[name]


def metric_keys() -> List[str]:
    """Every summary key a reference compares."""
    return sorted({k for r in REFERENCES.values() for row in r.rows.values() for k in row})


def verdict(ours: Sequence[float], published: Published) -> Tuple[str, str]:
    """(mark, why) for our values (fractions, one per seed) against a published value:
    ✅ within the published spread, or, when none is published, within 2σ of our seeds; ❌
    otherwise; "n < 3" with fewer than three seeds; "missing" with none."""
    vals = [100.0 * v for v in ours if isinstance(v, (int, float)) and math.isfinite(v)]
    if not vals:
        return "missing", "no run reports it"
    if len(vals) < 3:
        return "n < 3", f"{len(vals)} seed{'s' if len(vals) > 1 else ''}: too few to judge"
    mean = sum(vals) / len(vals)
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1))
    delta = mean - published.value
    if published.spread is not None:
        ok = abs(delta) <= published.spread
        return ("✅" if ok else "❌"), (f"off by {abs(delta):.2f}, published spread "
                                      f"±{published.spread}")
    ok = abs(delta) <= 2 * std
    return ("✅" if ok else "❌"), f"off by {abs(delta):.2f}, 2σ of our seeds {2 * std:.2f}"


def differences(reference: Reference, config: dict) -> List[str]:
    """How a run's resolved config (a plain dict) differs from the paper's setting."""
    out = []
    for s in reference.setting:
        node = config
        for part in s.key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node not in s.accepts:
            out.append(f"{s.key}={node} (paper: {s.label})")
    return out
