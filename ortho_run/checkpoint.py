"""Checkpoints: written atomically (temp file, fsync, rename), checked on load.

A process killed at any moment leaves ``last.pt`` either as the previous complete checkpoint
or the new complete one. ``last.pt`` carries the run's resolved config: resuming compares it with
the config of the run that resumes and refuses, listing the keys that differ, when they would
change what is learned (``trainer.resume=force`` resumes anyway and says so in the summary).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from omegaconf import OmegaConf

from ortho_run.errors import CheckpointError, described
from ortho_run.io import atomic_torch_save, remove_stale_temps
from ortho_run.keys import is_count, is_number, is_strings, shown

FORMAT = "ortho-run/1"
log = logging.getLogger("ortho_run")


def fingerprint(cfg) -> Dict[str, Any]:
    """What must match for a checkpoint to be loadable into this run."""
    return {
        "model": OmegaConf.to_container(cfg.model, resolve=True, enum_to_str=True),
        "method": OmegaConf.to_container(cfg.method, resolve=True, enum_to_str=True)["name"],
    }


#: a key that changes what is learned but may grow on resume (checked in ``check_resume``)
GROWABLE = ("trainer.max_epochs",)


def run_config(cfg) -> Dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)


def _flat(d: Any, prefix: str = "") -> Dict[str, Any]:
    if isinstance(d, dict):
        out: Dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def config_differences(saved: Dict[str, Any], cfg) -> Dict[str, tuple]:
    """``{key: (checkpoint value, this run's value)}`` for the keys that change what is
    learned (``ortho_run.store.effect_of``). The checkpoint's config is read as today's schemas
    read it: a key added since (at its default) is no difference."""
    from ortho_run.config import LEARNED
    from ortho_run.store import effect_of, upgraded

    a, b = _flat(upgraded(saved)), _flat(run_config(cfg))
    free = lambda k: k in GROWABLE or effect_of(k) != LEARNED  # noqa: E731
    missing = object()
    diff = {k: (a.get(k, missing), b.get(k, missing)) for k in sorted(set(a) | set(b))
            if not free(k) and a.get(k, missing) != b.get(k, missing)}
    # another plugin (method=..., optim=...): its name says it; its own keys follow from it
    swapped = [k[:-len(".name")] for k in diff if k.endswith(".name") and k.count(".") == 1]
    return {k: v for k, v in diff.items()
            if not any(k.startswith(g + ".") and k != g + ".name" for g in swapped)}


def growable_differences(saved: Dict[str, Any], cfg) -> Dict[str, tuple]:
    """``{key: (checkpoint value, this run's value)}`` for the ``GROWABLE`` keys that differ
    (the resume check lets them)."""
    a, b = _flat(saved), _flat(run_config(cfg))
    return {k: (a.get(k), b.get(k)) for k in GROWABLE if a.get(k) != b.get(k)}


def describe_differences(diff: Dict[str, tuple]) -> str:
    def show(v):
        plain = (str, int, float, bool, list, dict, type(None))
        return json.dumps(v) if isinstance(v, plain) else "(absent)"

    return "; ".join(f"{k}={show(b)} (checkpoint: {show(a)})" for k, (a, b) in diff.items())


def _counter(v) -> bool:
    return is_count(v) and v >= 0


def _tensors(v) -> bool:
    return isinstance(v, dict) and all(isinstance(k, str) and isinstance(t, torch.Tensor)
                                       for k, t in v.items())


def _optimizer_states(v) -> bool:
    return isinstance(v, list) and all(
        isinstance(o, dict) and isinstance(o.get("state"), dict)
        and isinstance(o.get("param_groups"), list)
        and all(isinstance(g, dict) for g in o["param_groups"]) for o in v)


def _sums(v) -> bool:
    return (isinstance(v, dict) and all(isinstance(k, str) and is_number(x) for k, x in v.items())
            and (not v or "_n" in v))


def _rng(v) -> bool:
    def generator(t) -> bool:
        return isinstance(t, torch.Tensor) and t.dtype == torch.uint8
    return (isinstance(v, dict) and isinstance(v.get("python"), tuple)
            and isinstance(v.get("numpy"), tuple) and generator(v.get("torch"))
            and (isinstance(v.get("cuda", []), (list, tuple))
                 and all(generator(t) for t in v.get("cuda", []))))


def _dim(v) -> bool:
    return is_count(v) and v >= 1


def _net_spec(v) -> bool:
    """The net spec (``assemble.NetSpec.to_dict``): empty, or the images' channels and size,
    the classes, the backbone's output dim and a compatibility method's old-model shape."""
    if not isinstance(v, dict):
        return False
    if not v:
        return True
    compat = v.get("compat")
    return (all(_dim(v.get(k)) for k in ("channels", "image_size", "num_classes"))
            and (v.get("embed_dim") is None or _dim(v["embed_dim"]))
            and (compat is None or (isinstance(compat, dict)
                                    and _dim(compat.get("old_dim"))
                                    and _dim(compat.get("num_old_classes"))
                                    and compat.get("old_head_bias") in (None, True, False))))


#: what a checkpoint (``Trainer.state_dict``) holds, for its one reader (``load``): per key,
#: whether every checkpoint has it (the others are absent in those of earlier versions), what
#: it must hold and how that is said
FIELDS: Dict[str, Tuple[bool, Callable[[Any], bool], str]] = {
    "net": (True, _tensors, "a state dict (names to tensors)"),
    "optimizers": (True, _optimizer_states, "a list of optimiser state dicts"),
    "schedulers": (True, lambda v: isinstance(v, list), "a list"),
    **{k: (True, _counter, "an integer >= 0") for k in ("epoch", "batch", "step")},
    "sums": (True, _sums, "the partial epoch's sums (names to numbers, with _n when not empty)"),
    "best": (True, lambda v: v is None or is_number(v), "a number or null"),
    "history": (True, lambda v: isinstance(v, list) and all(isinstance(r, dict) for r in v),
                "a list of metrics rows"),
    "rng": (True, _rng, "the random states (python, numpy, torch and optionally cuda)"),
    "train_s": (False, lambda v: is_number(v) and v >= 0, "a number of seconds >= 0"),
    "optimizer_kinds": (False, is_strings, "a list of strings"),
    "earlier_models": (False, lambda v: v is None or is_strings(v), "a list of strings or null"),
    "world_size": (False, lambda v: is_count(v) and v >= 1, "an integer >= 1"),
    "config": (False, lambda v: isinstance(v, dict), "the run's config (a mapping)"),
    "fingerprint": (True, lambda v: isinstance(v, dict), "a mapping"),
    "shape": (False, _net_spec, "the net spec (channels, image_size, num_classes: integers "
                                ">= 1; embed_dim; compat)"),
}


def checkpoint_errors(state: Dict[str, Any]) -> List[str]:
    """One line per key of ``state`` that is missing or does not hold what it must."""
    return [f"{k} is missing" if k not in state else f"{k} must be {what}, not {shown(state[k])}"
            for k, (required, check, what) in FIELDS.items()
            if (k in state and not check(state[k])) or (required and k not in state)]


def nonfinite_tensors(tensors: Dict[str, Any]) -> List[str]:
    """The names of the floating-point tensors of ``tensors`` (a state dict) that hold a NaN or
    an infinity, read with one host sync."""
    named = [(k, v) for k, v in tensors.items()
             if isinstance(v, torch.Tensor) and v.is_floating_point() and v.numel()]
    if not named:
        return []
    finite = torch.stack([torch.isfinite(v).all() for _, v in named]).tolist()
    return [k for (k, _), ok in zip(named, finite) if not ok]


def describe_names(names: List[str], first: int = 3) -> str:
    """The ``first`` names, then how many more there are."""
    more = f" and {len(names) - first} more" if len(names) > first else ""
    return ", ".join(names[:first]) + more


def save(path: Path, state: Dict[str, Any]) -> None:
    """Atomic write, then remove the temp files of writers that were killed mid-write."""
    state = dict(state, format=FORMAT)
    atomic_torch_save(state, path)
    remove_stale_temps(path)


def resolve_resume(spec: str, run_dir: Path) -> Optional[Path]:
    """``none`` -> None; ``auto``/``force`` -> run_dir's last.pt if present; else a run dir or a
    file."""
    spec = str(spec)
    if spec in ("none", "", "null", "false"):
        return None
    if spec in ("auto", "force"):
        p = run_dir / "checkpoints" / "last.pt"
        return p if p.is_file() else None
    p = Path(spec).expanduser()
    if p.is_dir():
        p = p / "checkpoints" / "last.pt"
    if not p.is_file():
        raise CheckpointError(f"trainer.resume={spec}: no checkpoint at {p}. Give a run dir "
                              f"holding checkpoints/last.pt, a .pt file, trainer.resume=auto or "
                              f"none.")
    return p


def load(path: Path, map_location="cpu") -> Dict[str, Any]:
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:
        raise CheckpointError(f"{path} cannot be read as a checkpoint ("
                              f"{described(exc)}). It is truncated "
                              f"or not an ortho-run checkpoint; move it away (or set "
                              f"trainer.resume=none to start over in this run dir).") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an ortho-run checkpoint (format "
                              f"{state.get('format') if isinstance(state, dict) else type(state).__name__!r}).")
    start_over = ("start over (trainer.resume=none; delete the run dir if it is a cache entry "
                  "of an earlier model)")
    errors = checkpoint_errors(state)
    if errors:
        raise CheckpointError(f"{path} is not a checkpoint this version can continue from or "
                              f"rebuild a net of: {'; '.join(errors)}. It was written by other "
                              f"code or changed since; resume from another checkpoint, or "
                              f"{start_over}.")
    bad = nonfinite_tensors(state["net"])
    if bad:
        raise CheckpointError(f"{path} holds non-finite weights ({describe_names(bad)}): the "
                              f"run that wrote it had diverged, so nothing continued from it or "
                              f"compared with it would mean anything. Resume from an earlier "
                              f"checkpoint, or {start_over}.")
    return state


def check_resume(path: Path, state: Dict[str, Any], cfg,
                 earlier_models: Optional[List[str]] = None,
                 world_size: int = 1) -> Dict[str, tuple]:
    """Refuse to resume ``state`` under ``cfg`` when that would continue another experiment:
    another config, (a compatibility run, ``earlier_models`` given) other earlier models than
    the checkpoint's, or another number of data-parallel processes (``world_size``). Returns
    the differences accepted by ``trainer.resume=force`` (empty when none)."""
    saved = state.get("config")
    if saved is None:  # a checkpoint from before configs were stored: model and method only
        want, got = fingerprint(cfg), state.get("fingerprint")
        if got != want:
            raise CheckpointError(
                f"{path} was written by another model or method: checkpoint has "
                f"{json.dumps(got, sort_keys=True)}, this run has "
                f"{json.dumps(want, sort_keys=True)}. Resume with the config it was trained with "
                f"(its run dir's resolved_config.yaml) or start a fresh run dir.")
        return {}
    diff = config_differences(saved, cfg)
    if diff:
        _unless_forced(
            cfg, f"{path} was written by a run with another config, so resuming it would "
            f"continue another experiment. Differences: {describe_differences(diff)}. Rerun "
            f"with the checkpoint's config (its run dir's resolved_config.yaml), give this run "
            f"another hydra.run.dir (or trainer.resume=none to start over in this dir), or set "
            f"trainer.resume=force to continue anyway (summary.json records it).")
    saved_models = state.get("earlier_models")  # absent in checkpoints of earlier versions
    if (earlier_models is not None and saved_models is not None
            and list(saved_models) != list(earlier_models)):
        # a key that may differ on resume (a grown trainer.max_epochs) enters their configs:
        # they train with this run's trainer settings
        grown = describe_differences(growable_differences(saved, cfg)) or "its config"
        _unless_forced(
            cfg, f"{path} was trained against other earlier models than this run would use: "
            f"{grown} enters the configs of the models it is made compatible with (they "
            f"train with this run's trainer settings), so it would continue against others "
            f"({', '.join(earlier_models)}; checkpoint: {', '.join(saved_models)}). Resume "
            f"with the checkpoint's value, give the old model as compat.old_ckpt, or set "
            f"trainer.resume=force to continue anyway")
        diff = dict(diff, **{"compat.earlier_models": (list(saved_models),
                                                         list(earlier_models))})
    ranks_then = state.get("world_size")  # absent in checkpoints of earlier versions
    if ranks_then is not None and ranks_then != world_size:
        _unless_forced(
            cfg, f"{path} was written by a run of {ranks_then} data-parallel process(es), this "
            f"one has {world_size}: each process reads batches of data.batch_size images of "
            f"its own, so an epoch's steps, the schedule and the random state would not "
            f"continue it. Resume it with {ranks_then} process(es) (the command its stop "
            f"printed), or set trainer.resume=force to continue anyway (summary.json "
            f"records it); a cache entry of an earlier model that stopped so can be "
            f"deleted to train it again")
        diff = dict(diff, world_size=(ranks_then, world_size))
    if state.get("epoch", 0) > cfg.trainer.max_epochs:
        raise CheckpointError(
            f"{path} is at epoch {state['epoch']}, beyond trainer.max_epochs="
            f"{cfg.trainer.max_epochs}: a resumed run may train longer, not shorter. Set "
            f"trainer.max_epochs>={state['epoch']} or start another run dir.")
    return diff


def _unless_forced(cfg, why: str) -> None:
    """Refuse the resume for ``why`` unless ``trainer.resume=force`` accepts it (the caller
    records what it accepted)."""
    if str(cfg.trainer.resume) != "force":
        raise CheckpointError(why)


@dataclass
class ResumePoint:
    """A checkpoint this run may continue from: its path, its state, and the config
    differences ``trainer.resume=force`` accepted (empty when none)."""

    path: Path
    state: Dict[str, Any]
    forced: Dict[str, tuple]


def resume_point(cfg, run_dir: Path, earlier_models: Optional[List[str]] = None,
                 world_size: int = 1) -> Optional[ResumePoint]:
    """``trainer.resume`` resolved, the checkpoint loaded and checked against ``cfg``, the
    earlier models a compatibility run trains against and the number of processes (None when
    the run starts fresh). A forced resume says here what it accepted."""
    path = resolve_resume(cfg.trainer.resume, run_dir)
    if path is None:
        return None
    state = load(path)
    forced = check_resume(path, state, cfg, earlier_models, world_size)
    if forced:
        log.warning("trainer.resume=force: resuming despite %s", describe_differences(forced))
    return ResumePoint(path, state, forced)


def config_hash(container: Any) -> str:
    blob = json.dumps(container, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
