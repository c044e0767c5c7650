"""Orthogonality regularisers of the backbone's layers (``regularizer=<name>``).

A regulariser picks layers of the backbone by a glob on their module names (``layers``, default
every convolution and linear layer) and adds ``weight`` × its penalty to the loss, logged as the
loss part ``reg``; ``weight_milestones``/``weight_factors`` step the weight down by epoch (the
epoch's weight is logged as ``reg_weight``). Whatever the regulariser (``none`` included), the
mean orthogonality error of the chosen layers, ‖G − I‖_F with G the smaller Gram matrix of the
weight as a matrix (out × in·k·k), is reported as ``geometry/layer_orth_err``, so runs with and
without a regulariser compare on the same number.
"""

from __future__ import annotations

import fnmatch
import logging
from dataclasses import dataclass, field
from typing import ClassVar, Dict, List, Optional

import torch
from torch import Tensor, nn

from ortho_run.config import at_least
from ortho_run.errors import ConfigError
from ortho_run.orthogonality import gram_error
from ortho_run.registry import Registry

log = logging.getLogger("ortho_run")


def _increasing(v) -> bool:
    return all(m >= 0 for m in v) and all(b > a for a, b in zip(v, v[1:]))


@dataclass
class RegularizerConfig:
    name: str = "none"
    weight: float = 1e-4
    layers: List[str] = field(default_factory=lambda: ["*"])  # globs on backbone module names
    #: the weight's steps: from (0-based) epoch ``weight_milestones[i]`` on, the penalty's weight
    #: is ``weight × weight_factors[i]`` (SRIP's official schedule; none: constant)
    weight_milestones: List[int] = field(default_factory=list)
    weight_factors: List[float] = field(default_factory=list)
    checks: ClassVar[list] = at_least(0, "weight") + [
        ("weight_milestones", _increasing, "increasing epochs, each >= 0"),
        ("weight_factors", lambda v: all(f >= 0 for f in v), "factors, each >= 0")]


REGULARIZERS: Registry = Registry("regulariser", group="regularizer",
                                  package="ortho_run.regularizers",
                                  base_schema=RegularizerConfig)

LAYER_TYPES = (nn.Conv2d, nn.Linear)


class Regularizer(nn.Module):
    """Base: chooses the layers; ``penalty()`` is the loss term (0 for ``none``)."""

    types = LAYER_TYPES  # the layer kinds a regulariser applies to
    adds_loss = True
    DIAGNOSTICS = {"layer_orth_err": "mean ‖G − I‖_F of the chosen backbone layers (G the "
                                     "smaller Gram matrix of each weight as a matrix)"}

    def __init__(self, cfg, backbone: nn.Module):
        super().__init__()
        self.cfg = cfg
        chosen = [(n, m) for n, m in backbone.named_modules()
                  if isinstance(m, self.types) and any(fnmatch.fnmatchcase(n, pat)
                                                       for pat in cfg.layers)]
        if not chosen and str(cfg.name) != "none":
            kinds = "/".join(t.__name__ for t in self.types)
            raise ConfigError(f"regularizer.layers={list(cfg.layers)} matches no {kinds} layer "
                              f"of the backbone; its layers are: "
                              + ", ".join(n for n, m in backbone.named_modules()
                                          if isinstance(m, LAYER_TYPES)))
        unmatched = [pat for pat in cfg.layers
                     if not any(isinstance(m, self.types) and fnmatch.fnmatchcase(n, pat)
                                for n, m in backbone.named_modules())]
        if chosen and unmatched and str(cfg.name) != "none":
            log.warning("regularizer.layers: %s match no %s layer of the backbone (chosen: %s)",
                        ", ".join(unmatched), "/".join(t.__name__ for t in self.types),
                        ", ".join(n for n, _ in chosen))
        self.names = [n for n, _ in chosen]
        self._layers = [m for _, m in chosen]  # not submodules: the backbone owns them

    @classmethod
    def check(cls, run_cfg) -> None:
        """The pre-flight's: one factor per milestone."""
        r = run_cfg.regularizer
        if len(r.weight_milestones) != len(r.weight_factors):
            raise ConfigError(
                f"regularizer.weight_milestones={list(r.weight_milestones)} and "
                f"regularizer.weight_factors={list(r.weight_factors)} differ in length: give "
                f"one factor of regularizer.weight per milestone epoch")

    def weight_at(self, epoch: int) -> float:
        """The penalty's weight in (0-based) epoch ``epoch``: ``weight``, times the factor of
        the last milestone reached."""
        factor = 1.0
        for m, f in zip(self.cfg.weight_milestones, self.cfg.weight_factors):
            if epoch >= m:
                factor = float(f)
        return float(self.cfg.weight) * factor

    def weights(self) -> List[Tensor]:
        return [m.weight for m in self._layers]

    def stacks(self, key=lambda m: ()) -> List[List[nn.Module]]:
        """The chosen layers in groups of equal weight shape (and equal ``key(layer)``): a
        penalty is one batched computation per group."""
        groups: Dict[tuple, List[nn.Module]] = {}
        for m in self._layers:
            groups.setdefault((tuple(m.weight.shape), key(m)), []).append(m)
        return list(groups.values())

    @staticmethod
    def stacked(layers: List[nn.Module]) -> Tensor:
        """The weights of same-shape ``layers`` as one n × rows × cols stack (a convolution's
        kernel flattened to out × in·k·k); one layer is a view, several one ``stack``."""
        w = layers[0].weight
        rows = w.shape[0]
        if len(layers) == 1:
            return w.reshape(1, rows, -1)
        return torch.stack([m.weight for m in layers]).reshape(len(layers), rows, -1)

    def penalty(self) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    @torch.no_grad()
    def diagnostics(self) -> Dict[str, float]:
        if not self._layers:
            return {}
        errs = [float(gram_error(w.detach().float())) for w in self.weights()]
        return {"layer_orth_err": sum(errs) / len(errs)}


def build_regularizer(cfg, backbone: nn.Module) -> Optional[Regularizer]:
    """The regulariser ``cfg`` names, on ``backbone``'s layers (before optimisers are built:
    a hard constraint reparametrises its layers)."""
    return REGULARIZERS.get(str(cfg.name))(cfg, backbone)
