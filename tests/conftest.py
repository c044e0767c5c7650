import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path


os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")
# no test reaches a network: hubs answer from their caches at once instead of timing out
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# caches (EBV matrices, old models) go to a fresh folder, never the user's ~/.cache
os.environ["ORTHO_RUN_CACHE"] = tempfile.mkdtemp(prefix="ortho-run-test-cache-")

if os.environ.get("PYTEST_XDIST_WORKER"):
    # one worker per core: each keeps to one thread, so workers do not contend for the cores
    import torch

    torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
SHARED_NPZ = REPO.parent / "shared" / "data" / "cifar10-jpeg.npz"


_COMPOSED = {}


def compose(overrides=()):
    """Compose the real config tree in-process, as Hydra does for the CLI. A composition is
    kept per overrides and plugin registry state (a plugin registered or removed by a test
    composes anew) and each call gets its own copy."""
    import copy

    from hydra import compose as h_compose
    from hydra import initialize_config_dir

    from ortho_run.store import config_dir, register_configs, registry_generation

    register_configs()
    key = (tuple(overrides), registry_generation())
    if key not in _COMPOSED:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            _COMPOSED[key] = h_compose(config_name="config", overrides=list(overrides))
    return copy.deepcopy(_COMPOSED[key])


def run_inprocess(tmp_path, overrides=(), name="run"):
    from ortho_run.runner.run import run

    cfg = compose(["logger.mode=disabled", "trainer.progress=off", *overrides])
    summary = run(cfg, tmp_path / name)
    conforms(tmp_path / name)
    return summary


def conforms(run_dir):
    """Every run a test makes writes the summary, the metrics rows and the checkpoints that
    their readers take (``keys.parse_summary``, ``keys.parse_metrics_row``,
    ``checkpoint.FIELDS``): the producers cannot drift from the one declaration of what the
    files hold."""
    import torch

    from ortho_run import keys
    from ortho_run.checkpoint import checkpoint_errors

    summary, why = keys.read_summary(Path(run_dir) / "summary.json")
    assert summary is not None, why
    for ck in sorted((Path(run_dir) / "checkpoints").glob("*.pt")):  # as ``checkpoint.load``
        assert not checkpoint_errors(torch.load(ck, weights_only=False)), ck
    metrics = Path(run_dir) / "metrics.jsonl"
    for n, line in enumerate(metrics.read_text().splitlines() if metrics.is_file() else [], 1):
        assert keys.parse_metrics_row(json.loads(line))[0] is not None, (metrics, n, line)


def cli(args, cwd, env=None, timeout=600):
    e = {**os.environ, "WANDB_MODE": "disabled", **(env or {})}
    return subprocess.run([sys.executable, "-m", "ortho_run", *args], cwd=cwd, env=e,
                          capture_output=True, text=True, timeout=timeout)


def summaries(root):
    found = sorted(Path(root).rglob("summary.json"))
    for p in found:
        conforms(p.parent)
    return [json.loads(p.read_text()) for p in found]
