"""Assembling a network from a config: backbone + method head, and a finished run's net.

Shared by the runner (which trains it) and the compatibility service (which loads old models);
it imports neither of them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from ortho_run.checkpoint import load as load_checkpoint
from ortho_run.errors import CheckpointError, ConfigError, described, first_line
from ortho_run.methods import METHODS, Batch, MethodContext, MethodOutput
from ortho_run.methods.base import CompatArtifacts, CompatShape
from ortho_run.models import Backbone, build_backbone
from ortho_run.regularizers import build_regularizer


@dataclass(frozen=True)
class NetSpec:
    """What a net is built for, and what its checkpoint records to rebuild it without the data
    set or the old model: the images' channels and size, the classes, the backbone's output dim
    when a method or ``model.embed_dim`` sets it, and a compatibility method's ``CompatShape``."""

    channels: int
    image_size: int
    num_classes: int
    embed_dim: Optional[int] = None
    compat: Optional[CompatShape] = None

    def with_compat(self, compat: CompatShape, embed_dim: Optional[int]) -> "NetSpec":
        return replace(self, compat=compat,
                       embed_dim=self.embed_dim if embed_dim is None else embed_dim)

    def to_dict(self) -> dict:
        d = asdict(self)
        if d["compat"] is None:
            del d["compat"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "NetSpec":
        compat = d.get("compat")
        return cls(channels=d["channels"], image_size=d["image_size"],
                   num_classes=d["num_classes"], embed_dim=d.get("embed_dim"),
                   compat=CompatShape(**compat) if compat else None)


class Net(nn.Module):
    """backbone → features → method head: one module, so DDP and checkpoints see it whole.

    ``frozen`` maps a ``Batch`` field (``old``, ``independent``) to a frozen model's embedding
    function, for methods that declared it in ``needs``; those models belong to other runs, so
    they are kept out of this net's parameters and state dict.
    """

    def __init__(self, backbone: nn.Module, method: nn.Module,
                 frozen: Optional[Dict[str, Callable]] = None):
        super().__init__()
        self.backbone = backbone
        self.method = method
        self._frozen = tuple((frozen or {}).items())  # not submodules

    def forward(self, x, y=None) -> Tuple[Batch, MethodOutput]:
        batch = Batch(inputs=x, targets=y, features=self.backbone(x))
        for field_name, embed in self._frozen:
            setattr(batch, field_name, embed(x))
        return batch, self.method(batch)


def check_one_image_batches(backbone: nn.Module, spec: NetSpec, model: str,
                            batch_size: int) -> None:
    """Training batches of one image: refused where a batch norm of ``backbone`` (still on
    the CPU) would see a single value per channel (torch cannot train on it), found by one
    forward pass of a copy (the backbone's own state and the random streams are untouched)."""
    import copy

    probe = copy.deepcopy(backbone).train()
    x = torch.zeros(1, spec.channels, spec.image_size, spec.image_size)
    with torch.random.fork_rng(devices=[]):
        try:
            probe(x)
        except ValueError as exc:
            if "more than 1 value per channel" not in str(exc):
                raise
            raise ConfigError(
                f"a training batch holds a single image (data.batch_size={batch_size}, or fewer "
                f"training images than that), and model={model} normalises by batch where one "
                f"image leaves one value per channel: use data.batch_size >= 2 and at least 2 "
                f"training images per rank") from None


def check_input_shape(backbone: Backbone, spec: NetSpec, model: str, data: str) -> None:
    """Refuse a backbone that cannot take the data's images (a net whose pooling needs larger
    ones, a stem for other channels) or that gives features of another width than it declares,
    before any work: one forward pass of one zero image in eval mode without gradients (still on
    the CPU), which changes neither the backbone's state nor the random streams."""
    shape = (spec.channels, spec.image_size, spec.image_size)
    was_training = backbone.training
    backbone.eval()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            out = backbone(torch.zeros(1, *shape))
    except (RuntimeError, ValueError) as exc:
        raise ConfigError(
            f"model={model} cannot take the images of data={data} "
            f"({' x '.join(map(str, shape))}: channels x height x width): "
            f"{first_line(exc)}. Choose a model "
            f"made for {spec.image_size} x {spec.image_size} images, or data whose images it "
            f"takes") from None
    finally:
        backbone.train(was_training)
    if tuple(out.shape) != (1, backbone.feature_dim):
        raise ConfigError(f"model={model} gives features of shape {tuple(out.shape[1:])} for one "
                          f"image of data={data}, but declares feature_dim={backbone.feature_dim}: "
                          f"the model plugin must return [batch, feature_dim]")


def build_method(cfg, num_classes: int, feature_dim: int, device, distributed: bool = False,
                 compat=None):
    ctx = MethodContext(feature_dim=feature_dim, num_classes=num_classes, device=device,
                        label_smoothing=cfg.trainer.label_smoothing, cache_dir=cfg.cache_dir,
                        seed=cfg.seed, artifacts=compat, distributed=distributed)
    return METHODS.get(cfg.method.name)(cfg.method, ctx)


def build_net(cfg, spec: NetSpec, device, distributed: bool = False, compat=None,
              frozen: Optional[Dict[str, Callable]] = None,
              backbone_state: Optional[Dict[str, torch.Tensor]] = None,
              smallest_batch: Optional[int] = None) -> Net:
    """The net for ``cfg`` on data of ``spec``. Model weights are initialised from ``cfg.seed``;
    with ``backbone_state`` (an independently trained backbone) the backbone then takes those
    weights and is frozen. A backbone that cannot take the data's images, or cannot train on
    batches of ``smallest_batch`` images (one, with batch norm over a single value), is
    refused."""
    model_cfg = cfg.model
    if spec.embed_dim != model_cfg.embed_dim:
        model_cfg = OmegaConf.merge(model_cfg, {"embed_dim": spec.embed_dim})
    torch.manual_seed(cfg.seed)  # model init does not depend on the data set's RNG use
    backbone = build_backbone(model_cfg, spec.channels, spec.image_size)
    check_input_shape(backbone, spec, str(cfg.model.name), str(cfg.data.name))
    if smallest_batch == 1:
        check_one_image_batches(backbone, spec, str(cfg.model.name), int(cfg.data.batch_size))
    method = build_method(cfg, spec.num_classes, backbone.feature_dim, device, distributed,
                          compat)
    net = Net(backbone, method, frozen).to(device)
    if backbone_state is not None:
        net.backbone.load_state_dict(backbone_state)
        net.backbone.requires_grad_(False)
    return net


def run_files(source: Path) -> Tuple[Path, Path]:
    """(checkpoint, resolved config) of ``source``: a run dir (its ``checkpoints/last.pt``) or a
    checkpoint file in a run dir's ``checkpoints/`` (``best.pt``, say)."""
    source = Path(source).expanduser()
    if source.is_file():
        return source, source.parent.parent / "resolved_config.yaml"
    return source / "checkpoints" / "last.pt", source / "resolved_config.yaml"


def load_run(source: Path, device):
    """The trained Net of a finished run (a run dir, or one of its checkpoint files), its
    config and its number of classes.

    The checkpoint records the data shape the net was built for, so the data set itself is
    not loaded (checkpoints from before that record fall back to loading it)."""
    from ortho_run.datasets import load_dataset

    f, conf = run_files(source)
    run_dir = conf.parent
    if not f.is_file() or not conf.is_file():
        raise CheckpointError(f"{source}: expected a run dir holding checkpoints/last.pt and "
                              f"resolved_config.yaml, or a checkpoint file in a run dir's "
                              f"checkpoints/ folder" + ("" if Path(source).expanduser().exists()
                                                        else " (it does not exist)"))
    from ortho_run.store import structured

    try:
        saved = OmegaConf.load(conf)
    except Exception as exc:  # yaml's errors, a file that is no text
        raise CheckpointError(f"{conf} is not a readable yaml file ("
                              f"{described(exc)}): the run's config "
                              f"is damaged, so its net cannot be rebuilt") from None
    if not isinstance(saved, DictConfig):
        raise CheckpointError(f"{conf} holds a list, not a run config: the run's config is "
                              f"damaged, so its net cannot be rebuilt")
    cfg = structured(saved, source=str(conf))
    state = load_checkpoint(f, map_location=device)
    if state.get("shape"):
        spec = NetSpec.from_dict(state["shape"])
    else:  # a checkpoint from before the net spec was recorded
        ds = load_dataset(cfg.data)
        spec = NetSpec(ds.channels, ds.image_size, ds.num_classes, cfg.model.embed_dim)
    compat = None
    if spec.compat is not None:  # a compatibility method's net: built without its old model
        compat = CompatArtifacts.placeholder(spec.compat, spec.num_classes)
    elif METHODS.get(cfg.method.name).needs(cfg.method).any:
        raise CheckpointError(f"{f} is a method={cfg.method.name} checkpoint without the record of "
                              f"the old model it was trained against (its net spec has no "
                              f"compat entry), so its net cannot be rebuilt: it was written by "
                              f"another run or version. Delete {run_dir} if it is a cache entry "
                              f"(it is trained again), or point compat.old_ckpt at a run dir "
                              f"that holds a complete checkpoint.")
    net = build_net(cfg, spec, device, compat=compat)
    # a regulariser that reparametrises layers (regularizer=orthogonal) gives the net the
    # structure its weights were saved with, as in the run
    build_regularizer(cfg.regularizer, net.backbone)
    try:
        net.load_state_dict(state["net"])
    except RuntimeError as exc:
        raise CheckpointError(f"{f} does not fit the model its resolved_config.yaml describes: "
                              f"{first_line(exc)}") from None
    return net, cfg, spec.num_classes
