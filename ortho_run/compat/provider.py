"""The old-model provider: a frozen old model loaded from ``compat.old_ckpt`` or trained here
from the current config (``data.classes=compat.old_classes``, ``method=compat.old_method``), and
an independently trained new model when a method asks for one.

Trained models live in a content-addressed cache keyed by the hash of their resolved config,
under a file lock, so a sweep over several methods trains each model once. Training is done by
a job-launching function the runner hands in (``launch(cfg, run_dir)``): this package never
imports the runner.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from pathlib import Path
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

import torch
from omegaconf import OmegaConf

from ortho_run.assemble import load_run, run_files
from ortho_run.checkpoint import config_hash
from ortho_run.compat.artifacts import FrozenNet, class_means, embed_all
from ortho_run.compat.evaluate import compat_matrix, multistep_matrix
from ortho_run.datasets.base import resolve_classes
from ortho_run.errors import CheckpointError, ConfigError, first_line
from ortho_run.io import cache_folder
from ortho_run import keys
from ortho_run.methods.base import CompatArtifacts
from ortho_run.parallel import barrier, broadcast, is_main
from ortho_run.roles import INDEPENDENT, OLD, STEP, ModelRole

log = logging.getLogger("ortho_run")


def learned_part(container: dict, prefix: str = "") -> dict:
    """The keys of a run config that change what it learns (``store.effect_of``): what a
    cached model's key is made of."""
    from ortho_run.config import LEARNED
    from ortho_run.store import effect_of

    out = {}
    for k, v in container.items():
        key = prefix + str(k)
        if effect_of(key) != LEARNED:
            continue
        out[k] = learned_part(v, key + ".") if isinstance(v, dict) else v
    return out


Launch = Callable[[object, Path], object]


def derived_config(cfg, role: ModelRole, classes, fraction: Optional[float] = None,
                   step: Optional[int] = None, edit: Optional[Callable[[dict], None]] = None):
    """The config of a model that ``cfg``'s run trains besides its own (``roles``): the same
    data, model, optim and trainer on ``classes`` (and ``fraction`` of their training data), the
    role's seed and tag, resumable in its cache folder and without a W&B run of its own; ``edit``
    changes the plain config before it is typed (a method, the steps)."""
    from ortho_run.store import structured

    base = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    base["data"]["classes"] = classes
    if fraction is not None:
        base["data"]["train_fraction"] = fraction
    base["seed"] = role.seed(cfg.seed)
    base["trainer"]["resume"] = "auto"  # a crashed cache build resumes
    base["logger"]["mode"] = "disabled"  # never a W&B run of its own (nor touching the main one)
    base["tag"] = role.tag(step)
    if edit is not None:
        edit(base)
    return structured(base)


def old_config(cfg, classes, method: str, overrides=(), role: ModelRole = OLD,
               norm_feature: bool = False, fraction: Optional[float] = None):
    """The config that trains the old (or an independent) model: ``derived_config`` with
    ``method`` composed from its yaml and schema, exactly as ``method=<name>`` would give it on
    the command line, as a model of one step, plus ``overrides`` (a dotlist)."""
    from ortho_run.methods import METHODS
    from ortho_run.store import load_option

    if METHODS.get(method).needs(load_option("method", method)).any:
        raise ConfigError(f"compat.old_method={method} is itself a compatibility method; use "
                          f"a method that trains alone (ce, cosine, opl, ...)")

    def edit(base):
        base["method"] = OmegaConf.to_container(load_option("method", method), enum_to_str=True)
        if norm_feature:  # the old model of the BT²/OCA protocol
            if "norm_feature" not in base["method"]:
                raise ConfigError(f"compat.old_norm_feature=true: compat.old_method={method} has "
                                  f"no norm_feature option; use compat.old_method=ce")
            base["method"]["norm_feature"] = True
        base["compat"]["old_ckpt"] = None
        base["compat"]["steps"] = None

    out = derived_config(cfg, role, classes, fraction, edit=edit)
    if overrides:
        try:
            out = OmegaConf.merge(out, OmegaConf.from_dotlist(list(overrides)))
        except Exception as exc:
            raise ConfigError(f"compat.old_overrides={list(overrides)}: "
                              f"{first_line(exc)}") from None
    return out


def independent_config(cfg):
    """The config of the independently trained new model: ``ce`` on this run's classes, the
    independent role's seed (one cache entry per step of a multi-step update, shared by every
    method)."""
    return old_config(cfg, OmegaConf.to_container(cfg.data, resolve=True)["classes"], "ce",
                      role=INDEPENDENT)


def model_key(sub) -> str:
    """A trained model's cache key: the hash of what its config learns."""
    return config_hash(learned_part(OmegaConf.to_container(sub, resolve=True, enum_to_str=True)))


def cached_run(sub, launch: Launch, device=None):
    """The trained model of config ``sub``, from the cache or trained now (under a file lock,
    so concurrent sweep jobs train it once): (net, config, number of classes, run dir). With
    several ranks, rank 0 looks in the cache under the lock, and every rank trains a missing
    model together (data-parallel, as the run that needs it trains) before all read it."""
    from filelock import FileLock

    key = model_key(sub)
    root = cache_folder(sub.cache_dir, "models")
    run_dir = root / key
    what = sub.tag.replace("-", " ")
    main = is_main()
    with FileLock(str(run_dir) + ".lock") if main else contextlib.nullcontext():
        found = _cached(run_dir, what, device) if main else None
        if broadcast(found is not None):
            found = found or load_run(run_dir, device)  # another rank: what rank 0 has read
        else:
            log.info("training the %s (cache key %s) in %s", what, key, run_dir)
            launch(sub, run_dir)
            barrier()  # rank 0 has written it
            found = load_run(run_dir, device)
        barrier()  # every rank has read it before another job may touch it
    net, _, n_classes = found
    return net, sub, n_classes, run_dir


def _cached(run_dir: Path, what: str, device):
    """The finished model in cache folder ``run_dir`` (``load_run``'s), or None: none there,
    one not finished, or one that cannot be read (set aside)."""
    summary, _ = keys.read_summary(run_dir / "summary.json")
    if not (summary and summary.get("status") == "finished"):
        return None
    try:
        found = load_run(run_dir, device)
        log.info("reusing the cached %s %s", what, run_dir)
        return found
    except (CheckpointError, ConfigError) as exc:
        # a cache entry is derived data: one that cannot be read (a damaged file, one written
        # by another version) is set aside, not a reason to stop the run
        aside = run_dir.with_name(f"{run_dir.name}.damaged")
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(run_dir, aside)
        log.warning("the cached %s in %s cannot be used (%s): moved to %s, training it again",
                    what, run_dir, exc, aside)
        return None


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


def previous_model(cfg, source_classes: int, steps: Optional[List[Step]] = None):
    """What the run with ``cfg`` is made compatible with: a config to train (or find in the
    cache), or the path of ``compat.old_ckpt``. With ``compat.steps`` (``steps``: already
    resolved), step T-2's model, trained with this run's method against step T-3's (one cache
    entry per step and method); the first step is the ``compat.old_method`` model."""
    c = cfg.compat
    if steps is None:
        steps = resolve_steps(cfg, source_classes)
    if steps is not None and len(steps) > 2:
        def edit(base):
            base["compat"]["steps"] = [s.as_config() for s in steps[:-1]]
            base["compat"]["evaluate"] = False  # the last step evaluates every pair

        return derived_config(cfg, STEP, steps[-2].classes, steps[-2].fraction,
                              step=len(steps) - 2, edit=edit)
    if c.old_ckpt:  # checked here, in the plan, before anything trains or is written
        ckpt_file, conf = run_files(Path(c.old_ckpt))
        if not ckpt_file.is_file() or not conf.is_file():
            missing = ", ".join(str(p) for p in (ckpt_file, conf) if not p.is_file())
            raise ConfigError(f"compat.old_ckpt={c.old_ckpt}: not a finished run ({missing} "
                              f"missing); give the old model's run dir (it holds "
                              f"checkpoints/last.pt and resolved_config.yaml) or one of its "
                              f"checkpoint files")
        return Path(c.old_ckpt).expanduser()
    first = steps[0] if steps is not None else Step(c.old_classes, None)
    return old_config(cfg, first.classes, c.old_method, c.old_overrides,
                      norm_feature=c.old_norm_feature, fraction=first.fraction)


class CompatPlan(NamedTuple):
    """What a compatibility run is made compatible with, resolved once before any work: its
    steps (None: one update) and the models of every earlier step, oldest first (configs to
    train or find in the cache, or the path of ``compat.old_ckpt``); the last is the model the
    run's method reads."""

    steps: Optional[List[Step]]
    chain: List[object]
    independent: Optional[object] = None  # the independent new model's config, when needed
    #: every earlier model the run trains against, as its role and cache key (a given
    #: checkpoint as its path): its checkpoint records them, and a resume must find the same
    models: Tuple[str, ...] = ()

    @property
    def previous(self):
        return self.chain[-1]


def plan_compat(cfg, source_classes: int, needs=None) -> CompatPlan:
    """``compat.steps`` and ``compat.old_classes`` checked (named as the user set them), the
    chain of earlier models, each level's steps resolved once, and the independent new model
    when ``needs`` asks for it."""
    steps = resolve_steps(cfg, source_classes)
    if not cfg.compat.old_ckpt and steps is None:
        resolve_classes(OmegaConf.to_container(cfg.compat, resolve=True)["old_classes"],
                        source_classes, key="compat.old_classes")
    chain, current, current_steps = [], cfg, steps
    while True:
        prev = previous_model(current, source_classes, current_steps)
        chain.insert(0, prev)
        if isinstance(prev, Path):
            break
        current, current_steps = prev, resolve_steps(prev, source_classes)
        if current_steps is None:
            break
    independent = None
    if needs is not None and (needs.independent_backbone or needs.independent_embedding):
        independent = independent_config(cfg)
    models = tuple(f"{m}" if isinstance(m, Path) else f"{m.tag}:{model_key(m)}"
                   for m in [*chain, *([independent] if independent is not None else [])])
    return CompatPlan(steps, chain, independent, models)


def load_model(source, launch: Launch, device):
    """(net, config, number of classes) of a chain entry."""
    if isinstance(source, Path):
        return load_run(source, device)
    net, cfg, n, _ = cached_run(source, launch, device)
    return net, cfg, n


class CompatService:
    """Computes what a method's ``needs`` declared, and evaluates the compatibility matrix
    (and, for a multi-step update, the matrix of every step against every earlier one), for the
    ``CompatPlan`` a run resolved. Nothing is trained or loaded until ``prepare()``.
    """

    def __init__(self, cfg, needs, plan: CompatPlan, launch: Launch, device):
        self.cfg, self.needs, self.plan, self.launch, self.device = cfg, needs, plan, launch, device
        self.steps = plan.steps
        self.old: Optional[FrozenNet] = None
        self.num_old_classes = 0
        self._old_gallery: Optional[tuple] = None

    def prepare(self) -> "CompatService":
        """The previous model, loaded or trained (and cached) now."""
        net, old_cfg, n_old = load_model(self.plan.previous, self.launch, self.device)
        if self.steps is not None and n_old != len(self.steps[-2].classes):
            where = (f"compat.old_ckpt={self.plan.previous}" if isinstance(self.plan.previous, Path)
                     else f"the cached model of step {len(self.steps) - 2}")
            raise ConfigError(f"{where} knows {n_old} classes, but compat.steps[-2] has "
                              f"{len(self.steps[-2].classes)}: it is a model of another step. "
                              f"Point compat.old_ckpt at a run on compat.steps[0]'s classes (or "
                              f"leave it null to train the first step here)")
        self.old = FrozenNet(net, old_cfg)
        self.num_old_classes = n_old
        return self

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
        """The independently trained new model (``independent_config``), from the cache or
        trained now."""
        return cached_run(self.plan.independent or independent_config(self.cfg), self.launch,
                          self.device)

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
            step_embs = [embed_all(FrozenNet(load_model(src, self.launch, self.device)[0],
                                             None), test_loader)[0]
                         for src in self.plan.chain[:-1]]
            step_embs += [old, spaces["new"]]
            t = len(step_embs)  # the last update's three pairs are in ``out`` already
            pairs = {(t - 1, t - 2): "new_old", (t - 2, t - 2): "old_old",
                     (t - 1, t - 1): "new_new"}
            known = {ik: {m: out[keys.compat(p, m)] for m in keys.STEP_METRICS}
                     for ik, p in pairs.items()}
            out.update(multistep_matrix(step_embs, labels, [len(s.classes) for s in self.steps],
                                        [s.fraction for s in self.steps], known))
        return out
