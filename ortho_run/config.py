"""Structured-config schemas for every config group.

Each group's yaml files start with ``defaults: [schema, _self_]`` (methods: ``<name>_schema``),
so Hydra merges them onto these dataclasses: an unknown key, a wrong type or a value outside
a choice list fails at composition time, naming the full key, before any work starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Dict, List, Optional

from omegaconf import MISSING

# --- what a key changes --------------------------------------------------------------------
#: A key changes what a run learns unless its schema field says otherwise, once, here or in its
#: plugin's schema: ``EVALUATION`` keys change how the run is computed, evaluated or checked but
#: not the weights it learns (the resume check and the cached-model key ignore them);
#: ``LABEL`` keys name a run without changing it (ignored by the same two, kept in run names,
#: report groups and sweep folder names: a ``tag`` tells runs apart); ``REPORT`` keys change
#: only where or how a run is reported (run names, report groups and sweep folder names ignore
#: them too). Read through ``ortho_run.store.effect_of``.
LEARNED, EVALUATION, LABEL, REPORT = "learned", "evaluation", "label", "report"


def evaluation(default=MISSING, *, factory=None):
    """A schema field that does not change what is learned (see ``EVALUATION``)."""
    return _marked(EVALUATION, default, factory)


def label(default=MISSING, *, factory=None):
    """A schema field that names a run without changing it (see ``LABEL``)."""
    return _marked(LABEL, default, factory)


def report(default=MISSING, *, factory=None):
    """A schema field that only changes where or how a run is reported (see ``REPORT``)."""
    return _marked(REPORT, default, factory)


def _marked(effect, default, factory):
    if factory is not None:
        return field(default_factory=factory, metadata={"effect": effect})
    return field(default=default, metadata={"effect": effect})


class Choice(str, Enum):
    """String enum: validated by OmegaConf, compares and prints as its plain value."""

    def __str__(self) -> str:  # so f-strings and file names see "gpu", not "Pipeline.gpu"
        return self.value


class Pipeline(Choice):
    auto = "auto"  # resident for array data sets, loader for image folders
    resident = "resident"  # uint8 tensors resident on the training device, tensor-op augmentation
    gpu = "resident"  # the former name of ``resident`` (an alias)
    loader = "loader"  # torch DataLoader with workers and torchvision transforms


class Augment(Choice):
    none = "none"
    flip = "flip"
    crop_flip = "crop_flip"


class FlipMode(Choice):
    random = "random"  # each image mirrored with probability ½ each epoch
    alternating = "alternating"  # a random half mirrored once, then every image every other
    #                              epoch (airbench's scheme): each image seen both ways in turn


class PadMode(Choice):
    zeros = "zeros"  # torchvision's RandomCrop(padding)
    reflect = "reflect"  # airbench's translate


class Device(Choice):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class Precision(Choice):
    auto = "auto"  # bf16 autocast on CUDA, fp32 on CPU
    bf16 = "bf16"
    fp32 = "fp32"


class OnNonFinite(Choice):
    stop = "stop"
    skip = "skip"


class CompileMode(Choice):
    """torch.compile modes (the names use ``_``; the values are torch's)."""
    default = "default"
    reduce_overhead = "reduce-overhead"  # CUDA graphs: for launch-bound steps on a GPU
    max_autotune = "max-autotune"
    max_autotune_no_cudagraphs = "max-autotune-no-cudagraphs"


class LossReduction(Choice):
    mean = "mean"  # the loss of a batch is the mean over its examples
    sum = "sum"  # the sum: every loss part times the batch size (airbench's recipe)


class Progress(Choice):
    auto = "auto"  # a bar only when stderr is a TTY
    on = "on"
    off = "off"


class WandbMode(Choice):
    online = "online"
    offline = "offline"
    disabled = "disabled"


@dataclass
class DataConfig:
    """Keys every data source has; each source's schema (in its plugin file) adds its own."""

    name: str = MISSING
    # splits
    classes: Any = None  # null | all | first_half | first_quarter | first_<n> | ... | [ids...]
    val_fraction: float = 0.0  # a seeded, stratified validation split held out of train
    split_seed: int = 0
    # keep this share of each class's training images (seeded per class, nested: a smaller
    # fraction keeps a subset of a larger one's images; a multi-step update's data growth)
    train_fraction: float = 1.0
    max_train_samples: Optional[int] = None
    # loading
    pipeline: Pipeline = Pipeline.auto
    batch_size: int = 128
    eval_batch_size: int = evaluation(1024)
    num_workers: int = report(4)
    augment: Augment = Augment.none
    crop_padding: int = 4
    crop_padding_mode: PadMode = PadMode.zeros
    flip_mode: FlipMode = FlipMode.random
    color_jitter: float = 0.0  # brightness/contrast/saturation jitter strength (0: off)


@dataclass
class ModelConfig:
    """Keys every backbone has; a model with options of its own subclasses it."""

    name: str = MISSING
    embed_dim: Optional[int] = None  # optional linear projection of the penultimate feature
    embed_bn: bool = False


@dataclass
class MethodConfig:
    """Base of every method schema; each plugin subclasses it with its own fields."""

    name: str = MISSING


#: the roles of the backbone's parameters (``ortho_run.optim.base.backbone_groups``)
BACKBONE_ROLES = ("stem", "hidden", "backbone_1d")
#: the parameter roles an optimiser sees: the backbone's, then the method's head and its own
ROLES = BACKBONE_ROLES + ("head", "method")


def _role_table(v) -> bool:
    return all(str(k) in ROLES and x >= 0 for k, x in dict(v).items())


@dataclass
class OptimConfig:
    """Keys every optimiser has (the learning-rate schedule included); each optimiser's schema
    (``ortho_run/optim/``) adds its own and its defaults."""

    name: str = MISSING
    lr: float = 0.1
    weight_decay: float = 0.0
    scheduler: str = "cosine"  # constant | multistep | cosine | onecycle (ortho_run/optim/schedules.py)
    milestones: List[int] = field(default_factory=list)  # epochs, for multistep
    gamma: float = 0.1  # multistep factor
    warmup_epochs: float = 0.0
    min_lr_factor: float = 0.0  # cosine floor, as a fraction of lr
    fused: bool = True  # fused/foreach kernels on CUDA where torch has them
    # a role's own lr / weight decay, whichever optimiser updates it (e.g. {head: 0.67});
    # roles: stem, hidden, backbone_1d, head, method
    role_lr: Dict[str, float] = field(default_factory=dict)
    role_weight_decay: Dict[str, float] = field(default_factory=dict)


@dataclass
class TrainerConfig:
    max_epochs: int = 30
    device: Device = evaluation(Device.auto)
    precision: Precision = Precision.auto
    label_smoothing: float = 0.0
    grad_clip: Optional[float] = None
    eval_every: int = evaluation(5)
    checkpoint_every: int = report(1)
    # auto: resume in place when the run dir holds checkpoints/last.pt (SLURM requeue, reruns);
    # none; force (resume although the config changed); or a run dir / checkpoint path
    resume: str = report("auto")
    deterministic: bool = False
    progress: Progress = report(Progress.auto)
    log_every_steps: int = report(0)  # 0: one metrics.jsonl row per epoch (no per-step host sync)
    nonfinite_check_every: int = evaluation(50)  # steps between (device->host) non-finite checks
    on_nonfinite: OnNonFinite = OnNonFinite.stop
    limit_train_batches: Optional[int] = None
    channels_last: bool = evaluation(True)  # CUDA only
    compile: bool = evaluation(False)
    compile_mode: CompileMode = evaluation(CompileMode.default)  # with compile=true
    geometry: bool = evaluation(True)  # geometry/ diagnostics on the test features at the end
    retrieval: bool = evaluation(False)  # retrieval/ metrics (CMC, mAP) on the test embeddings
    tta_flip: bool = evaluation(False)  # evaluate on the mean logits of the image and its mirror
    # with tta_flip: airbench's level 2, plus the one-pixel translations (up-left, down-right)
    tta_translate: bool = evaluation(False)
    loss_reduction: LossReduction = LossReduction.mean  # sum: the batch's summed loss (airbench)
    # steps trained and then undone before the run, so compilation happens outside time/train_s
    warmup_steps: int = evaluation(0)


@dataclass
class LoggerConfig:
    mode: WandbMode = WandbMode.offline
    project: str = "ortho-run"
    entity: Optional[str] = None
    group: Optional[str] = None  # default: the sweep name in multirun
    name: Optional[str] = None  # default: <method>_<data>_s<seed>
    tags: List[str] = field(default_factory=list)
    # seconds W&B may take to start an online run (then the run goes on offline)
    init_timeout: float = 60.0


@dataclass
class CompatConfig:
    """Old model for backward-compatibility methods (see ortho_run.compat)."""

    old_ckpt: Optional[str] = None  # a checkpoint (or run dir) of the old model
    old_classes: Any = "first_half"  # the old model's class subset when it is trained here
    old_method: str = "ce"
    old_overrides: List[str] = field(default_factory=list)  # dotlist applied to the old config
    # train the old model on L2-normalised features with a bias-free head (BT²/OCA's
    # ``norm_feature: True``); its method must have norm_feature (ce does)
    old_norm_feature: bool = False
    # A multi-step update: per step, a class set (a data.classes value, containing the one
    # before it, e.g. [first_quarter, first_half, first_three_quarters, all]), a share of the
    # training data (a number in (0, 1], e.g. [0.25, 0.5, 1.0]), or both ({classes: first_half,
    # fraction: 0.5}); the last step is the run's own data. Step 0 is trained with old_method;
    # step t with this run's method against step t-1 (each cached like the old model).
    # null: one step, from old_classes to this run.
    steps: Optional[List[Any]] = None
    evaluate: bool = evaluation(True)


@dataclass
class RunConfig:
    data: Any = MISSING  # a data source's schema (ortho_run/datasets/)
    model: Any = MISSING  # a model's schema (ortho_run/models/)
    method: Any = MISSING  # a method's schema (ortho_run/methods/)
    optim: Any = MISSING  # an optimiser's schema (ortho_run/optim/)
    regularizer: Any = MISSING  # a regulariser's schema (ortho_run/regularizers/)
    trainer: TrainerConfig = MISSING
    logger: LoggerConfig = report(MISSING)  # every logger key
    compat: CompatConfig = field(default_factory=CompatConfig)
    seed: int = 0
    output_root: str = report("outputs")
    cache_dir: str = report("~/.cache/ortho_run")
    tag: str = label("")  # free text, kept in summary.json, run names and report groups
    objective: str = report("test/acc1")  # the summary metric a job returns (Optuna maximises it)
    # the published result a preset targets (ortho_run.references; ortho-report compares)
    reference: Optional[str] = report(None)


#: groups with one schema for all their options (the plugin groups' schemas live in their
#: plugin files and are registered by ``ortho_run.store``)
GROUP_SCHEMAS = {
    "trainer": TrainerConfig,
    "logger": LoggerConfig,
}


def positive(*keys: str):
    """A schema's ``checks``: each key must be > 0 (it divides, or scales a logit)."""
    return [(k, lambda v: v > 0, "> 0") for k in keys]


def at_least(value, *keys: str):
    return [(k, lambda v, m=value: v is None or v >= m, f">= {value}") for k in keys]


def at_most(value, *keys: str, why: str = ""):
    """Upper bounds for keys that size an allocation (a window, a batch, a layer): an absurd
    but finite value is refused before it exhausts memory."""
    what = f"<= {value}" + (f" ({why})" if why else "")
    return [(k, lambda v, m=value: v is None or v <= m, what) for k in keys]


def in_unit_interval(*keys: str):
    return [(k, lambda v: 0 <= v < 1, "in [0, 1)") for k in keys]


def schema_checks(schema) -> list:
    """A plugin schema's range checks: its own ``checks`` and those of every schema it extends,
    so a schema that extends another adds checks to its base's and never drops one."""
    return [c for klass in reversed(getattr(schema, "__mro__", ()))
            for c in vars(klass).get("checks", ())]


def output_root_error(value) -> Optional[str]:
    """Why ``output_root`` cannot hold runs, or None (the CLI asks before Hydra makes folders,
    the pre-flight for in-process runs)."""
    if not str(value).strip():
        return "output_root is empty: set it to a folder (default: outputs)"
    return None


# (key, check, what it must be): value checks the type system cannot express. A key that the
# chosen plugin's schema does not have is skipped.
RANGES = [
    ("seed", lambda v: 0 <= v < 2**62, "in [0, 2^62)"),
    ("cache_dir", lambda v: bool(str(v).strip()),
     "a folder, not empty (ORTHO_RUN_CACHE, when set, gives it)"),
    ("data.batch_size", lambda v: v >= 1, ">= 1"),
    ("data.eval_batch_size", lambda v: v >= 1, ">= 1"),
    *at_most(2 ** 20, "data.batch_size", "data.eval_batch_size", why="images in one batch"),
    *at_most(256, "data.crop_padding", why="pixels of padding around every image"),
    *at_most(2 ** 16, "model.embed_dim", why="the width of the embedding layer"),
    *at_most(10 ** 6, "trainer.nonfinite_check_every",
             why="a window of that many losses is kept on the device"),
    *at_most(10 ** 6, "trainer.max_epochs"),
    *at_most(86400, "logger.init_timeout", why="seconds"),
    ("data.num_workers", lambda v: v >= 0, ">= 0"),
    ("data.crop_padding", lambda v: v >= 0, ">= 0"),
    ("data.color_jitter", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("data.max_train_samples", lambda v: v is None or v >= 1, ">= 1 or null"),
    *in_unit_interval("data.val_fraction"),
    ("data.train_fraction", lambda v: 0 < v <= 1, "in (0, 1]"),
    ("data.split_seed", lambda v: 0 <= v < 2**63, "in [0, 2^63)"),
    ("model.embed_dim", lambda v: v is None or v >= 1, ">= 1 or null"),
    ("optim.lr", lambda v: v > 0, "> 0"),
    ("optim.weight_decay", lambda v: v >= 0, ">= 0"),
    ("optim.warmup_epochs", lambda v: v >= 0, ">= 0"),
    ("optim.gamma", lambda v: v > 0, "> 0"),
    ("optim.milestones", lambda v: all(m >= 1 for m in v), "epochs >= 1"),
    ("optim.min_lr_factor", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("optim.role_lr", _role_table, "a table role: lr >= 0 over the roles " + ", ".join(ROLES)),
    ("optim.role_weight_decay", _role_table,
     "a table role: weight decay >= 0 over the roles " + ", ".join(ROLES)),
    ("trainer.max_epochs", lambda v: v >= 1, ">= 1"),
    ("trainer.eval_every", lambda v: v >= 0, ">= 0"),
    ("trainer.checkpoint_every", lambda v: v >= 0, ">= 0"),
    ("trainer.nonfinite_check_every", lambda v: v >= 0, ">= 0"),
    ("trainer.log_every_steps", lambda v: v >= 0, ">= 0"),
    *in_unit_interval("trainer.label_smoothing"),
    ("trainer.grad_clip", lambda v: v is None or v > 0, "> 0 or null"),
    ("trainer.limit_train_batches", lambda v: v is None or v >= 1, ">= 1 or null"),
    ("trainer.warmup_steps", lambda v: 0 <= v <= 100_000, "in [0, 100000]"),
    ("logger.init_timeout", lambda v: v > 0, "> 0"),
]
