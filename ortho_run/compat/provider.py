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
from typing import Callable, Dict, List, NamedTuple, Optional

import torch
from omegaconf import OmegaConf

from ortho_run.assemble import load_run
from ortho_run.checkpoint import config_hash
from ortho_run.compat.artifacts import FrozenNet, class_means, embed_all
from ortho_run.compat.evaluate import compat_matrix, multistep_matrix
from ortho_run.datasets.base import resolve_classes
from ortho_run.errors import ConfigError
from ortho_run.io import cache_folder
from ortho_run.methods.base import CompatArtifacts

log = logging.getLogger("ortho_run")

#: keys that change where/how a run is reported, not what it learns
VOLATILE = ("logger", "output_root", "cache_dir", "tag")
OLD_SEED_OFFSET = 10_007
STEP_SEED_OFFSET = 3  # the seed offsets: old model 1, independent model 2, earlier step 3

Launch = Callable[[object, Path], object]


def old_config(cfg, classes, method: str, overrides=(), seed_offset: int = 1,
               norm_feature: bool = False, fraction: Optional[float] = None):
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
    if fraction is not None:  # the first step of a data-incremental update
        base["data"]["train_fraction"] = fraction
    # Another seed: an old model is trained at another time, from another init. With the same
    # seed the "independent" spaces would share their initialisation and partly align.
    base["seed"] = cfg.seed + OLD_SEED_OFFSET * seed_offset
    base["compat"]["old_ckpt"] = None
    base["compat"]["steps"] = None  # a model of one step, trained alone
    base["trainer"]["resume"] = "auto"  # a crashed cache build resumes
    base["logger"]["mode"] = "disabled"  # never a W&B run of its own (nor touching the main one)
    base["tag"] = "old-model" if seed_offset == 1 else "independent-model"
    out = structured(base)
    if overrides:
        try:
            out = OmegaConf.merge(out, OmegaConf.from_dotlist(list(overrides)))
        except Exception as exc:
            raise ConfigError(f"compat.old_overrides={list(overrides)}: "
                              f"{str(exc).splitlines()[0]}") from None
    return out


def cached_run(sub, launch: Launch, device=None):
    """The trained model of config ``sub``, from the cache or trained now (under a file lock,
    so concurrent sweep jobs train it once): (net, config, number of classes, run dir)."""
    from filelock import FileLock

    key_src = {k: v for k, v in OmegaConf.to_container(sub, resolve=True, enum_to_str=True).items()
               if k not in VOLATILE}
    key_src["trainer"] = {k: v for k, v in key_src["trainer"].items()
                          if k not in ("progress", "resume", "device")}
    key = config_hash(key_src)
    root = cache_folder(sub.cache_dir, "models")
    run_dir = root / key
    with FileLock(str(run_dir) + ".lock"):
        summary = run_dir / "summary.json"
        done = summary.is_file() and '"finished"' in summary.read_text()
        if not done:
            log.info("training the %s (cache key %s) in %s", sub.tag.replace("-", " "), key,
                     run_dir)
            launch(sub, run_dir)
        else:
            log.info("reusing the cached %s %s", sub.tag.replace("-", " "), run_dir)
    net, _, n_classes = load_run(run_dir, device)
    return net, sub, n_classes, run_dir


def train_or_load(cfg, classes, method: str, launch: Launch, overrides=(), device=None,
                  seed_offset: int = 1, norm_feature: bool = False):
    """A trained model for (cfg with these classes and method), from the cache or trained now."""
    return cached_run(old_config(cfg, classes, method, overrides, seed_offset, norm_feature),
                      launch, device)


class Step(NamedTuple):
    """One step of a multi-step update: its class ids (of the source data set) and the share of
    their training images it trains on."""

    classes: List[int]
    fraction: float

    def as_config(self) -> dict:
        return {"classes": self.classes, "fraction": self.fraction}


def resolve_steps(cfg, source_classes: int) -> Optional[List[Step]]:
    """``compat.steps`` resolved and checked: at least two steps; each one's classes the first
    ids of the next one's (so a class keeps its label across steps) and its fraction at most
    the next one's, the next one adding classes or data; the last one the run's own data
    (``data.classes``, ``data.train_fraction``). An entry is a class set, a fraction, or
    ``{classes: ..., fraction: ...}``; what it leaves out is the run's own."""
    spec = OmegaConf.to_container(cfg.compat, resolve=True)["steps"]
    if spec is None:
        return None
    data = OmegaConf.to_container(cfg.data, resolve=True)
    everything = list(range(source_classes))
    own = Step(resolve_classes(data["classes"], source_classes) or everything,
               float(data["train_fraction"]))
    steps = []
    for i, entry in enumerate(spec):
        key = f"compat.steps[{i}]"
        if isinstance(entry, bool):
            raise ConfigError(f"{key}={entry!r}: use a class set, a fraction in (0, 1] or "
                              f"{{classes: ..., fraction: ...}}")
        if isinstance(entry, (int, float)):
            entry = {"fraction": entry}
        elif not isinstance(entry, dict):
            entry = {"classes": entry}
        unknown = set(entry) - {"classes", "fraction"}
        if unknown:
            raise ConfigError(f"{key}: unknown keys {sorted(unknown)}; a step has classes "
                              f"and fraction")
        classes = (resolve_classes(entry["classes"], source_classes, key=f"{key}.classes")
                   or everything) if "classes" in entry else own.classes
        fraction = float(entry.get("fraction", own.fraction))
        if not 0 < fraction <= 1:
            raise ConfigError(f"{key}: fraction {fraction} must be in (0, 1]")
        steps.append(Step(classes, fraction))
    if len(steps) < 2:
        raise ConfigError(f"compat.steps={spec}: a multi-step update needs at least two steps "
                          f"(the first model's and this run's)")
    for i in range(1, len(steps)):
        prev, cur = steps[i - 1], steps[i]
        if cur.classes[: len(prev.classes)] != prev.classes or cur.fraction < prev.fraction \
                or (cur.classes == prev.classes and cur.fraction == prev.fraction):
            raise ConfigError(f"compat.steps[{i}]={spec[i]!r} must contain step {i - 1}'s "
                              f"classes as its first ids and at least its fraction of the "
                              f"data, and add classes after them or data (the class- or "
                              f"data-incremental protocol), e.g. [first_half, all] or "
                              f"[0.5, 1.0]")
    if steps[-1] != own:
        raise ConfigError(f"compat.steps[-1]={spec[-1]!r} must be this run's own data "
                          f"(data.classes={data['classes']}, data.train_fraction="
                          f"{data['train_fraction']}): the run is the last step")
    return steps


def previous_model(cfg, source_classes: int):
    """What the run with ``cfg`` is made compatible with: a config to train (or find in the
    cache), or the path of ``compat.old_ckpt``. With ``compat.steps``, step T-2's model, trained
    with this run's method against step T-3's (one cache entry per step and method); the first
    step is the ``compat.old_method`` model."""
    c = cfg.compat
    steps = resolve_steps(cfg, source_classes)
    if steps is not None and len(steps) > 2:
        base = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
        base["data"].update(classes=steps[-2].classes, train_fraction=steps[-2].fraction)
        base["compat"]["steps"] = [s.as_config() for s in steps[:-1]]
        base["compat"]["evaluate"] = False  # the last step evaluates every pair
        base["seed"] = cfg.seed + OLD_SEED_OFFSET * STEP_SEED_OFFSET
        base["trainer"]["resume"] = "auto"
        base["logger"]["mode"] = "disabled"
        base["tag"] = f"step-{len(steps) - 2}-model"
        from ortho_run.store import structured

        return structured(base)
    if c.old_ckpt:
        return Path(c.old_ckpt).expanduser()
    if steps is None:
        return old_config(cfg, c.old_classes, c.old_method, c.old_overrides,
                          norm_feature=c.old_norm_feature)
    return old_config(cfg, steps[0].classes, c.old_method, c.old_overrides,
                      norm_feature=c.old_norm_feature, fraction=steps[0].fraction)


def model_chain(cfg, source_classes: int) -> list:
    """The models of every earlier step of ``cfg``'s update, oldest first (configs or paths)."""
    chain, current = [], cfg
    while True:
        prev = previous_model(current, source_classes)
        chain.insert(0, prev)
        if isinstance(prev, Path) or resolve_steps(prev, source_classes) is None:
            return chain
        current = prev


def load_model(source, launch: Launch, device):
    """(net, config, number of classes) of a ``previous_model`` result."""
    if isinstance(source, Path):
        net, cfg, n = load_run(source if source.is_dir() else source.parent.parent, device)
        return net, cfg, n
    net, cfg, n, _ = cached_run(source, launch, device)
    return net, cfg, n


class CompatService:
    """Computes what a method's ``needs`` declared, and evaluates the compatibility matrix
    (and, for a multi-step update, the matrix of every step against every earlier one).

    ``loader(split, train)`` builds an evaluation loader over a split of the new task's data
    set (the runner's, so old and new models see identical batches).
    """

    def __init__(self, cfg, needs, launch: Launch, device, source_classes: Optional[int] = None):
        self.cfg, self.needs, self.launch, self.device = cfg, needs, launch, device
        c = cfg.compat
        self.source_classes = source_classes
        self.steps = None
        if source_classes is not None:  # checked here, named as the user set it
            self.steps = resolve_steps(cfg, source_classes)
            if not c.old_ckpt and self.steps is None:
                resolve_classes(OmegaConf.to_container(c, resolve=True)["old_classes"],
                                source_classes, key="compat.old_classes")
        # without the data set's class count (a caller that only wants the old model), a
        # one-step config needs none: its old_classes are resolved by the old model's run
        source = previous_model(cfg, source_classes or 0)
        net, old_cfg, n_old = load_model(source, launch, device)
        if self.steps is not None and n_old != len(self.steps[-2].classes):
            raise ConfigError(f"the previous step's model knows {n_old} classes, compat.steps"
                              f"[-2] has {len(self.steps[-2].classes)}: point compat.old_ckpt "
                              f"at a run on compat.steps[0]'s classes")
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

    def frozen_embeddings(self) -> Dict[str, Callable]:
        """The ``Batch`` fields a method declared, each filled by a frozen model's embedding."""
        out = {}
        if self.needs.old_embedding:
            out["old"] = self.old.embed
        if self.needs.independent_embedding:
            out["independent"] = FrozenNet(self._independent()[0], None).embed
        return out

    def _independent(self):
        """An independently trained new model: ``ce`` on this run's classes, another seed,
        cached (one per step of a multi-step update, shared by every method)."""
        return train_or_load(self.cfg, OmegaConf.to_container(self.cfg.data, resolve=True)[
            "classes"], "ce", self.launch, (), self.device, seed_offset=2)

    def independent_backbone(self) -> Dict[str, torch.Tensor]:
        """The backbone weights of the independently trained new model."""
        return self._independent()[0].backbone.state_dict()

    def evaluate(self, spaces: Dict[str, torch.Tensor], labels: torch.Tensor,
                 test_loader) -> Dict[str, object]:
        """The matrix from the new model's collected test embeddings and the old model's
        embeddings of the same test split (computed once); for a multi-step update, also the
        T×T matrices of every step's model (query) against every earlier step's (gallery)."""
        if self._old_gallery is None:
            self._old_gallery = embed_all(self.old, test_loader)
        old, old_labels = self._old_gallery
        if not torch.equal(old_labels.cpu(), labels.cpu()):
            raise RuntimeError("old and new embeddings are not of the same test images")
        out: Dict[str, object] = dict(compat_matrix(spaces, old, labels))
        if self.steps is not None:
            chain = model_chain(self.cfg, self.source_classes)
            step_embs = [embed_all(FrozenNet(load_model(src, self.launch, self.device)[0],
                                             None), test_loader)[0]
                         for src in chain[:-1]]
            step_embs += [old, spaces["new"]]
            t = len(step_embs)  # the last update's three pairs are in ``out`` already
            pairs = {(t - 1, t - 2): "new_old", (t - 2, t - 2): "old_old",
                     (t - 1, t - 1): "new_new"}
            known = {ik: {m: out[f"compat/{p}/{m}"] for m in ("cmc1", "map")}
                     for ik, p in pairs.items()}
            out.update(multistep_matrix(step_embs, labels, [len(s.classes) for s in self.steps],
                                        [s.fraction for s in self.steps], known))
        return out
