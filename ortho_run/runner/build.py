"""Building the parts of a job from its config (shared by the runner and the compat service)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from omegaconf import OmegaConf

from ortho_run.config import RunConfig
from ortho_run.datasets import load_dataset
from ortho_run.errors import CheckpointError
from ortho_run.methods import METHODS, MethodContext
from ortho_run.models import build_backbone
from ortho_run.runner import checkpoint as ckpt
from ortho_run.runner.trainer import Dist, Net


def build_method(cfg, ds, feature_dim: int, device, dist: Dist, old_model=None):
    cls = METHODS.get(cfg.method.name)
    ctx = MethodContext(feature_dim=feature_dim, num_classes=ds.num_classes, device=device,
                        label_smoothing=cfg.trainer.label_smoothing, cache_dir=cfg.cache_dir,
                        seed=cfg.seed, compat=old_model, distributed=dist.world_size > 1)
    return cls(cfg.method, ctx)


def load_run(run_dir: Path, device):
    """The trained Net of a finished run dir, its config and its number of classes.

    The checkpoint records the data shape the net was built for, so the data set itself is
    not loaded (checkpoints from before that record fall back to loading it)."""

    f = run_dir / "checkpoints" / "last.pt"
    conf = run_dir / "resolved_config.yaml"
    if not f.is_file() or not conf.is_file():
        raise CheckpointError(f"compat.old_ckpt={run_dir}: expected checkpoints/last.pt and "
                              f"resolved_config.yaml in that run dir")
    cfg = OmegaConf.merge(OmegaConf.structured(RunConfig), OmegaConf.load(conf))
    state = ckpt.load(f, cfg, map_location=device)
    shape = state.get("shape") or {}
    if not shape:
        ds = load_dataset(cfg.data)
        shape = {"channels": ds.channels, "image_size": ds.image_size,
                 "num_classes": ds.num_classes}
    model_cfg = cfg.model
    if shape.get("embed_dim", model_cfg.embed_dim) != model_cfg.embed_dim:  # sized by a method
        model_cfg = OmegaConf.merge(model_cfg, {"embed_dim": shape["embed_dim"]})
    backbone = build_backbone(model_cfg, shape["channels"], shape["image_size"])
    method = build_method(cfg, SimpleNamespace(num_classes=shape["num_classes"]),
                          backbone.feature_dim, device, Dist())
    net = Net(backbone, method).to(device)
    net.load_state_dict(state["net"])
    return net, cfg, shape["num_classes"]
