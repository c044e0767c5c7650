"""The config schemas in Hydra's ConfigStore, and composing plugin options outside Hydra.

Schemas are stored under ``schema/<group>/<name>`` (never in a user-facing group, so they are
neither selectable nor listed as options); each yaml of ``conf/<group>/`` starts with
``defaults: [/schema/<group>/<name>@_here_, _self_]`` and holds only what differs from its
schema. Kept apart from ``config`` (which every plugin imports) so that the schemas never
import the plugins back.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict

from omegaconf import DictConfig, OmegaConf

from ortho_run.config import GROUP_SCHEMAS, RunConfig
from ortho_run.errors import ConfigError

def plugin_registries() -> Dict[str, object]:
    """config group -> the registry of its plugins."""
    from ortho_run.datasets import SOURCES
    from ortho_run.methods import METHODS
    from ortho_run.models import MODELS
    from ortho_run.optim import OPTIMIZERS
    from ortho_run.regularizers import REGULARIZERS

    return {"data": SOURCES, "model": MODELS, "method": METHODS, "optim": OPTIMIZERS,
            "regularizer": REGULARIZERS}


def register_configs() -> None:
    """Store every schema in Hydra's ConfigStore (idempotent: a plugin registered since the
    last call is added). Discovers every plugin."""
    from hydra.core.config_store import ConfigStore

    OmegaConf.register_new_resolver("path_safe", path_safe, replace=True)
    OmegaConf.register_new_resolver("ortho_groups", help_groups, replace=True)
    OmegaConf.register_new_resolver("ortho_version", version, replace=True)
    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=RunConfig)
    for group, schema in GROUP_SCHEMAS.items():
        cs.store(group=f"schema/{group}", name="default", node=schema)
    for group, reg in plugin_registries().items():
        for name in reg.names():
            cs.store(group=f"schema/{group}", name=name, node=reg.schema(name))


def load_option(group: str, name: str) -> DictConfig:
    """``<group>=<name>`` as the command line composes it: the plugin's schema with its yaml
    on top (outside a Hydra app, e.g. the old model's method in the compat service)."""
    node = OmegaConf.structured(plugin_registries()[group].schema(name))
    f = config_dir() / group / f"{name}.yaml"
    if f.is_file():
        y = OmegaConf.load(f)
        y.pop("defaults", None)
        node = OmegaConf.merge(node, y)
    return node


def structured(container, source: str = "config") -> DictConfig:
    """A plain (e.g. saved) run config merged onto the schemas of the plugins it names, so
    that it is typed and checked exactly like a composed one."""
    base = OmegaConf.structured(RunConfig)
    try:
        for group, reg in plugin_registries().items():
            if group not in container and group in OPTIONAL_GROUPS:  # an older run's config
                container = OmegaConf.merge(OmegaConf.create(container),
                                            {group: {"name": OPTIONAL_GROUPS[group]}})
            name = container[group]["name"]
            base[group] = OmegaConf.structured(reg.schema(str(name)))
        return OmegaConf.merge(base, container)
    except (KeyError, TypeError) as exc:
        raise ConfigError(f"{source}: not an ortho-run run config ({exc})") from None
    except Exception as exc:  # omegaconf's validation errors name the key
        key = getattr(exc, "full_key", None)
        where = f" (key {key})" if key else ""
        raise ConfigError(f"{source}: {str(exc).splitlines()[0]}{where}") from None


#: the groups --help lists, in order, with their default option
HELP_GROUPS = (("data", "digits"), ("model", "small_cnn"), ("method", "ce"), ("optim", "sgd"),
               ("regularizer", "none"), ("trainer", "default"), ("logger", "wandb"),
               ("experiment", None))
#: groups that runs saved before they existed lack: their option then
OPTIONAL_GROUPS = {"regularizer": "none"}
LAUNCHERS = ("basic", "local_parallel", "slurm", "joblib", "submitit_local", "submitit_slurm")


def help_groups() -> str:
    """The user-facing groups and their options, read from conf/ (schemas are not options)."""
    lines = []
    for group, default in HELP_GROUPS:
        opts = sorted(p.stem for p in (config_dir() / group).glob("*.yaml"))
        if default in opts:
            opts.remove(default)
            opts.insert(0, default)
        lines.append(f"  {group:<16} {', '.join(opts)}")
    lines.append(f"  {'hydra/launcher':<16} {', '.join(LAUNCHERS)}  (with -m)")
    return "\n".join(lines)


def version() -> str:
    from ortho_run import __version__

    return __version__


def path_safe(text: str, limit: int = 120) -> str:
    """One path component from a sweep's override string: ``/`` and other separators become
    ``_`` (``data.root=/x/y`` must not open sub-directories), and a long string is cut and
    suffixed with a short hash so that two sweeps' names stay distinct and under NAME_MAX."""
    import hashlib

    safe = "".join("_" if c in '/\\:*?"<>|' or ord(c) < 32 else c for c in str(text))
    if len(safe) > limit:
        safe = safe[:limit - 9] + "~" + hashlib.sha1(str(text).encode()).hexdigest()[:8]
    return safe


def config_dir() -> Path:
    """The shipped ``conf/`` tree: inside the wheel (ortho_run/conf) or the source checkout."""
    pkg = Path(__file__).resolve().parent
    for cand in (pkg / "conf", pkg.parent / "conf"):
        if (cand / "config.yaml").is_file():
            return cand
    raise FileNotFoundError(f"ortho-run's conf/ directory not found next to {pkg}")
