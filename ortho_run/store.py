"""Hydra's ConfigStore: the schemas of ``ortho_run.config`` plus one schema per method plugin.

Kept apart from ``config`` (which every plugin imports) so that the schemas never import the
plugins back.
"""

from __future__ import annotations

from pathlib import Path

from ortho_run.config import GROUP_SCHEMAS, RunConfig
from ortho_run.methods import METHODS

_registered = False


def register_configs() -> None:
    """Store the schemas in Hydra's ConfigStore (idempotent). Imports every method plugin."""
    global _registered
    if _registered:
        return
    from hydra.core.config_store import ConfigStore

    from omegaconf import OmegaConf

    OmegaConf.register_new_resolver("path_safe", path_safe, replace=True)
    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=RunConfig)
    for group, schema in GROUP_SCHEMAS.items():
        cs.store(group=group, name="schema", node=schema)
    for name in METHODS.names():
        cs.store(group="method", name=f"{name}_schema", node=METHODS.get(name).Config)
    _registered = True


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
