"""``model=timm``: any timm backbone by name (``model.arch``), as pooled features.

The backbone is ``timm.create_model(arch, num_classes=0)`` (pooled features; the method owns the
head, as for every model) with the data set's channel count and, for models that take one
(ViT, Swin, ...), its image size. Weights:

- ``model.pretrained=true``: timm's pretrained weights (from its hub cache or the network);
- ``model.checkpoint=FILE``: a local state dict (``.pth``/``.pt`` or ``.safetensors``; a timm
  checkpoint with a ``state_dict`` key works too) for machines without network. Classifier keys
  are dropped (the method owns the head); every other key must fit.

When pretrained (or from a checkpoint), the input normalisation comes from the model's pretrained
config (timm's data config) instead of the data set's statistics, and image-folder data is read
at the model's input size; both are recorded in ``summary.json`` (``model_data_config``).
Needs the ``timm`` package: ``pip install 'ortho-run[timm]'``.
"""

from __future__ import annotations

import difflib
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from ortho_run.config import ModelConfig
from ortho_run.errors import CheckpointError, ConfigError, described, first_line
from ortho_run.models.registry import MODELS


@dataclass
class TimmConfig(ModelConfig):
    name: str = "timm"
    arch: str = "resnet18"  # any name timm.list_models() knows
    pretrained: bool = False
    checkpoint: Optional[str] = None  # a local weights file (state dict)


def require_timm():
    try:
        import timm
    except ImportError:
        raise ConfigError("model=timm needs the timm package: pip install 'ortho-run[timm]' "
                          "(or pip install timm)") from None
    return timm


def _create(timm, arch: str, pretrained: bool, in_channels: int, image_size: int):
    kw = dict(pretrained=pretrained, num_classes=0, in_chans=in_channels)
    entry = timm.models.get_model_entrypoint(arch) if hasattr(timm.models, "get_model_entrypoint") else None
    try:
        takes_size = entry is not None and "img_size" in inspect.signature(entry).parameters
    except (TypeError, ValueError):
        takes_size = False
    try:
        return timm.create_model(arch, **kw, img_size=image_size)
    except TypeError:
        if takes_size:
            raise
        return timm.create_model(arch, **kw)


@MODELS.register("timm", schema=TimmConfig)
def timm_backbone(cfg, in_channels: int, image_size: int):
    timm = require_timm()
    arch = str(cfg.arch)
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=5)
        raise ConfigError(f"model.arch={arch} is not a timm model"
                          + (f"; close names: {', '.join(close)}" if close else "")
                          + ". timm.list_models('*pattern*') lists them.")
    pretrained = bool(cfg.pretrained) and not cfg.checkpoint
    try:
        model = _create(timm, arch, pretrained, in_channels, image_size)
    except (OSError, RuntimeError, ValueError) as exc:
        if not pretrained:
            raise ConfigError(f"model=timm arch={arch}: {first_line(exc)}") from None
        raise ConfigError(
            f"model.pretrained=true: the pretrained weights of {arch} could not be loaded "
            f"({described(exc)}). Without network, put "
            f"them in timm's (Hugging Face hub) cache, or save a state dict and set "
            f"model.checkpoint=FILE (with model.pretrained=false or true).") from None
    if cfg.checkpoint:
        load_weights(model, Path(cfg.checkpoint).expanduser())
    if pretrained or cfg.checkpoint:
        model.ortho_data_config = _data_config(timm, model)
    return model, int(model.num_features)


def _data_config(timm, model) -> dict:
    dc = timm.data.resolve_data_config({}, model=model)
    return {"mean": list(dc["mean"]), "std": list(dc["std"]),
            "input_size": list(dc["input_size"]), "interpolation": dc.get("interpolation"),
            "crop_pct": dc.get("crop_pct")}


def timm_data_config(cfg, in_channels: int, image_size: int):
    """What a pretrained (or checkpoint-loaded) timm backbone's data config says, read from the
    architecture's pretrained config on a model built without memory (the meta device)."""
    if not (cfg.pretrained or cfg.checkpoint):
        return None
    timm = require_timm()
    arch = str(cfg.arch)
    if not timm.is_model(arch):
        return None  # the build names the error
    with torch.device("meta"):
        model = _create(timm, arch, False, in_channels, image_size)
    return _data_config(timm, model)


timm_backbone.data_config = timm_data_config


def model_arch(model) -> str:
    return str(getattr(model, "default_cfg", {}).get("architecture")
               or getattr(model, "pretrained_cfg", {}).get("architecture")
               or type(model).__name__)


def load_weights(model: torch.nn.Module, path: Path) -> None:
    """A local state dict into ``model`` (classifier keys dropped; every other key must fit)."""
    if not path.is_file():
        raise CheckpointError(f"model.checkpoint={path}: no such file; give a local weights "
                              f"file (a state dict saved with torch.save or safetensors)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"model.checkpoint={path} cannot be read ("
                              f"{described(exc)})") from None
    if isinstance(state, dict):
        for key in ("state_dict", "model", "state_dict_ema"):
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict):
        raise CheckpointError(f"model.checkpoint={path} holds no state dict")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    own = model.state_dict()
    dropped = [k for k in state if k not in own and k.split(".")[0] in ("fc", "head", "classifier")]
    state = {k: v for k, v in state.items() if k not in dropped}
    if not all(hasattr(v, "shape") for v in state.values()):
        raise CheckpointError(f"model.checkpoint={path} holds values that are not tensors: it is "
                              f"no state dict of weights")
    wrong = [(k, tuple(v.shape), tuple(own[k].shape)) for k, v in state.items()
             if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if wrong:
        first_conv = next((k for k, p in own.items() if p.ndim == 4), None)
        hint = ""
        if first_conv and any(k == first_conv and a[1] != b[1] for k, a, b in wrong):
            shape = dict((k, a) for k, a, _ in wrong)[first_conv]
            hint = (f" Its first convolution takes {shape[1]}-channel images, this data set "
                    f"has {own[first_conv].shape[1]}: use data with that many channels, or "
                    f"weights made for these.")
        shown = "; ".join(f"{k}: file {a}, model {b}" for k, a, b in wrong[:4])
        raise CheckpointError(f"model.checkpoint={path} does not fit model.arch={model_arch(model)}:"
                              f" {len(wrong)} weights have other shapes ({shown}"
                              f"{'; ...' if len(wrong) > 4 else ''}). The file belongs to another "
                              f"architecture or input.{hint}")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"model.checkpoint={path} does not fit model.arch={model_arch(model)}: missing "
                              f"{missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected "
                              f"{unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
