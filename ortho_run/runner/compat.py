"""The backward-compatibility protocol: a shared service any method may ask for.

``provide_old_model`` gives a compatibility method its frozen *old* model, either loaded from
``compat.old_ckpt`` (a run dir or a checkpoint beside its ``resolved_config.yaml``) or trained
here from the current config with ``data.classes=compat.old_classes`` and
``method=compat.old_method``. Trained models live in a content-addressed cache keyed by the
hash of that resolved config, under a file lock, so a sweep over several methods trains the old
model once. ``compat_matrix`` evaluates old/old, new/old, new/new retrieval on the test split.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict

import torch
from omegaconf import OmegaConf
from torch import nn

from ortho_run.errors import ConfigError
from ortho_run.io import cache_root
from ortho_run.runner import checkpoint as ckpt
from ortho_run.runner.build import load_run
from ortho_run.runner.retrieval import compatibility_summary, retrieval_metrics

log = logging.getLogger("ortho_run")

# Keys that change where/how a run is reported, not what it learns.
VOLATILE = ("logger", "output_root", "cache_dir", "tag")
OLD_SEED_OFFSET = 10_007


class FrozenNet(nn.Module):
    """A trained Net (backbone + head), frozen and always in eval mode."""

    def __init__(self, net: nn.Module, cfg):
        super().__init__()
        self.net = net
        self.cfg = cfg
        self.net.requires_grad_(False)
        self.net.eval()

    def train(self, mode: bool = True):  # never leaves eval mode (BN statistics stay put)
        return super().train(False)

    @torch.no_grad()
    def embed(self, x):
        feats, out = self.net(x)
        return self.net.method.embedding(out, feats).float()

    @property
    def dim(self) -> int:
        return self.net.backbone.feature_dim


class OldModel(FrozenNet):
    """The old model plus what compatibility losses need from it."""

    def __init__(self, net, cfg, class_means: torch.Tensor, unit_class_means: torch.Tensor,
                 num_old_classes: int, provider):
        super().__init__(net, cfg)
        self.register_buffer("class_means", class_means)  # C_new × d_old, raw old features
        self.register_buffer("unit_class_means", unit_class_means)  # means of unit features
        self.num_old_classes = num_old_classes
        self.provider = provider

    def old_classifier(self):
        """(W, b): the old head's rows for old classes, class means for the classes it never saw."""
        fc = getattr(self.net.method, "fc", None)
        if not isinstance(fc, nn.Linear):
            raise ConfigError("method.influence=old_head needs an old model with a linear head "
                              "(compat.old_method=ce); use method.influence=class_means")
        c_old = self.num_old_classes
        w = torch.cat([fc.weight.detach(), self.class_means[c_old:]], 0)
        b = torch.zeros(len(w), device=w.device)
        if fc.bias is not None:
            b[:c_old] = fc.bias.detach()
        return w, b


def old_config(cfg, classes, method: str, overrides=(), seed_offset: int = 1):
    """The config that trains the old (or an independent) model: same data/model/optim/trainer."""
    from ortho_run.methods import METHODS

    base = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    base["method"] = OmegaConf.to_container(OmegaConf.structured(METHODS.get(method).Config),
                                            enum_to_str=True)
    if getattr(METHODS.get(method), "needs_old_model", False):
        raise ConfigError(f"compat.old_method={method} is itself a compatibility method")
    base["data"]["classes"] = classes
    # Another seed: an old model is trained at another time, from another init. With the same
    # seed the "independent" spaces would share their initialisation and partly align.
    base["seed"] = cfg.seed + OLD_SEED_OFFSET * seed_offset
    base["compat"]["old_ckpt"] = None
    base["trainer"]["resume"] = "auto"  # a crashed cache build resumes
    base["logger"]["mode"] = "disabled"
    base["tag"] = "old-model" if classes is not None else "independent-model"
    out = OmegaConf.create(base)
    if overrides:
        out = OmegaConf.merge(out, OmegaConf.from_dotlist(list(overrides)))
    from ortho_run.config import RunConfig

    return OmegaConf.merge(OmegaConf.structured(RunConfig), out)


def train_or_load(cfg, classes, method: str, train_fn, overrides=(), device=None,
                  seed_offset: int = 1):
    """A trained model for (cfg with these classes and method), from the cache or trained now
    by ``train_fn(cfg, run_dir)`` (the runner's ``run``)."""
    from filelock import FileLock

    sub = old_config(cfg, classes, method, overrides, seed_offset)
    key_src = {k: v for k, v in OmegaConf.to_container(sub, resolve=True, enum_to_str=True).items()
               if k not in VOLATILE}
    key_src["trainer"] = {k: v for k, v in key_src["trainer"].items()
                          if k not in ("progress", "resume", "device")}
    key = ckpt.config_hash(key_src)
    root = cache_root(cfg.cache_dir) / "models"
    root.mkdir(parents=True, exist_ok=True)
    run_dir = root / key
    with FileLock(str(run_dir) + ".lock"):
        summary = run_dir / "summary.json"
        done = summary.is_file() and '"finished"' in summary.read_text()
        if not done:
            log.info("training the %s model (cache key %s) in %s", sub.tag, key, run_dir)
            train_fn(sub, run_dir)
        else:
            log.info("reusing cached %s model %s", sub.tag, run_dir)
    net, _, n_classes = load_run(run_dir, device)
    return net, sub, n_classes, run_dir


@torch.no_grad()
def class_means(frozen: FrozenNet, loader, num_classes: int):
    """Per-class means of the frozen model's features over ``loader``: (raw, of unit features).
    The second is what the BT²/OCA code uses (their old features are L2-normalised)."""
    sums = unit_sums = None
    counts = torch.zeros(num_classes)
    for x, y in loader:
        e = frozen.embed(x)
        if sums is None:
            sums = torch.zeros(num_classes, e.shape[1], device=e.device)
            unit_sums = torch.zeros_like(sums)
        sums.index_add_(0, y, e)
        unit_sums.index_add_(0, y, torch.nn.functional.normalize(e, dim=1))
        counts += torch.bincount(y.cpu(), minlength=num_classes).float()
    n = counts.clamp_min(1).to(sums.device)[:, None]
    return sums / n, unit_sums / n


def provide_old_model(cfg, ds, device, train_fn) -> OldModel:
    from ortho_run.datasets.loaders import build_loader, choose_pipeline

    c = cfg.compat
    if c.old_ckpt:
        p = Path(c.old_ckpt).expanduser()
        net, old_cfg, n_old = load_run(p if p.is_dir() else p.parent.parent, device)
    else:
        net, old_cfg, n_old, _ = train_or_load(cfg, c.old_classes, c.old_method, train_fn,
                                               c.old_overrides, device)
    if n_old > ds.num_classes:
        raise ConfigError(f"the old model knows {n_old} classes, the new task only "
                          f"{ds.num_classes}")
    frozen = FrozenNet(net, old_cfg)
    pipeline = choose_pipeline(str(cfg.data.pipeline), ds, device)
    loader = build_loader(ds, ds.train, cfg.data, device, False, cfg.seed, pipeline)
    means, unit_means = class_means(frozen, loader, ds.num_classes)

    def provider(classes, method="ce"):
        """Another frozen model on the same protocol (e.g. an independently trained new one)."""
        n, *_ = train_or_load(cfg, classes, method, train_fn, (), device, seed_offset=2)
        return FrozenNet(n, cfg)

    return OldModel(net, old_cfg, means, unit_means, n_old, provider)


@torch.no_grad()
def compat_matrix(trainer, old: OldModel, test_loader) -> Dict[str, float]:
    """Retrieval matrix on the test split (query = gallery, self excluded) and the ECC verdict."""
    net = trainer.net
    net.eval()
    spaces: Dict[str, list] = {}
    old_e, labels = [], []
    for x, y in test_loader:
        with trainer.autocast():
            feats, out = net(x)
        emb = {"new": net.method.embedding(out, feats)}
        emb.update(net.method.extra_embeddings(out, feats))
        for k, v in emb.items():
            spaces.setdefault(k, []).append(v.float())
        old_e.append(old.embed(x))
        labels.append(y)
    old_e, labels = torch.cat(old_e), torch.cat(labels)
    matrix = {"old_old": retrieval_metrics(old_e, old_e, labels)}
    for name, chunks in spaces.items():
        e = torch.cat(chunks)
        matrix[f"{name}_old"] = retrieval_metrics(e, old_e, labels)
        matrix[f"{name}_{name}"] = retrieval_metrics(e, e, labels)
    out = {f"compat/{pair}/{m}": v for pair, ms in matrix.items() for m, v in ms.items()}
    out.update({f"compat/{k}": v for k, v in compatibility_summary(matrix).items()})
    return out
