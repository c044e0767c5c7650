"""Where metrics go: ``metrics.jsonl`` (always), W&B (optional, never fatal), the progress bar."""

from __future__ import annotations

import json
import logging
import netrc
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Dict, Optional

from ortho_run.io import atomic_path, dumps

log = logging.getLogger("ortho_run")


class MetricsFile:
    """Append-only ``metrics.jsonl``: one JSON object per logged step/epoch."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def truncate_after(self, epoch: int) -> None:
        """On resume: drop rows of epochs the checkpoint does not cover (no duplicates)."""
        if not self.path.is_file():
            return
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a torn last line from a hard kill
            if row.get("epoch", 0) <= epoch:
                keep.append(line)
        with atomic_path(self.path) as tmp:
            tmp.write_text("".join(k + "\n" for k in keep))

    def write(self, row: Dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(dumps(row) + "\n")


def _have_wandb_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("//")[-1]
        return netrc.netrc().authenticators(host.split("/")[0]) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


class WandbSink:
    """A W&B run that can never kill training: every failure turns it off with one warning."""

    def __init__(self, cfg, run_dir: Path, config: Dict[str, Any], name: str,
                 group: Optional[str], enabled: bool = True):
        self.run = None
        # the config decides: logger/wandb.yaml reads WANDB_MODE as its default, so the
        # environment counts unless the user set logger.mode (or logger=none) explicitly
        self.mode = str(cfg.mode)
        if not enabled or self.mode == "disabled":
            return
        try:
            import wandb
        except ImportError:
            self._warn("wandb is not installed (pip install 'ortho-run[wandb]'); W&B logging off")
            return
        self.wandb = wandb
        if self.mode == "online" and not _have_wandb_key():
            self._warn("logger.mode=online but no W&B API key found (WANDB_API_KEY or "
                       "~/.netrc): logging offline instead; `wandb sync` uploads it later")
            self.mode = "offline"
        kw = dict(project=cfg.project, entity=cfg.entity, group=group, name=name,
                  tags=list(cfg.tags) or None, config=config, dir=str(run_dir),
                  reinit="finish_previous")
        for mode in dict.fromkeys([self.mode, "offline"]):
            try:
                self.run = wandb.init(mode=mode, settings=wandb.Settings(
                    init_timeout=cfg.init_timeout, silent=True), **kw)
                if mode != self.mode:
                    self._warn(f"W&B {self.mode} init failed; logging offline instead")
                self.mode = mode
                return
            except Exception as exc:  # network, auth, service start
                err = exc
        self._warn(f"W&B could not start ({type(err).__name__}: {err}); W&B logging off")

    @staticmethod
    def _warn(msg: str) -> None:
        log.warning(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)

    def log(self, row: Dict[str, Any], step: Optional[int] = None) -> None:
        if self.run is None:
            return
        try:
            self.run.log(row, step=step)
        except Exception as exc:
            self._warn(f"W&B log failed ({type(exc).__name__}: {exc}); W&B logging off")
            self.run = None

    def summary(self, values: Dict[str, Any]) -> None:
        if self.run is None:
            return
        try:
            self.run.summary.update(values)
        except Exception as exc:
            self._warn(f"W&B summary failed ({exc})")

    def finish(self, exit_code: int = 0) -> None:
        if self.run is None:
            return
        try:
            self.run.finish(exit_code=exit_code)
        except Exception as exc:
            self._warn(f"W&B finish failed ({exc})")
        self.run = None


class Progress:
    """tqdm bar on a TTY (or when forced), silent otherwise."""

    def __init__(self, mode: str, total: int, desc: str):
        on = mode == "on" or (mode == "auto" and sys.stderr.isatty())
        self.bar = None
        if on:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)

    def update(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
