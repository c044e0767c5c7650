"""Checkpoints: written atomically (temp file, fsync, rename), checked on load.

A process killed at any moment leaves ``last.pt`` either as the previous complete checkpoint
or the new complete one. ``last.pt`` carries a fingerprint of the model/method config so that
a checkpoint from another model or method is refused with a clear message.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Dict, Optional

import torch
from omegaconf import OmegaConf

from ortho_run.errors import CheckpointError
from ortho_run.io import atomic_torch_save

FORMAT = "ortho-run/1"


def fingerprint(cfg) -> Dict[str, Any]:
    """What must match for a checkpoint to be loadable into this run."""
    return {
        "model": OmegaConf.to_container(cfg.model, resolve=True, enum_to_str=True),
        "method": OmegaConf.to_container(cfg.method, resolve=True, enum_to_str=True)["name"],
    }


def save(path: Path, state: Dict[str, Any]) -> None:
    """Atomic write, then remove temp files that killed writers left (one writer per run dir)."""
    state = dict(state, format=FORMAT)
    atomic_torch_save(state, path)
    for stale in Path(path).parent.glob(f".{Path(path).name}.*.tmp"):
        stale.unlink(missing_ok=True)


def resolve_resume(spec: str, run_dir: Path) -> Optional[Path]:
    """``none`` -> None; ``auto`` -> run_dir's last.pt if present; else a run dir or a file."""
    spec = str(spec)
    if spec in ("none", "", "null", "false"):
        return None
    if spec == "auto":
        p = run_dir / "checkpoints" / "last.pt"
        return p if p.is_file() else None
    p = Path(spec).expanduser()
    if p.is_dir():
        p = p / "checkpoints" / "last.pt"
    if not p.is_file():
        raise CheckpointError(f"trainer.resume={spec}: no checkpoint at {p}. Give a run dir "
                              f"holding checkpoints/last.pt, a .pt file, or trainer.resume=auto.")
    return p


def load(path: Path, cfg=None, map_location="cpu") -> Dict[str, Any]:
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:
        raise CheckpointError(f"{path} cannot be read as a checkpoint ({type(exc).__name__}: "
                              f"{exc}). It is truncated or not an ortho-run checkpoint; remove it "
                              f"or point trainer.resume at another one.") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an ortho-run checkpoint (format "
                              f"{state.get('format') if isinstance(state, dict) else type(state).__name__!r}).")
    if cfg is not None:
        want, got = fingerprint(cfg), state.get("fingerprint")
        if got != want:
            raise CheckpointError(
                f"{path} was written by another model or method: checkpoint has "
                f"{json.dumps(got, sort_keys=True)}, this run has {json.dumps(want, sort_keys=True)}. "
                f"Resume with the config it was trained with (its run dir's .hydra/config.yaml) "
                f"or start a fresh run dir.")
    return state


def config_hash(container: Any) -> str:
    blob = json.dumps(container, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
