"""Structured-config schemas for every config group.

Each group's yaml files start with ``defaults: [schema, _self_]`` (methods: ``<name>_schema``),
so Hydra merges them onto these dataclasses: an unknown key, a wrong type or a value outside
a choice list fails at composition time, naming the full key, before any work starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, List, Optional

from omegaconf import MISSING


class Choice(str, Enum):
    """String enum: validated by OmegaConf, compares and prints as its plain value."""

    def __str__(self) -> str:  # so f-strings and file names see "gpu", not "Pipeline.gpu"
        return self.value


class Pipeline(Choice):
    auto = "auto"  # gpu for array data sets, loader for image folders
    gpu = "gpu"  # device-resident uint8 tensors, augmentation as tensor ops (on CPU: in RAM)
    loader = "loader"  # torch DataLoader with workers and torchvision transforms


class Augment(Choice):
    none = "none"
    flip = "flip"
    crop_flip = "crop_flip"


class Device(Choice):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class Precision(Choice):
    auto = "auto"  # bf16 autocast on CUDA, fp32 on CPU
    bf16 = "bf16"
    fp32 = "fp32"


class OptimName(Choice):
    sgd = "sgd"
    adamw = "adamw"
    adam = "adam"


class Schedule(Choice):
    constant = "constant"
    multistep = "multistep"
    cosine = "cosine"
    onecycle = "onecycle"


class OnNonFinite(Choice):
    stop = "stop"
    skip = "skip"


class CompileMode(Choice):
    """torch.compile modes (the names use ``_``; the values are torch's)."""
    default = "default"
    reduce_overhead = "reduce-overhead"  # CUDA graphs: for launch-bound steps on a GPU
    max_autotune = "max-autotune"
    max_autotune_no_cudagraphs = "max-autotune-no-cudagraphs"


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
    name: str = "digits"  # digits | synthetic | cifar10 | cifar100 | imagefolder
    root: str = "data"  # where cifar*/imagefolder files live
    download: bool = False
    # synthetic only
    num_classes: int = 10
    image_size: int = 32
    channels: int = 3
    train_per_class: int = 100
    test_per_class: int = 30
    noise: float = 0.6
    # splits
    classes: Any = None  # null | first_half | second_half | [ids...]
    val_fraction: float = 0.0
    split_seed: int = 0
    test_fraction: float = 0.2  # digits: stratified hold-out
    max_train_samples: Optional[int] = None
    # loading
    pipeline: Pipeline = Pipeline.auto
    batch_size: int = 128
    eval_batch_size: int = 1024
    num_workers: int = 4
    augment: Augment = Augment.none
    crop_padding: int = 4


@dataclass
class ModelConfig:
    name: str = "small_cnn"
    width: int = 32  # small_cnn base width
    embed_dim: Optional[int] = None  # optional linear projection of the penultimate feature
    embed_bn: bool = False
    pretrained: bool = False  # torchvision ImageNet models only; needs cached weights


@dataclass
class MethodConfig:
    """Base of every method schema; each plugin subclasses it with its own fields."""

    name: str = MISSING


@dataclass
class OptimConfig:
    name: OptimName = OptimName.sgd
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    scheduler: Schedule = Schedule.cosine
    milestones: List[int] = field(default_factory=list)  # epochs, for multistep
    gamma: float = 0.1  # multistep factor
    warmup_epochs: float = 0.0
    min_lr_factor: float = 0.0  # cosine floor, as a fraction of lr
    fused: bool = True  # fused/foreach kernels on CUDA where torch has them


@dataclass
class TrainerConfig:
    max_epochs: int = 30
    device: Device = Device.auto
    precision: Precision = Precision.auto
    label_smoothing: float = 0.0
    grad_clip: Optional[float] = None
    eval_every: int = 1
    checkpoint_every: int = 1
    resume: str = "none"  # none | auto | path to a run dir or checkpoint
    deterministic: bool = False
    progress: Progress = Progress.auto
    log_every_steps: int = 0  # 0: one metrics.jsonl row per epoch (no per-step host sync)
    nonfinite_check_every: int = 50  # steps between (device->host) non-finite checks
    on_nonfinite: OnNonFinite = OnNonFinite.stop
    limit_train_batches: Optional[int] = None
    channels_last: bool = True  # CUDA only
    compile: bool = False
    compile_mode: CompileMode = CompileMode.default  # with compile=true
    geometry: bool = True  # geometry/ diagnostics on the test features at the end
    retrieval: bool = False  # retrieval/ metrics (CMC, mAP) on the test embeddings
    tta_flip: bool = False  # evaluate on the mean logits of the image and its mirror


@dataclass
class LoggerConfig:
    mode: WandbMode = WandbMode.offline
    project: str = "ortho-run"
    entity: Optional[str] = None
    group: Optional[str] = None  # default: the sweep name in multirun
    name: Optional[str] = None  # default: <method>_<data>_s<seed>
    tags: List[str] = field(default_factory=list)


@dataclass
class CompatConfig:
    """Old model for backward-compatibility methods (see ortho_run.runner.compat)."""

    old_ckpt: Optional[str] = None  # a checkpoint (or run dir) of the old model
    old_classes: Any = "first_half"  # the old model's class subset when it is trained here
    old_method: str = "ce"
    old_overrides: List[str] = field(default_factory=list)  # dotlist applied to the old config
    evaluate: bool = True


@dataclass
class RunConfig:
    data: DataConfig = MISSING
    model: ModelConfig = MISSING
    method: Any = MISSING
    optim: OptimConfig = MISSING
    trainer: TrainerConfig = MISSING
    logger: LoggerConfig = MISSING
    compat: CompatConfig = field(default_factory=CompatConfig)
    seed: int = 0
    output_root: str = "outputs"
    cache_dir: str = "~/.cache/ortho_run"
    tag: str = ""  # free text, kept in summary.json
    objective: str = "test/acc1"  # the summary metric a job returns (Optuna maximises it)


GROUP_SCHEMAS = {
    "data": DataConfig,
    "model": ModelConfig,
    "optim": OptimConfig,
    "trainer": TrainerConfig,
    "logger": LoggerConfig,
}

# (key, check, what it must be): value checks the type system cannot express
RANGES = [
    ("data.batch_size", lambda v: v >= 1, ">= 1"),
    ("data.eval_batch_size", lambda v: v >= 1, ">= 1"),
    ("data.num_workers", lambda v: v >= 0, ">= 0"),
    ("data.crop_padding", lambda v: v >= 0, ">= 0"),
    ("data.max_train_samples", lambda v: v is None or v >= 1, ">= 1 or null"),
    ("data.val_fraction", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("data.test_fraction", lambda v: 0 < v < 1, "in (0, 1)"),
    ("model.width", lambda v: v >= 1, ">= 1"),
    ("model.embed_dim", lambda v: v is None or v >= 1, ">= 1 or null"),
    ("optim.lr", lambda v: v > 0, "> 0"),
    ("optim.weight_decay", lambda v: v >= 0, ">= 0"),
    ("optim.momentum", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("optim.warmup_epochs", lambda v: v >= 0, ">= 0"),
    ("optim.gamma", lambda v: v > 0, "> 0"),
    ("trainer.max_epochs", lambda v: v >= 1, ">= 1"),
    ("trainer.eval_every", lambda v: v >= 0, ">= 0"),
    ("trainer.checkpoint_every", lambda v: v >= 0, ">= 0"),
    ("trainer.nonfinite_check_every", lambda v: v >= 0, ">= 0"),
    ("trainer.log_every_steps", lambda v: v >= 0, ">= 0"),
    ("trainer.label_smoothing", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("trainer.grad_clip", lambda v: v is None or v > 0, "> 0 or null"),
    ("trainer.limit_train_batches", lambda v: v is None or v >= 1, ">= 1 or null"),
]


def validate_ranges(cfg) -> None:
    """Raise ConfigError naming the first key whose value is out of range."""
    from omegaconf import OmegaConf

    from ortho_run.errors import ConfigError

    for key, ok, what in RANGES:
        v = OmegaConf.select(cfg, key)
        if not ok(v):
            raise ConfigError(f"{key}={v} is out of range: it must be {what}")
