"""The old-model provider: a frozen old model loaded from ``compat.old_ckpt`` or trained here
from the current config (``data.classes=compat.old_classes``, ``method=compat.old_method``), and
an independently trained new model when a method asks for one.

Trained models live in a content-addressed cache keyed by the hash of their resolved config,
under a file lock, so a sweep over several methods trains each model once. Training is done by
a job-launching function the runner hands in (``launch(cfg, run_dir)``): this package never
imports the runner.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Dict, Optional

import torch
from omegaconf import OmegaConf

from ortho_run.assemble import load_run
from ortho_run.checkpoint import config_hash
from ortho_run.compat.artifacts import CompatArtifacts, FrozenNet, class_means, embed_all
from ortho_run.compat.evaluate import compat_matrix
from ortho_run.errors import ConfigError
from ortho_run.io import cache_folder

log = logging.getLogger("ortho_run")

#: keys that change where/how a run is reported, not what it learns
VOLATILE = ("logger", "output_root", "cache_dir", "tag")
OLD_SEED_OFFSET = 10_007

Launch = Callable[[object, Path], object]


def old_config(cfg, classes, method: str, overrides=(), seed_offset: int = 1,
               norm_feature: bool = False):
    """The config that trains the old (or an independent) model: the same data, model, optim
    and trainer; ``method`` composed from its yaml and schema, exactly as ``method=<name>``
    would give it on the command line."""
    from ortho_run.methods import METHODS
    from ortho_run.store import load_option, structured

    if METHODS.get(method).needs(load_option("method", method)).compat:
        raise ConfigError(f"compat.old_method={method} is itself a compatibility method; use "
                          f"a method that trains alone (ce, cosine, opl, ...)")
    base = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    base["method"] = OmegaConf.to_container(load_option("method", method), enum_to_str=True)
    if norm_feature:  # the old model of the BT²/OCA protocol
        if "norm_feature" not in base["method"]:
            raise ConfigError(f"compat.old_norm_feature=true: compat.old_method={method} has no "
                              f"norm_feature option; use compat.old_method=ce")
        base["method"]["norm_feature"] = True
    base["data"]["classes"] = classes
    # Another seed: an old model is trained at another time, from another init. With the same
    # seed the "independent" spaces would share their initialisation and partly align.
    base["seed"] = cfg.seed + OLD_SEED_OFFSET * seed_offset
    base["compat"]["old_ckpt"] = None
    base["trainer"]["resume"] = "auto"  # a crashed cache build resumes
    base["logger"]["mode"] = "disabled"  # never a W&B run of its own (nor touching the main one)
    base["tag"] = "old-model" if classes is not None else "independent-model"
    out = structured(base)
    if overrides:
        try:
            out = OmegaConf.merge(out, OmegaConf.from_dotlist(list(overrides)))
        except Exception as exc:
            raise ConfigError(f"compat.old_overrides={list(overrides)}: "
                              f"{str(exc).splitlines()[0]}") from None
    return out


def train_or_load(cfg, classes, method: str, launch: Launch, overrides=(), device=None,
                  seed_offset: int = 1, norm_feature: bool = False):
    """A trained model for (cfg with these classes and method), from the cache or trained now."""
    from filelock import FileLock

    sub = old_config(cfg, classes, method, overrides, seed_offset, norm_feature)
    key_src = {k: v for k, v in OmegaConf.to_container(sub, resolve=True, enum_to_str=True).items()
               if k not in VOLATILE}
    key_src["trainer"] = {k: v for k, v in key_src["trainer"].items()
                          if k not in ("progress", "resume", "device")}
    key = config_hash(key_src)
    root = cache_folder(cfg.cache_dir, "models")
    run_dir = root / key
    with FileLock(str(run_dir) + ".lock"):
        summary = run_dir / "summary.json"
        done = summary.is_file() and '"finished"' in summary.read_text()
        if not done:
            log.info("training the %s model (cache key %s) in %s", sub.tag, key, run_dir)
            launch(sub, run_dir)
        else:
            log.info("reusing cached %s model %s", sub.tag, run_dir)
    net, _, n_classes = load_run(run_dir, device)
    return net, sub, n_classes, run_dir


class CompatService:
    """Computes what a method's ``needs`` declared, and evaluates the compatibility matrix.

    ``loader(split, train)`` builds an evaluation loader over a split of the new task's data
    set (the runner's, so old and new models see identical batches).
    """

    def __init__(self, cfg, needs, launch: Launch, device, num_classes: Optional[int] = None):
        self.cfg, self.needs, self.launch, self.device = cfg, needs, launch, device
        c = cfg.compat
        if num_classes is not None and not c.old_ckpt:  # checked here, named as the user set it
            from ortho_run.datasets.base import resolve_classes

            resolve_classes(OmegaConf.to_container(c, resolve=True)["old_classes"], num_classes,
                            key="compat.old_classes")
        if c.old_ckpt:
            p = Path(c.old_ckpt).expanduser()
            net, old_cfg, n_old = load_run(p if p.is_dir() else p.parent.parent, device)
        else:
            net, old_cfg, n_old, _ = train_or_load(cfg, c.old_classes, c.old_method, launch,
                                                   c.old_overrides, device,
                                                   norm_feature=c.old_norm_feature)
        self.old = FrozenNet(net, old_cfg)
        self.num_old_classes = n_old
        self._old_gallery: Optional[tuple] = None

    def artifacts(self, ds, loader_for) -> CompatArtifacts:
        if self.num_old_classes > ds.num_classes:
            raise ConfigError(f"the old model knows {self.num_old_classes} classes, the new task "
                              f"only {ds.num_classes}")
        old_channels = self._channels(self.old)
        if old_channels not in (None, ds.channels):
            raise ConfigError(f"the old model was trained on {old_channels}-channel "
                              f"images, this data set has {ds.channels}: point compat.old_ckpt "
                              f"at a run on the same kind of data")
        art = CompatArtifacts(old_dim=self.old.dim, num_old_classes=self.num_old_classes)
        if self.needs.class_means:
            art.class_means, art.unit_class_means = class_means(
                self.old, loader_for(ds.train), ds.num_classes)
        if self.needs.old_head:
            art.old_head = self.old.net.method.classifier()
        return art

    @staticmethod
    def _channels(frozen: FrozenNet) -> Optional[int]:
        for m in frozen.net.backbone.modules():
            if isinstance(m, torch.nn.Conv2d):
                return m.in_channels
        return None

    def old_embed(self):
        """The function that fills ``batch.old`` (when declared)."""
        return self.old.embed if self.needs.old_embedding else None

    def independent_backbone(self) -> Dict[str, torch.Tensor]:
        """The backbone weights of an independently trained new model (cached ``ce`` on all
        classes, another seed)."""
        net, *_ = train_or_load(self.cfg, None, "ce", self.launch, (), self.device,
                                seed_offset=2)
        return net.backbone.state_dict()

    def evaluate(self, spaces: Dict[str, torch.Tensor], labels: torch.Tensor,
                 test_loader) -> Dict[str, float]:
        """The matrix from the new model's collected test embeddings and the old model's
        embeddings of the same test split (computed once)."""
        if self._old_gallery is None:
            self._old_gallery = embed_all(self.old, test_loader)
        old, old_labels = self._old_gallery
        if not torch.equal(old_labels.cpu(), labels.cpu()):
            raise RuntimeError("old and new embeddings are not of the same test images")
        return compat_matrix(spaces, old, labels)
