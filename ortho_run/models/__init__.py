"""Backbones (``model=<name>``). Each returns the penultimate feature [B, D] and exposes
``feature_dim``; the method owns the head. Adding a model is one file here that registers it in
``MODELS`` (found by discovery) plus one yaml in ``conf/model/``."""

from __future__ import annotations

from torch import nn

from ortho_run.models.registry import MODELS


class Backbone(nn.Module):
    """A feature extractor plus the optional embedding projection to ``model.embed_dim``."""

    def __init__(self, body: nn.Module, feature_dim: int, embed_dim=None, embed_bn=False):
        super().__init__()
        self.body = body
        self.embed = None
        if embed_dim:
            layers = [nn.Linear(feature_dim, embed_dim)]
            if embed_bn:
                layers.append(nn.BatchNorm1d(embed_dim))
            self.embed = nn.Sequential(*layers)
            feature_dim = embed_dim
        self.feature_dim = feature_dim

    @property
    def data_config(self):
        """The input normalisation (and size) a pretrained body expects, or None."""
        return getattr(self.body, "ortho_data_config", None)

    @property
    def data_init_images(self) -> int:
        """How many training images the body asks for to initialise itself (0: none)."""
        return int(getattr(self.body, "data_init_images", 0) or 0)

    def init_from_data(self, images) -> None:
        """Initialise from normalised training images (the body's ``init_from_data``)."""
        if self.data_init_images:
            self.body.init_from_data(images)

    def param_groups(self):
        """The trainable parameters by role: the body's own ``param_groups()`` where it has one
        (plus the embedding projection as ``hidden``/``backbone_1d``), else the default split
        (``optim.backbone_groups``: the first weight matrix is the stem)."""
        from ortho_run.optim.base import ParamGroup, backbone_groups

        if not hasattr(self.body, "param_groups"):
            return backbone_groups(self)
        groups = [g for g in self.body.param_groups() if g.params]
        if self.embed is not None:
            ps = [p for p in self.embed.parameters() if p.requires_grad]
            groups += [g for g in (ParamGroup("hidden", [p for p in ps if p.ndim >= 2]),
                                   ParamGroup("backbone_1d", [p for p in ps if p.ndim < 2]))
                       if g.params]
        return groups

    def forward(self, x):
        f = self.body(x)
        return self.embed(f) if self.embed is not None else f


def model_data_config(cfg, in_channels: int, image_size: int):
    """The input normalisation (and size) the backbone ``cfg`` names will ask for, known before
    it is built: its builder's ``data_config(cfg, in_channels, image_size)``, or None."""
    hook = getattr(MODELS.get(cfg.name), "data_config", None)
    return hook(cfg, in_channels, image_size) if hook is not None else None


def build_backbone(cfg, in_channels: int, image_size: int) -> Backbone:
    body, dim = MODELS.get(cfg.name)(cfg, in_channels=in_channels, image_size=image_size)
    return Backbone(body, dim, cfg.embed_dim, cfg.embed_bn)


__all__ = ["MODELS", "Backbone", "build_backbone", "model_data_config"]
