"""Where metrics go besides the run dir's ``metrics.jsonl``: W&B (optional, never fatal) and the
progress bar."""

from __future__ import annotations

import logging
import netrc
import os
import sys
import uuid
import warnings
from pathlib import Path
from typing import Any, Dict, Optional

from omegaconf import OmegaConf

from ortho_run import naming
from ortho_run.io import cache_root

log = logging.getLogger("ortho_run")


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
                 group: Optional[str], enabled: bool = True, tags=()):
        self.run = None
        self.info: Dict[str, Any] = {"mode": "disabled"}
        self.mode = "disabled"
        if not enabled:  # nothing of cfg is read: see ``disabled``
            return
        # the config decides: logger/wandb.yaml reads WANDB_MODE as its default, so the
        # environment counts unless the user set logger.mode (or logger=none) explicitly
        self.mode = str(cfg.mode)
        if self.mode == "disabled":
            return
        try:
            import wandb
        except ImportError:
            self._warn("wandb is not installed (pip install wandb); W&B logging off")
            return
        self.wandb = wandb
        if self.mode == "online" and not _have_wandb_key():
            self._warn("logger.mode=online but no W&B API key found (WANDB_API_KEY or "
                       "~/.netrc): logging offline instead; `wandb sync` uploads it later")
            self.mode = "offline"
        # one experiment is one W&B run: a resumed run continues the W&B run of its run dir
        id_file = Path(run_dir) / "wandb" / "ortho-run-id"
        try:
            run_id = id_file.read_text().strip() or None
        except OSError:
            run_id = None
        all_tags = list(dict.fromkeys([*cfg.tags, *tags]))[:64]
        kw = dict(project=cfg.project, entity=cfg.entity, group=group, name=name,
                  tags=[t[:64] for t in all_tags] or None, config=config, dir=str(run_dir),
                  reinit="finish_previous", resume="allow",
                  id=run_id or uuid.uuid4().hex[:12])
        for mode in dict.fromkeys([self.mode, "offline"]):
            try:
                self.run = wandb.init(mode=mode, settings=wandb.Settings(
                    init_timeout=cfg.init_timeout, silent=True), **kw)
                if mode != self.mode:
                    self._warn(f"W&B {self.mode} init failed; logging offline instead")
                self.mode = mode
                try:
                    id_file.parent.mkdir(parents=True, exist_ok=True)
                    id_file.write_text(self.run.id)
                except OSError:
                    pass
                self.info = {"mode": mode, "id": self.run.id,
                             "dir": str(getattr(self.run.settings, "sync_dir", "") or ""),
                             "url": getattr(self.run, "url", None) if mode == "online" else None}
                return
            except Exception as exc:  # network, auth, service start
                err = exc
        self._warn(f"W&B could not start ({type(err).__name__}: {err}); W&B logging off")

    @classmethod
    def disabled(cls) -> "WandbSink":
        """A sink that logs nothing (before a run is accepted, and on ranks other than 0)."""
        return cls(None, Path(), {}, "", None, enabled=False)

    @classmethod
    def for_run(cls, cfg, run_dir: Path, facts: Dict[str, Any],
                sweep: Optional[Dict[str, Any]], enabled: bool) -> "WandbSink":
        """A run's sink: its resolved config with the run's facts, a name and tags from the
        overrides that define it, the sweep as its group."""
        overrides = list((sweep or {}).get("overrides", []))
        name, tags = naming.job_name(cfg, sweep), naming.relevant_overrides(overrides)
        container = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
        container["cache_dir"] = str(cache_root(cfg.cache_dir))
        container["run"] = {k: facts.get(k) for k in ("git_commit", "git_dirty", "versions",
                                                       "world_size", "tag")}
        container["run"]["overrides"] = overrides
        return cls(cfg.logger, run_dir, container, name,
                   cfg.logger.group or (sweep or {}).get("sweep"), enabled=enabled, tags=tags)

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
        try:  # numbers and strings; lists and dicts (overrides, versions) are in the config
            self.run.summary.update(wandb_summary(values))
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


class RunProgress:
    """One bar for the whole run (epoch k/N, overall ETA, running loss) on a TTY, or when
    forced; silent otherwise. While it shows, the plain per-epoch log lines stay off the
    console (they still go to run.log)."""

    def __init__(self, mode: str, epochs: int, batches: int, epoch: int, batch: int = 0):
        on = mode == "on" or (mode == "auto" and sys.stderr.isatty())
        self.bar = None
        self.epochs = epochs
        self._filter = None
        if on:
            from tqdm import tqdm

            self.bar = tqdm(total=epochs * batches, initial=epoch * batches + batch,
                            desc=f"epoch {epoch + 1}/{epochs}", dynamic_ncols=True,
                            unit="batch", smoothing=0.1)
            self._filter = _EpochLineFilter()
            for h in _console_handlers():
                h.addFilter(self._filter)

    @property
    def on(self) -> bool:
        return self.bar is not None

    def epoch(self, k: int) -> None:
        if self.bar is not None:
            self.bar.set_description(f"epoch {k + 1}/{self.epochs}", refresh=False)

    def update(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def loss(self, value: float) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(f"loss {value:.4g}", refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        for h in _console_handlers():
            h.removeFilter(self._filter)


class _EpochLineFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(record, "epoch_row", False)


def _console_handlers():
    seen = []
    for lg in (logging.getLogger(), logging.getLogger("ortho_run")):
        for h in lg.handlers:
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
                seen.append(h)
    return seen


def wandb_summary(values: Dict[str, Any]) -> Dict[str, Any]:
    """The numbers and strings of a summary, with each matrix (a list of rows of numbers, such
    as ``compat/steps/cmc1``) flattened to ``<key>/<row>_<column>`` entries."""
    out = {}
    for k, v in values.items():
        if isinstance(v, (int, float, str)):
            out[k] = v
        elif isinstance(v, list) and v and all(isinstance(r, list) for r in v):
            out.update({f"{k}/{i}_{j}": x for i, row in enumerate(v) for j, x in enumerate(row)
                        if isinstance(x, (int, float)) and not isinstance(x, bool)})
    return out
