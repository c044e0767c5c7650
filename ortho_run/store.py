"""The config schemas in Hydra's ConfigStore, and composing plugin options outside Hydra.

Schemas are stored under ``schema/<group>/<name>`` (never in a user-facing group, so they are
neither selectable nor listed as options); each yaml of ``conf/<group>/`` starts with
``defaults: [/schema/<group>/<name>@_here_, _self_]`` and holds only what differs from its
schema. Kept apart from ``config`` (which every plugin imports) so that the schemas never
import the plugins back.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Dict, List

from omegaconf import DictConfig, OmegaConf

from ortho_run.config import GROUP_SCHEMAS, RunConfig
from ortho_run.errors import ConfigError, first_line

log = logging.getLogger("ortho_run")


def plugin_registries() -> Dict[str, object]:
    """config group -> the registry of its plugins."""
    from ortho_run.datasets import SOURCES
    from ortho_run.methods import METHODS
    from ortho_run.models import MODELS
    from ortho_run.optim import OPTIMIZERS
    from ortho_run.regularizers import REGULARIZERS

    return {"data": SOURCES, "model": MODELS, "method": METHODS, "optim": OPTIMIZERS,
            "regularizer": REGULARIZERS}


def key_effects() -> Dict[str, str]:
    """Every schema key whose field says it does not change what is learned, with its effect
    (``config.EVALUATION``, ``config.LABEL`` or ``config.REPORT``): the run's own fields, the
    trainer, logger and compat groups, and every registered plugin's schema (a key marked by
    one plugin is marked for its group)."""
    import dataclasses
    import typing

    out: Dict[str, str] = {}

    def walk(schema, prefix: str) -> None:
        hints = typing.get_type_hints(schema)
        for f in dataclasses.fields(schema):
            key = prefix + f.name
            if f.metadata.get("effect"):
                out[key] = f.metadata["effect"]
            elif dataclasses.is_dataclass(hints.get(f.name)):
                walk(hints[f.name], key + ".")

    walk(RunConfig, "")
    for group, schema in GROUP_SCHEMAS.items():
        if group not in out:
            walk(schema, group + ".")
    for group, reg in plugin_registries().items():
        for name in reg.names(internal=True):
            walk(reg.schema(name), group + ".")
    return out


def effect_of(key: str) -> str:
    """What an override key (``trainer.progress``, ``logger.mode``, ``logger``, ``+tag``)
    changes: ``learned`` unless the key, or a group above it, is marked."""
    from ortho_run.config import LEARNED

    key = key.lstrip("+~")
    effects = _effects()
    parts = key.split(".")
    for i in range(len(parts), 0, -1):
        e = effects.get(".".join(parts[:i]))
        if e:
            return e
    return LEARNED


def report_override_keys() -> list:
    """The override keys Hydra leaves out of sweep folder names (``conf/config.yaml``,
    ``hydra.job.config.override_dirname.exclude_keys``, held equal to this by a test): every
    ``REPORT`` key, a group marked whole with each of its keys."""
    from ortho_run.config import REPORT

    keys = {k for k, e in key_effects().items() if e == REPORT}
    for group, schema in GROUP_SCHEMAS.items():
        if group in keys:
            keys |= {f"{group}.{name}" for name in schema.__dataclass_fields__}
    return sorted(keys)


def registry_generation() -> int:
    """Every plugin discovered, then the registries' generation (``registry.GENERATION``):
    what the caches derived from the registries are keyed on."""
    from ortho_run.registry import GENERATION

    for reg in plugin_registries().values():
        reg.discover()
    return GENERATION[0]


_EFFECTS: list = [-1, {}]  # [generation, key_effects() for it]


def _effects() -> Dict[str, str]:
    """``key_effects()`` for the registries as they are now (recomputed after any plugin is
    registered or removed)."""
    gen = registry_generation()
    if _EFFECTS[0] != gen:
        _EFFECTS[:] = [gen, key_effects()]
    return _EFFECTS[1]


def compatibility_methods(compat: bool = True) -> list:
    """The methods (by the registry) that need an old model (``compat=False``: those that train
    alone), as ``method=<name>`` composes them."""
    from ortho_run.methods import METHODS

    return [n for n in METHODS.names()
            if METHODS.get(n).needs(load_option("method", n)).any == compat]


_STORED = [-1]  # the registry generation whose schemas are in the ConfigStore


def register_configs() -> None:
    """Store every schema in Hydra's ConfigStore (idempotent: a plugin registered since the
    last call is added; with none, nothing is stored again). Discovers every plugin."""
    from hydra.core.config_store import ConfigStore

    OmegaConf.register_new_resolver("path_safe", path_safe, replace=True)
    OmegaConf.register_new_resolver("ortho_groups", help_groups, replace=True)
    OmegaConf.register_new_resolver("ortho_version", version, replace=True)
    gen = registry_generation()
    cs = ConfigStore.instance()
    if _STORED[0] == gen and "config_schema.yaml" in cs.repo:
        return
    cs.store(name="config_schema", node=RunConfig)
    for group, schema in GROUP_SCHEMAS.items():
        cs.store(group=f"schema/{group}", name="default", node=schema)
    for group, reg in plugin_registries().items():
        for name in reg.names():
            cs.store(group=f"schema/{group}", name=name, node=reg.schema(name))
    _STORED[0] = gen


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


def upgraded(container: dict) -> dict:
    """A saved run config as today's schemas read it: keys added since take their defaults,
    keys no schema has any more are left out (today's code cannot read them). A config naming a
    plugin that no longer exists comes back unchanged. So a key added to a schema defaults to
    the behaviour from before it existed; a plugin's new default goes in its yaml."""
    try:
        schemas = {group: reg.schema(str((container.get(group) or {}).get(
            "name", OPTIONAL_GROUPS.get(group)))) for group, reg in plugin_registries().items()}
        schemas.update(GROUP_SCHEMAS)
    except ConfigError:
        return container
    base = OmegaConf.structured(RunConfig)
    for group, schema in schemas.items():
        base[group] = OmegaConf.structured(schema)

    def merge(default, saved):
        # a schema's node: its fields, each the saved value where there is one; a free-form
        # Dict field (optim.role_lr) or any other value: the saved one, whole
        if not (isinstance(default, DictConfig) and isinstance(saved, dict)
                and dataclasses.is_dataclass(OmegaConf.get_type(default))):
            return saved
        plain = OmegaConf.to_container(default, enum_to_str=True)
        return {k: merge(default._get_node(k), saved[k]) if k in saved else v
                for k, v in plain.items()}

    return merge(base, container)


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
    except Exception as exc:  # omegaconf's validation errors name the key
        key = getattr(exc, "full_key", None)
        if isinstance(exc, KeyError) and key:  # a key the plugin's schema does not have
            schema = getattr(getattr(exc, "object_type", None), "__name__", None) or "its schema"
            raise ConfigError(f"{source}: unknown key {key}: {schema} has no key "
                              f"{key.rsplit('.', 1)[-1]!r} (check the spelling; ortho-run --cfg "
                              f"job prints every key)") from None
        if isinstance(exc, (KeyError, TypeError)):
            raise ConfigError(f"{source}: not an ortho-run run config ({exc})") from None
        where = f" (key {key})" if key else ""
        raise ConfigError(f"{source}: {first_line(exc)}{where}") from None


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


#: the name of the primary config ``ortho-run --from RUN`` composes
RERUN_CONFIG = "rerun"


def rerun_config(source: Path) -> dict:
    """The primary config that reruns a saved run (``ortho-run --from RUN``): the run's
    resolved config (``RUN/resolved_config.yaml``, or a saved config file given itself) as
    today's schemas read it (``upgraded``: a key added since takes the behaviour from before it
    existed), under ortho-run's own Hydra settings (run and sweep dirs, nothing written by a
    refused run, the help, the launchers and sweepers of ``conf/hydra``). A source that is no
    run config is a ConfigError saying what to give."""
    source = Path(source).expanduser()
    path = source / "resolved_config.yaml" if source.is_dir() else source
    if not path.is_file():
        raise ConfigError(f"--from {source}: no {path.name if source.is_dir() else 'file'} "
                          f"there. Give a run dir (it holds resolved_config.yaml) or a saved "
                          f"config file")
    try:
        saved = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except Exception as exc:
        raise ConfigError(f"--from {path}: not a readable yaml file "
                          f"({first_line(exc)})"
                          ) from None
    groups = plugin_registries()
    if not isinstance(saved, dict) or not all(isinstance(saved.get(g), dict) and "name" in saved[g]
                                              for g in groups if g not in OPTIONAL_GROUPS):
        raise ConfigError(f"--from {path}: not an ortho-run run config (it needs the groups "
                          f"{', '.join(g for g in groups if g not in OPTIONAL_GROUPS)}, each "
                          f"with its name); give a run dir's resolved_config.yaml")
    ours = OmegaConf.to_container(OmegaConf.load(config_dir() / "config.yaml"), resolve=False)
    hydra = dict(ours["hydra"], searchpath=[f"file://{config_dir()}"])
    defaults = [d for d in ours["defaults"] if isinstance(d, dict)
                and any(str(k).startswith("override hydra/") for k in d)]
    saved.pop("hydra", None)
    kept = upgraded(saved)
    gone = left_out(saved, kept)
    if gone:
        log.warning("--from %s: this version has no key %s: left out, so the rerun cannot honour "
                    "%s (a key an older version had, or a typo in an edited config)", path,
                    ", ".join(gone), "it" if len(gone) == 1 else "them")
    return {"defaults": [*defaults, "_self_"], **kept, "hydra": hydra}


def left_out(saved: dict, kept: dict, prefix: str = "") -> List[str]:
    """The keys of ``saved`` that ``upgraded`` (giving ``kept``) left out, dotted."""
    out: List[str] = []
    for k, v in saved.items():
        if k not in kept:
            out.append(f"{prefix}{k}")
        elif isinstance(v, dict) and isinstance(kept[k], dict):
            out += left_out(v, kept[k], f"{prefix}{k}.")
    return out
