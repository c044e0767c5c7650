"""User-facing errors: one paragraph saying what is wrong and what to do, no traceback wall."""

from __future__ import annotations

import contextlib

# Process exit codes (documented in README "Guarantees").
EXIT_USER_ERROR = 2  # bad config, data, checkpoint or output dir
EXIT_DIVERGED = 3  # non-finite loss; last good checkpoint kept
EXIT_PREEMPTED = 75  # SIGTERM/SIGINT: consistent last.pt written; rerun with trainer.resume=auto
EXIT_SWEEP_FAILED = 4  # a multirun in which at least one job failed


def first_line(exc: BaseException, limit: int = 300, empty: str | None = None) -> str:
    """The first non-empty line of ``exc``'s message (at most ``limit`` characters), for the
    one paragraph an error shows; an exception without a message (EOFError()) gives ``empty``,
    by default its type's name."""
    line = next((ln for ln in str(exc).splitlines() if ln.strip()), None)
    if line is None:
        return type(exc).__name__ if empty is None else empty
    return line[:limit]


def described(exc: BaseException, limit: int = 300) -> str:
    """``exc`` as an error paragraph names it: its type and its message's first line
    (``ParserError: while parsing a flow node``), its type alone when it has no message."""
    line = first_line(exc, limit, empty="")
    return f"{type(exc).__name__}: {line}" if line else type(exc).__name__


def refusal(exc: BaseException) -> str:
    """One paragraph for a config that cannot be composed or built (an ortho-run or a Hydra
    error): the error, and what it names (the full key of a wrong value; the options of a
    group that has no such option), without Hydra's config search path."""
    text = str(exc).split("\nConfig search path")[0].strip() or type(exc).__name__
    cause = exc.__cause__
    if cause is not None:
        text += f": {first_line(cause, 1000)}" + "".join(
            f" ({ln.strip()})" for ln in str(cause).splitlines()[1:]
            if ln.strip().startswith("full_key"))
    return " ".join(text.split())


@contextlib.contextmanager
def stops_with(message: str):
    """A tool's stop (Ctrl-C, or SIGTERM, which it takes as Ctrl-C): ``message`` on stderr and
    exit 130, not a traceback; the work inside unwinds first (its ``finally`` blocks, a pool's
    shutdown). The previous SIGTERM handler is back afterwards."""
    import signal
    import sys
    import threading

    def stop(signum, frame):
        raise KeyboardInterrupt

    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, stop) if main else None
    try:
        yield
    except KeyboardInterrupt:
        print(message, file=sys.stderr)
        sys.exit(130)
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)


class OrthoRunError(Exception):
    """An error the user can fix. The message names the key/file and the remedy."""

    exit_code = EXIT_USER_ERROR


class ConfigError(OrthoRunError):
    pass


class DataError(OrthoRunError):
    pass


class CheckpointError(OrthoRunError):
    pass


class DiskFull(OrthoRunError):
    """No space left while writing a file (a checkpoint, the summary, a cache entry)."""


class TrainingDiverged(OrthoRunError):
    exit_code = EXIT_DIVERGED


class Preempted(OrthoRunError):
    exit_code = EXIT_PREEMPTED
