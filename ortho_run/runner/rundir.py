"""The run dir's life: one process at a time, nothing written until the run is accepted, and a
refused run leaves an existing dir byte-identical (or, when it made the dir, no dir at all).
Every file of the run dir but the checkpoints is written here: the resolved config, the
metrics rows and the summary.

Hydra creates the run dir and its log file before the task starts; it writes no ``.hydra/``
files (``hydra.output_subdir`` is null in ``conf/config.yaml``): ``begin`` writes them,
with ``resolved_config.yaml``, once the pre-flight checks have passed.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from omegaconf import OmegaConf

from ortho_run.errors import ConfigError
from ortho_run.keys import parse_metrics_row
from ortho_run.io import atomic_path, atomic_write_json, atomic_write_texts, dumps

log = logging.getLogger("ortho_run")

#: what a run writes before or while it trains; restored if it is refused
TOUCHED = (".hydra/config.yaml", ".hydra/hydra.yaml", ".hydra/overrides.yaml",
           "resolved_config.yaml", "summary.json", "metrics.jsonl")
LOCK = ".ortho-run.lock"
LOG = "run.log"


class RunDirBusy(ConfigError):
    pass


class MetricsFile:
    """Append-only ``metrics.jsonl``: one JSON object per logged step/epoch."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def rows_through(self, epoch: int) -> str:
        """The file's text without the rows of epochs after ``epoch`` (a resumed run's
        checkpoint does not cover them: no duplicates) and without the lines that are no row
        (a torn last line from a hard kill; an edited one), which a warning names."""
        keep, dropped = [], []
        for n, line in enumerate(self.path.read_text(errors="replace").splitlines(), 1):
            try:
                row, errors = parse_metrics_row(json.loads(line))
            except ValueError:
                row, errors = None, ["not JSON"]
            if row is None:
                dropped.append(f"line {n}: {'; '.join(errors)}")
            elif row["epoch"] <= epoch:
                keep.append(line)
        if dropped:
            log.warning("%s: left out %d line(s) that are no metrics row (%s)", self.path,
                        len(dropped), ", ".join(dropped[:3]) + (", ..." if len(dropped) > 3 else ""))
        return "".join(k + "\n" for k in keep)

    def write(self, row: Dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(dumps(row) + "\n")


class RunDir:
    """Lock (for the run's lifetime), snapshot, the refusal path and the writes of one run dir.
    On a rank other than the main one (``enabled=False``) it writes nothing."""

    def __init__(self, path: Path, enabled: bool = True, existing: Optional[Path] = None):
        self.path = Path(path)
        self.enabled = enabled
        self.existing = Path(existing).resolve() if existing else None
        self.created = False
        self._fd: Optional[int] = None
        self._files: Dict[str, Optional[Tuple[bytes, int, Tuple[float, float]]]] = {}
        self._log_size: Optional[int] = None
        self.metrics: Optional[MetricsFile] = None

    # --- lifetime ---------------------------------------------------------------------
    def __enter__(self) -> "RunDir":
        if not self.enabled:
            return self
        p = self.path
        entries = [e for e in (os.listdir(p) if p.is_dir() else []) if e != LOCK]
        log_file = p / LOG
        self.created = not p.exists() or (entries in ([], [LOG]) and
                                          (not log_file.exists() or log_file.stat().st_size == 0))
        try:
            p.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot create the run dir {p}: {exc.strerror}") from None
        self._lock()
        for rel in TOUCHED:
            f = p / rel
            try:
                st = f.stat()
                self._files[rel] = (f.read_bytes(), st.st_mode, (st.st_atime, st.st_mtime))
            except FileNotFoundError:
                self._files[rel] = None
        self._log_size = log_file.stat().st_size if log_file.exists() else None
        return self

    def __exit__(self, *exc) -> None:
        self._unlock()

    def _lock(self) -> None:
        f = self.path / LOCK
        fd = os.open(f, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                os.close(fd)
                raise
            holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise RunDirBusy(f"the run dir {self.path} is in use by {holder}: two runs in one "
                             f"dir would mix their metrics and checkpoints. Wait for it to end, "
                             f"or give this run another hydra.run.dir.") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"process {os.getpid()} on {os.uname().nodename}".encode())
        self._fd = fd

    def _unlock(self) -> None:
        if self._fd is None:
            return
        try:
            (self.path / LOCK).unlink(missing_ok=True)
        except OSError:
            pass
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    # --- outcomes ---------------------------------------------------------------------
    def refused(self, keep_dir: bool = False) -> None:
        """Undo every trace of a run that never started training. A dir this run created is
        removed (unless ``keep_dir``: a sweep job keeps it for its failure summary); an existing
        one gets its files back byte for byte and its log truncated to its old length."""
        if not self.enabled:
            return
        if self.created and not keep_dir:
            self._unlock()
            shutil.rmtree(self.path, ignore_errors=True)
            parent = self.path.resolve().parent
            while self.existing and parent != self.existing and self.existing in parent.parents:
                try:
                    parent.rmdir()  # only if empty: made for this run by Hydra
                except OSError:
                    break
                parent = parent.parent
            return
        for rel, saved in self._files.items():
            f = self.path / rel
            if saved is None:
                f.unlink(missing_ok=True)
                continue
            data, mode, times = saved
            try:
                if not f.exists() or f.read_bytes() != data:
                    with atomic_path(f) as tmp:
                        tmp.write_bytes(data)
                os.chmod(f, mode & 0o7777)
                os.utime(f, times)
            except OSError as exc:  # pragma: no cover - a full disk at this point
                log.error("could not restore %s: %s", f, exc)
        hydra_dir = self.path / ".hydra"
        if hydra_dir.is_dir() and not any(hydra_dir.iterdir()):
            hydra_dir.rmdir()
        log_file = self.path / LOG
        if self._log_size is not None and log_file.exists():
            with open(log_file, "r+b") as fh:
                fh.truncate(self._log_size)

    def config_files(self, cfg) -> Dict[Path, str]:
        """``resolved_config.yaml`` and, under Hydra, ``.hydra/{config,hydra,overrides}.yaml``."""
        files = {self.path / "resolved_config.yaml": OmegaConf.to_yaml(cfg, resolve=True)}
        try:
            from hydra.core.hydra_config import HydraConfig

            if not HydraConfig.initialized():
                return files
            hc = HydraConfig.get()
        except Exception:  # pragma: no cover - not under Hydra
            return files
        hydra_dir = self.path / ".hydra"
        files[hydra_dir / "config.yaml"] = OmegaConf.to_yaml(cfg)
        files[hydra_dir / "hydra.yaml"] = OmegaConf.to_yaml(OmegaConf.create({"hydra": hc}))
        files[hydra_dir / "overrides.yaml"] = OmegaConf.to_yaml(hc.overrides.task)
        return files

    def begin(self, cfg, summary: Dict[str, Any], resumed_epoch: Optional[int] = None) -> None:
        """The run is accepted: its first summary (a stale one never outlives this run's start),
        its config and its metrics file (on resume, cut back to the rows of the checkpoint's
        epochs)."""
        if not self.enabled:
            return
        self.metrics = MetricsFile(self.path / "metrics.jsonl")
        files = self.config_files(cfg)
        if resumed_epoch is not None and self.metrics.path.is_file():
            files[self.metrics.path] = self.metrics.rows_through(resumed_epoch)
        self.write_summary(summary)
        atomic_write_texts(files)

    def write_metrics(self, row: Dict[str, Any]) -> None:
        if self.metrics is not None:
            self.metrics.write(row)

    def write_summary(self, summary: Dict[str, Any]) -> None:
        """summary.json, atomically; on a full disk, at least no stale status survives."""
        if not self.enabled:
            return
        f = self.path / "summary.json"
        try:
            atomic_write_json(summary, f)
        except OSError as exc:
            log.error("could not write %s: %s", f, exc)
            try:  # a few bytes in place of the old file: its "finished" must not stand
                f.unlink(missing_ok=True)
                f.write_text(dumps({"status": summary.get("status"), "error": str(
                    summary.get("error") or f"the full summary could not be written ({exc})")}))
            except OSError:
                pass
