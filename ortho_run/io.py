"""Small I/O helpers shared by the runner, methods and caches: atomic writes, cache paths."""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Dict, Iterator, Optional

import torch

from ortho_run.errors import DiskFull


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


_UMASK: Optional[int] = None


def file_mode() -> int:
    """The mode a plain ``open()`` gives a new file under this process's umask."""
    global _UMASK
    if _UMASK is None:
        _UMASK = os.umask(0o022)
        os.umask(_UMASK)
    return 0o666 & ~_UMASK


NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def _no_space(exc: BaseException) -> bool:
    if isinstance(exc, OSError) and exc.errno in NO_SPACE:
        return True
    # torch.save reports a failed write as a RuntimeError from its zip writer
    return isinstance(exc, RuntimeError) and "file write failed" in str(exc)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path in the same folder; on success fsync it and rename it over ``path``.

    A reader (or a process killed at any moment) sees either the old complete file or the new
    complete file, never a partial one. The temp file's name carries the writer's pid (so
    ``remove_stale_temps`` only removes those of dead writers) and the final file gets the mode
    a plain ``open()`` would give it. A full disk is a ``DiskFull`` error naming the file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp",
                               dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException as exc:
        if _no_space(exc):
            raise DiskFull(f"no space left writing {path}: free space on that disk (or point "
                           f"output_root / cache_dir elsewhere), then rerun the same command to "
                           f"resume") from None
        raise
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def remove_stale_temps(path: Path) -> None:
    """Remove temp files of ``atomic_path`` for ``path`` left by writers that no longer run
    (a process killed mid-write); a live writer's file is left alone."""
    for stale in Path(path).parent.glob(f".{Path(path).name}.*.tmp"):
        parts = stale.name[len(Path(path).name) + 2:].split(".")
        pid = int(parts[0]) if parts and parts[0].isdigit() else None
        if pid is not None and pid != os.getpid() and _alive(pid):
            continue
        stale.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def _json_default(o):
    if hasattr(o, "item"):
        return o.item()
    return str(o)


def _clean(o):
    """NaN/inf are not JSON: store them as strings so every reader can parse the file."""
    if isinstance(o, float) and not math.isfinite(o):
        return str(o)
    if isinstance(o, dict):
        return {k: _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    return o


def dumps(obj: Any) -> str:
    return json.dumps(_clean(obj), default=_json_default, sort_keys=False)


def atomic_write_texts(files: Dict[Path, str]) -> None:
    """Each ``{path: text}`` written atomically, in order."""
    for path, text in files.items():
        with atomic_path(path) as tmp:
            tmp.write_text(text)


def atomic_write_json(obj: Any, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(_clean(obj), default=_json_default, indent=2) + "\n")


def cache_root(cache_dir: str) -> Path:
    return Path(os.path.expanduser(os.path.expandvars(cache_dir)))


def unwritable(folder: Path) -> Optional[str]:
    """Why no file can be written in ``folder``, or None: it is created (with its parents) and
    a probe file is written and removed there. A part of the path that is a file is named."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test.{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        blocking = next((p for p in (folder, *folder.parents) if p.exists()), None)
        if blocking is not None and not blocking.is_dir():
            return f"{blocking} is a file"
        return exc.strerror or str(exc)
    return None


def cache_folder(cache_dir: str, sub: str) -> Path:
    """``<cache_dir>/<sub>``, created; a clear error naming ``cache_dir`` when it cannot be."""
    from ortho_run.errors import ConfigError

    root = cache_root(cache_dir) / sub
    why = unwritable(root)
    if why:
        raise ConfigError(f"cache_dir={cache_dir}: cannot write {root} ({why}); set "
                          f"cache_dir (or ORTHO_RUN_CACHE) to a writable folder")
    return root
