"""The method plugin interface (the heart of the design).

A method is an ``nn.Module`` built from its config and a ``MethodContext`` (what the runner
knows: feature dim, number of classes, device, cache dir, and for compatibility methods what
it declared in ``needs``). It receives one ``Batch`` and owns its head and parameters, its loss
(named parts), its embeddings, and its optimiser needs (role-tagged ``ParamGroup``s). The
runner never branches on a method's name, nor reads a method's attributes beyond this
interface.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, NamedTuple, Optional

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from ortho_run.config import BACKBONE_ROLES, MethodConfig
from ortho_run.errors import ConfigError
from ortho_run.optim.base import ParamGroup
from ortho_run.registry import Registry

METHODS: Registry = Registry("method", group="method", package="ortho_run.methods",
                             base_schema=MethodConfig)


def register(name: str):
    """Class decorator: ``@register("opl")``; the class's ``Config`` is its schema."""
    return METHODS.register(name)


@dataclass
class Batch:
    """One training or evaluation batch as a method sees it."""

    inputs: Tensor  # the images, as the backbone got them
    targets: Optional[Tensor] = None  # class indices (None at inference)
    features: Optional[Tensor] = None  # the backbone's output [B, D]
    old: Optional[Tensor] = None  # the frozen old model's embedding of ``inputs`` (if declared)
    independent: Optional[Tensor] = None  # an independently trained new model's embedding
    #                                       of ``inputs`` (if declared)


@dataclass
class MethodOutput:
    logits: Optional[Tensor] = None  # [B, C] for classification (accuracy, CE eval loss)
    embedding: Optional[Tensor] = None  # [B, E] for retrieval / geometry; default: features
    extras: Dict[str, Tensor] = field(default_factory=dict)  # method-private tensors for loss()


class LinearHead(NamedTuple):
    """logits = W·x + b, with x the feature or (``unit_features``) the L2-normalised feature."""

    weight: Tensor
    bias: Optional[Tensor]
    unit_features: bool = False


@dataclass(frozen=True)
class Needs:
    """What a method asks of the compatibility service (nothing, for most methods).

    The service computes exactly what is declared and hands it over as ``ctx.artifacts``
    (``ortho_run.compat.CompatArtifacts``); the runner evaluates the old/new retrieval matrix
    whenever an old model is involved.
    """

    old_model: bool = False  # evaluated against a frozen old model (the compatibility matrix)
    old_embedding: bool = False  # ``batch.old``: the old model's embedding of each batch
    class_means: bool = False  # the old model's per-class feature means, over all classes
    old_head: bool = False  # the old model's linear classifier (a LinearHead) for its classes
    independent_backbone: bool = False  # the backbone is an independently trained new model,
    #                                     loaded and kept frozen
    independent_embedding: bool = False  # ``batch.independent``: that model's embedding of
    #                                      each batch (it stays frozen, outside this net)

    @property
    def any(self) -> bool:
        """Whether anything is declared (the method is a compatibility method)."""
        return (self.old_model or self.old_embedding or self.class_means or self.old_head
                or self.independent_backbone or self.independent_embedding)


@dataclass(frozen=True)
class CompatShape:
    """What a checkpoint records to rebuild a compatibility method's net without its old
    model: the old embedding's dim, the old model's classes, whether its head had a bias."""

    old_dim: int
    num_old_classes: int
    old_head_bias: Optional[bool] = None  # None: the method uses no old head


@dataclass
class CompatArtifacts:
    """``ctx.artifacts`` of a compatibility method: only what its ``needs`` declared is set."""

    old_dim: int
    num_old_classes: int
    class_means: Optional[Tensor] = None  # C_new × d_old: mean raw old feature per class
    unit_class_means: Optional[Tensor] = None  # C_new × d_old: mean of unit old features
    old_head: Optional[object] = None  # the old classifier (a methods.LinearHead)

    def shape(self) -> CompatShape:
        """What a checkpoint records to rebuild a net of this run without its old model."""
        head = self.old_head
        return CompatShape(self.old_dim, self.num_old_classes,
                           None if head is None else head.bias is not None)

    @classmethod
    def placeholder(cls, shape: CompatShape, num_classes: int) -> "CompatArtifacts":
        """Zeros of the recorded shape: enough to build the net, whose state dict then holds
        the values its method derived from the old model (class means, the old head)."""
        d, n_old = shape.old_dim, shape.num_old_classes
        art = cls(old_dim=d, num_old_classes=n_old, class_means=torch.zeros(num_classes, d),
                  unit_class_means=torch.zeros(num_classes, d))
        if shape.old_head_bias is not None:
            art.old_head = LinearHead(torch.zeros(n_old, d),
                                      torch.zeros(n_old) if shape.old_head_bias else None)
        return art


@dataclass
class MethodContext:
    feature_dim: int
    num_classes: int
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    label_smoothing: float = 0.0
    cache_dir: str = "~/.cache/ortho_run"
    seed: int = 0
    artifacts: Optional[CompatArtifacts] = None  # what ``needs`` declared, for its method
    distributed: bool = False


class Method(nn.Module):
    Config = MethodConfig
    plugin_name = "base"
    #: what each ``geometry/<key>`` of ``diagnostics()`` is (``ortho-report``'s legend reads it)
    DIAGNOSTICS: Dict[str, str] = {}
    #: a reference row of its protocol, not expected to improve on it (``independent``: the
    #: compatibility protocol's incompatible model)
    reference: bool = False

    def __init__(self, cfg, ctx: MethodContext):
        super().__init__()
        if isinstance(cfg, DictConfig):  # a plain dataclass: no OmegaConf lookups per step
            cfg = OmegaConf.to_object(cfg)
        self.cfg = cfg
        self.ctx = ctx

    @classmethod
    def needs(cls, cfg) -> Needs:
        """What this method (with config ``cfg``) needs from an old model."""
        return Needs()

    @classmethod
    def check(cls, run_cfg) -> None:
        """Checks of the whole run config this method needs, run before any work (before an
        old model trains): raise ConfigError naming the key. A method that overrides it calls
        this one too. Here: a method that keeps its backbone frozen (an independently trained
        one) refuses an optimiser whose ``optim.roles`` select backbone roles alone, which
        would update nothing."""
        roles = OmegaConf.select(run_cfg, "optim.roles", default=None)
        if roles is None or not cls.needs(run_cfg.method).independent_backbone:
            return
        if set(roles) <= set(BACKBONE_ROLES):
            optim = run_cfg.optim.name
            raise ConfigError(f"optim={optim}: optim.roles={list(roles)} are backbone roles, but "
                              f"method={run_cfg.method.name} keeps its backbone frozen (an "
                              f"independently trained model), so {optim} would update "
                              f"nothing; add head or method to optim.roles, or use optim=adamw/sgd")

    @classmethod
    def feature_dim(cls, cfg, old_dim: int, embed_dim: Optional[int]) -> Optional[int]:
        """The backbone output dim this method needs given the old model's dim and
        ``model.embed_dim`` (OCA: d_old + k; BT²: widened to embed_dim + d_old), or None for
        ``model.embed_dim`` itself."""
        return None

    @property
    def artifacts(self) -> CompatArtifacts:
        """The compatibility artifacts this method declared (``ctx.artifacts``), checked."""
        if self.ctx.artifacts is None:
            raise ConfigError(f"method={self.plugin_name} was built without the old model it "
                              f"needs: in a run, set compat.old_ckpt to a run dir or leave it "
                              f"null to train one on compat.old_classes; when building it "
                              f"yourself, give MethodContext(artifacts=...)")
        return self.ctx.artifacts

    def require_old_dim(self, why: str) -> int:
        """The old model's dim, which must equal the new feature dim because ``why``."""
        d_old = self.artifacts.old_dim
        if d_old != self.ctx.feature_dim:
            raise ConfigError(f"method={self.plugin_name}: {why}, but the new feature dim "
                              f"{self.ctx.feature_dim} differs from the old model's {d_old}; "
                              f"set model.embed_dim={d_old}")
        return d_old

    # --- forward / loss -------------------------------------------------------------
    def forward(self, batch: Batch) -> MethodOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    def loss(self, out: MethodOutput, batch: Batch) -> Dict[str, Tensor]:
        """``{"loss": total, <part>: value, ...}``; the trainer logs every part as ``train/<part>``."""
        ce = self.ce(out.logits, batch.targets)
        return {"loss": ce, "ce": ce}

    def ce(self, logits: Tensor, targets: Tensor) -> Tensor:
        return F.cross_entropy(logits.float(), targets, label_smoothing=self.ctx.label_smoothing)

    def embeddings(self, out: MethodOutput, batch: Batch) -> Dict[str, Tensor]:
        """Named embedding spaces for retrieval, geometry and compatibility. ``new`` is the
        method's retrieval space; others (e.g. ``raw``) are evaluated against the old gallery
        too."""
        return {"new": out.embedding if out.embedding is not None else batch.features}

    def embedding_dim(self) -> int:
        """The dim of the ``new`` embedding (what a later model's ``compat`` sees as old_dim)."""
        return self.ctx.feature_dim

    def classifier(self) -> Optional["LinearHead"]:
        """The method's linear classifier, if it has one (a later model's BCT influence loss
        reuses it as the old head)."""
        return None

    # --- optimisation ---------------------------------------------------------------
    def param_groups(self) -> List[ParamGroup]:
        """The method's trainable parameters by role. Default: all of them as ``head``, for the
        configured optimiser. A method with an optimiser of its own returns a ``method`` group
        naming it (GCR: ``grassmann_sgd``)."""
        params = [p for p in self.parameters() if p.requires_grad]
        return [ParamGroup("head", params)] if params else []

    # --- diagnostics ----------------------------------------------------------------
    @torch.no_grad()
    def diagnostics(self) -> Dict[str, float]:
        """Geometry of the classifier itself (logged under ``geometry/``)."""
        return {}


#: the keys of ``row_orthogonality``, described
ROW_ORTHOGONALITY = {
    "classifier_orth_err": "‖ŴŴᵀ − I‖_F of the row-normalised class vectors of the head",
    "classifier_mean_abs_cos": "mean |cos| between the class vectors of the head",
}


def row_orthogonality(w: Tensor) -> Dict[str, float]:
    """Mean |cos| between distinct rows, and ‖ŴŴᵀ − I‖_F of the row-normalised matrix."""
    w = F.normalize(w.detach().float(), dim=1)
    g = w @ w.t()
    n = g.shape[0]
    off = g - torch.eye(n, device=g.device)
    mean_abs = off.abs().sum() / max(n * (n - 1), 1)
    return {
        "classifier_mean_abs_cos": float(mean_abs),
        "classifier_orth_err": float(torch.linalg.matrix_norm(off)),
    }
