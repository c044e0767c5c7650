"""User-facing errors: one paragraph saying what is wrong and what to do, no traceback wall."""

from __future__ import annotations

# Process exit codes (documented in README "Guarantees").
EXIT_USER_ERROR = 2  # bad config, data, checkpoint or output dir
EXIT_DIVERGED = 3  # non-finite loss; last good checkpoint kept
EXIT_PREEMPTED = 75  # SIGTERM/SIGINT: consistent last.pt written; rerun with trainer.resume=auto
EXIT_SWEEP_FAILED = 4  # a multirun in which at least one job failed


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
