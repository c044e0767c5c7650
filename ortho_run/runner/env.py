"""Device choice, seeding, determinism and the facts recorded with every run."""

from __future__ import annotations

import functools
import os
import platform
import random
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import numpy as np
import torch

from ortho_run.errors import ConfigError


def _adopt_submitit_tasks() -> None:
    """A job of several tasks started by submitit (``hydra/launcher=slurm`` or
    ``submitit_local`` with ``tasks_per_node`` > 1): its tasks are the ranks, but submitit
    describes them in its own variables (SLURM's, or its local executor's), not in those that
    torch's process group reads. Set those from them (the first task's host and a port drawn
    from the job id), once, as torchrun would have."""
    if "WORLD_SIZE" in os.environ or not os.environ.get("SUBMITIT_EXECUTOR"):
        return
    try:
        from submitit import JobEnvironment
        from submitit.helpers import TorchDistributedEnvironment

        if JobEnvironment().num_tasks <= 1:  # one task: nothing to adopt (nor a host to ask)
            return
        tasks = TorchDistributedEnvironment()
    except (ImportError, KeyError, RuntimeError):  # no submitit job after all: nothing to adopt
        return
    tasks.export(set_cuda_visible_devices=False)  # the run picks its GPU by local rank


def launch_env() -> tuple:
    """(world size, rank, local rank) as a launcher sets them in WORLD_SIZE, RANK and
    LOCAL_RANK (torchrun; for submitit's tasks, ``_adopt_submitit_tasks``); (1, 0, 0) without
    one. A value that is no such number is a ConfigError naming the variable."""
    _adopt_submitit_tasks()
    out = []
    for name, default, low in (("WORLD_SIZE", 1, 1), ("RANK", 0, 0), ("LOCAL_RANK", 0, 0)):
        text = os.environ.get(name, str(default))
        try:
            v = int(text)
        except ValueError:
            v = None
        if v is None or v < low:
            raise ConfigError(f"the environment variable {name}={text!r} must be an integer "
                              f">= {low}: it describes this process's place in a multi-process "
                              f"launch (torchrun sets it); unset it for a single process")
        out.append(v)
    world, rank, local = out
    if world > 1 and rank >= world:
        raise ConfigError(f"RANK={rank} with WORLD_SIZE={world}: RANK must be below WORLD_SIZE "
                          f"(ranks count from 0)")
    return world, rank, local


def relaunch() -> tuple:
    """(the head of a command that starts this run again as it was started, what to add when
    it cannot say it all): ``ortho-run`` for one process; a single-node torchrun's own command
    line; for another multi-process launch, ``ortho-run`` run in each of its processes."""
    world = launch_env()[0]
    if world <= 1:
        return "ortho-run", ""
    if os.environ.get("TORCHELASTIC_RUN_ID") and os.environ.get("LOCAL_WORLD_SIZE") == str(world):
        return f"torchrun --standalone --nproc_per_node={world} -m ortho_run", ""
    return "ortho-run", (f" (in each of the run's {world} processes, started the way they "
                         f"were: it trained data-parallel)")


def pick_device(spec: str) -> torch.device:
    spec = str(spec)
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cuda" and not torch.cuda.is_available():
        raise ConfigError("trainer.device=cuda but torch sees no CUDA device; use "
                          "trainer.device=auto or cpu")
    return torch.device(spec)


def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    else:
        torch.backends.cudnn.benchmark = True


def rng_state() -> dict:
    st = {"python": random.getstate(), "numpy": np.random.get_state(),
          "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


@functools.lru_cache(maxsize=None)
def _git_state() -> tuple:
    here = Path(__file__).resolve().parent
    for cwd in (here, Path.cwd()):
        try:
            sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True,
                                 text=True, timeout=5)
            if sha.returncode == 0:
                dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                       cwd=cwd, capture_output=True, text=True, timeout=5)
                return sha.stdout.strip(), bool(dirty.stdout.strip())
        except (OSError, subprocess.SubprocessError):
            continue
    return None, None


def git_commit() -> dict:
    """The commit (and whether the tracked files differed from it) of the code this process
    runs: read once, at the first run, so that every job of a sweep records the code it loaded,
    even when the checkout moves on while the sweep runs."""
    sha, dirty = _git_state()
    return {"git_commit": sha, "git_dirty": dirty}


def package_versions() -> dict:
    """The versions of the packages this process loaded (read once, as ``git_commit``)."""
    return dict(_versions())


@functools.lru_cache(maxsize=None)
def _versions() -> dict:
    out = {"python": platform.python_version()}
    for name in ("ortho-run", "torch", "torchvision", "numpy", "hydra-core", "omegaconf",
                 "scikit-learn", "wandb"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            mod = sys.modules.get(name.replace("-", "_"))
            out[name] = getattr(mod, "__version__", None)
    if out.get("ortho-run") is None:
        from ortho_run import __version__

        out["ortho-run"] = __version__
    out["cuda"] = torch.version.cuda
    return out


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"
