"""Faults and bad input: nothing lost, every failure explained."""

import json
import os
import random
import signal
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import cli, compose, run_inprocess
from ortho_run.errors import EXIT_DIVERGED, EXIT_PREEMPTED, CheckpointError, OrthoRunError

METRICS = ("test/acc1", "test/acc5", "test/loss", "train/loss")
# digits, 512 training images, 8 batches an epoch, deterministic: identical metrics on resume
BASE = ["experiment=smoke", "trainer.deterministic=true", "trainer.max_epochs=6",
        "trainer.progress=off", "logger.mode=disabled"]


def _start(run_dir, extra=()):
    env = dict(os.environ, WANDB_MODE="disabled", PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "ortho_run", *BASE, *extra,
                             f"hydra.run.dir={run_dir}"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _rows(run_dir):
    f = Path(run_dir) / "metrics.jsonl"
    return f.read_text().splitlines() if f.is_file() else []


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    d = tmp_path_factory.mktemp("ref")
    r = cli([*BASE, f"hydra.run.dir={d}/run"], cwd=d)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads((d / "run" / "summary.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_preemption_checkpoints_and_resume_matches_uninterrupted(tmp_path, reference, sig):
    run_dir = tmp_path / "run"
    p = _start(run_dir, ["trainer.max_epochs=6", "data.max_train_samples=1024"])
    t0 = time.time()
    while len(_rows(run_dir)) < 2 and time.time() - t0 < 120 and p.poll() is None:
        time.sleep(0.02)
    p.send_signal(sig)
    out, err = p.communicate(timeout=120)
    assert p.returncode == EXIT_PREEMPTED, err[-2000:]
    s = json.loads((run_dir / "summary.json").read_text())
    assert s["status"] == "preempted"
    ck = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=False)
    assert ck["epoch"] >= 2
    # the printed command, run exactly as printed, continues this run in this dir
    cmd = shlex.split(err.split("Resume with: ")[1].splitlines()[0])
    assert cmd[0] == "ortho-run" and f"hydra.run.dir={run_dir}" in cmd
    assert s["resume_command"] == err.split("Resume with: ")[1].splitlines()[0]
    r = cli(cmd[1:], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    full = cli([*BASE, "data.max_train_samples=1024", f"hydra.run.dir={tmp_path}/full"],
               cwd=tmp_path)
    assert full.returncode == 0
    a = json.loads((run_dir / "summary.json").read_text())
    b = json.loads((tmp_path / "full" / "summary.json").read_text())
    assert {k: a[k] for k in METRICS} == {k: b[k] for k in METRICS}
    epochs = [json.loads(l)["epoch"] for l in _rows(run_dir)]
    assert epochs == list(range(1, 7))


KILL_TRIALS = int(os.environ.get("ORTHO_RUN_KILL_TRIALS", "8"))


@pytest.mark.slow
def test_sigkill_at_random_moments_never_loses_a_checkpoint(tmp_path, reference):
    """Kill a real run many times at random points (checkpoint writes included: one a epoch)."""
    from ortho_run.checkpoint import load

    rng = random.Random(1234)
    run_dir = tmp_path / "run"
    extra = ["trainer.resume=auto"]
    epochs_seen = []
    for trial in range(KILL_TRIALS):
        p = _start(run_dir, extra)
        time.sleep(rng.uniform(2.5, 6.0))  # process start is ~2.5 s; epochs are ~0.1 s
        p.kill()
        p.communicate()
        last = run_dir / "checkpoints" / "last.pt"
        if last.exists():
            epochs_seen.append(load(last)["epoch"])  # always a complete, loadable file
    r = cli([*BASE, *extra, f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    s = json.loads((run_dir / "summary.json").read_text())
    assert {k: s[k] for k in METRICS} == {k: reference[k] for k in METRICS}
    print(f"{KILL_TRIALS} SIGKILLs; checkpoint epochs seen after each: {epochs_seen}")


@pytest.fixture
def nan_at_step(monkeypatch):
    from ortho_run.methods.ce import CE

    real = CE.loss
    state = {"n": 0, "at": 12}

    def loss(self, out, batch):
        parts = real(self, out, batch)
        state["n"] += 1
        if state["n"] == state["at"]:
            parts = {k: v * float("nan") for k, v in parts.items()}
        return parts

    monkeypatch.setattr(CE, "loss", loss)
    return state


def test_a_submitit_preemption_signal_checkpoints_at_the_batch_then_is_handed_on(tmp_path,
                                                                                 monkeypatch):
    """SLURM's warning before a preemption or the time limit reaches a submitit job as
    SIGUSR2, whose handler requeues the job and exits at once: the run first checkpoints at
    the batch and writes its summary, then hands the signal to that handler."""
    from ortho_run.errors import Preempted
    from ortho_run.methods.ce import CE

    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    monkeypatch.setenv("WORLD_SIZE", "1")  # one task: nothing to adopt from SLURM's variables
    summary = tmp_path / "run" / "summary.json"
    requeued = []
    real, calls = CE.loss, {"n": 0}

    def loss(self, out, batch):
        calls["n"] += 1
        if calls["n"] == 6:
            os.kill(os.getpid(), signal.SIGUSR2)
        return real(self, out, batch)

    monkeypatch.setattr(CE, "loss", loss)
    before = signal.signal(signal.SIGUSR2, lambda s, f: requeued.append(
        (s, json.loads(summary.read_text())["status"])))
    try:
        with pytest.raises(Preempted, match="signal 12 at epoch 0, batch 6"):
            run_inprocess(tmp_path, ["experiment=smoke", "trainer.max_epochs=3"])
    finally:
        signal.signal(signal.SIGUSR2, before)
    assert requeued == [(signal.SIGUSR2, "preempted")]
    ck = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=False)
    assert (ck["epoch"], ck["batch"], ck["step"]) == (0, 6, 6)


def test_nonfinite_loss_stops_naming_step_and_keeps_last_good_checkpoint(tmp_path, nan_at_step):
    from ortho_run.errors import TrainingDiverged

    with pytest.raises(TrainingDiverged, match=r"non-finite loss at step 12 .*ce"):
        run_inprocess(tmp_path, ["experiment=smoke", "trainer.max_epochs=3",
                                 "trainer.nonfinite_check_every=5"])
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert s["status"] == "diverged" and "step 12" in s["error"]
    ck = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=False)
    assert ck["epoch"] == 1  # epoch 2 (steps 9-16) held the bad step: epoch 1's checkpoint kept
    assert all(torch.isfinite(v).all() for v in ck["net"].values() if v.is_floating_point())
    assert TrainingDiverged.exit_code == EXIT_DIVERGED


def test_nonfinite_skip_mode_skips_the_bad_step(tmp_path, nan_at_step):
    s = run_inprocess(tmp_path, ["experiment=smoke", "trainer.max_epochs=3",
                                 "trainer.on_nonfinite=skip"])
    assert s["status"] == "finished" and s["test/acc1"] > 0.5
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[1]["train/skipped_steps"] == 1


def test_an_update_to_nonfinite_weights_after_a_finite_loss_stops_before_any_checkpoint(
        tmp_path, monkeypatch):
    """The loss of epoch 2's last step (step 16) is finite; its update is not. The loss
    window cannot see it: the weights are checked before the epoch's evaluation and
    checkpoint, with ``on_nonfinite=skip`` too (no later step can undo it)."""
    from ortho_run.errors import TrainingDiverged
    from ortho_run.runner.trainer import Trainer

    real = Trainer.step

    def step(self, x, y):
        parts = real(self, x, y)
        if self.state.step == 16:
            with torch.no_grad():
                self.net.backbone.body[0].weight.fill_(float("inf"))
        return parts

    monkeypatch.setattr(Trainer, "step", step)
    for mode in ("stop", "skip"):
        with pytest.raises(TrainingDiverged,
                           match=r"non-finite weights after step 16 \(epoch 2\): "
                                 r"backbone\.body\.0\.weight"):
            run_inprocess(tmp_path, ["experiment=smoke", "trainer.max_epochs=3",
                                     f"trainer.on_nonfinite={mode}"], name=mode)
        s = json.loads((tmp_path / mode / "summary.json").read_text())
        assert s["status"] == "diverged"
        ck = torch.load(tmp_path / mode / "checkpoints" / "last.pt", weights_only=False)
        assert ck["epoch"] == 1
        assert all(torch.isfinite(v).all() for v in ck["net"].values() if v.is_floating_point())


def test_finite_weights_whose_outputs_overflow_stop_the_run_at_the_evaluation(tmp_path,
                                                                              monkeypatch):
    """Step 16 (the last) leaves the head finite but so large that the logits overflow: the
    evaluation's loss is NaN, and the run stops there, before its checkpoint."""
    from ortho_run.errors import TrainingDiverged
    from ortho_run.runner.trainer import Trainer

    real = Trainer.step

    def step(self, x, y):
        parts = real(self, x, y)
        if self.state.step == 16:
            with torch.no_grad():
                self.net.method.fc.weight.fill_(3e38)
        return parts

    monkeypatch.setattr(Trainer, "step", step)
    with pytest.raises(TrainingDiverged, match=r"non-finite evaluation loss after step 16 "
                                                r"\(epoch 2\): test/loss=nan"):
        run_inprocess(tmp_path, ["experiment=smoke", "trainer.max_epochs=2"])
    ck = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=False)
    assert ck["epoch"] == 1


def test_a_diverged_run_with_the_checks_off_reports_nan_not_a_crash_or_a_made_up_number(
        tmp_path):
    """lr 1e12 takes the weights to non-finite values with ``nonfinite_check_every=0``: the
    run finishes as asked, and the geometry and retrieval of its embeddings are NaN."""
    s = run_inprocess(tmp_path, ["experiment=smoke", "trainer.max_epochs=1", "optim=adamw",
                                 "optim.lr=1e12", "trainer.nonfinite_check_every=0",
                                 "trainer.retrieval=true"])
    assert s["status"] == "finished"
    for k in ("test/acc1", "test/acc5", "geometry/effective_rank", "geometry/intra_class_cos",
              "retrieval/cmc1", "retrieval/map"):
        assert s[k] != s[k], (k, s[k])


def test_a_checkpoint_with_nonfinite_weights_is_refused_and_left_as_it_was(tmp_path):
    run_inprocess(tmp_path, ["experiment=smoke", "trainer.max_epochs=1"], name="a")
    last = tmp_path / "a" / "checkpoints" / "last.pt"
    st = torch.load(last, weights_only=False)
    name = next(k for k, v in st["net"].items() if v.is_floating_point())
    st["net"][name] = torch.full_like(st["net"][name], float("nan"))
    torch.save(st, last)
    before = last.read_bytes()
    with pytest.raises(CheckpointError, match=rf"non-finite weights \({name}\).*diverged"):
        run_inprocess(tmp_path, ["experiment=smoke", "trainer.max_epochs=2"], name="a")
    assert last.read_bytes() == before


def test_checkpoint_from_another_method_or_a_broken_file_is_refused(tmp_path):
    run_inprocess(tmp_path, ["experiment=smoke", "trainer.max_epochs=1"], name="a")
    with pytest.raises(CheckpointError, match=r"another config.*Differences: method.name=\"opl\" \(checkpoint: \"ce\"\)\. "):
        run_inprocess(tmp_path, ["experiment=smoke", "method=opl", "trainer.max_epochs=1",
                                 f"trainer.resume={tmp_path}/a"], name="b")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot be read"):
        run_inprocess(tmp_path, ["experiment=smoke", f"trainer.resume={bad}"], name="c")
    with pytest.raises(CheckpointError, match="no checkpoint"):
        run_inprocess(tmp_path, ["experiment=smoke", f"trainer.resume={tmp_path}/nope"], name="d")


@pytest.mark.slow
def test_unwritable_output_dir_is_a_clean_error(tmp_path):
    (tmp_path / "file").write_text("x")
    r = cli(["experiment=smoke", f"output_root={tmp_path}/file/sub"], cwd=tmp_path)
    assert r.returncode == 2 and "not a folder" in r.stderr and "Traceback" not in r.stderr


def test_wandb_online_without_key_falls_back_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from ortho_run.runner.sinks import WandbSink

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    cfg = compose(["logger.mode=online"]).logger
    with pytest.warns(RuntimeWarning, match="no W&B API key"):
        sink = WandbSink(cfg, tmp_path, {"a": 1}, "t", None)
    try:
        assert sink.mode == "offline" and sink.run is not None
        sink.log({"x": 1.0}, step=1)

        class Broken:
            def log(self, *a, **k):
                raise RuntimeError("W&B service died")

            def finish(self, **k):
                raise RuntimeError("still dead")

        real, sink.run = sink.run, Broken()
        with pytest.warns(RuntimeWarning, match="W&B log failed"):
            sink.log({"x": 2.0}, step=2)  # never raises
        assert sink.run is None
        sink.run = real
    finally:
        sink.finish()
    assert list(tmp_path.glob("wandb/offline-run-*"))


@pytest.mark.slow
def test_concurrent_jobs_share_the_ebv_cache(tmp_path):
    code = ("import sys, torch; from ortho_run.methods.ebv import cached_ebv; "
            f"w = cached_ebv(30, 40, 0.002, 1e-3, 20000, 1e-4, 5, {str(tmp_path)!r}); "
            "torch.save(w, sys.argv[1])")
    ps = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path / f"w{i}.pt")])
          for i in range(3)]
    assert all(p.wait(timeout=120) == 0 for p in ps)
    ws = [torch.load(tmp_path / f"w{i}.pt") for i in range(3)]
    assert all(torch.equal(ws[0], w) for w in ws[1:])
    assert len(list((tmp_path / "ebv").glob("*.pt"))) == 1


# ------------------------------------------------------------------ config fuzzing
VALUES = {
    "method": ["ce", "cosine", "opl", "gcr", "ebv", "bogus", "bct"],
    "data.batch_size": [1, 7, 64, 0, -3, "x"],
    "data.eval_batch_size": [0, 100],
    "trainer.label_smoothing": [0.1, 1.0],
    "trainer.grad_clip": [1.0, -1.0],
    "data.classes": ["first_half", "[0,3]", "[42]", "null", "nonsense", "[]"],
    "data.val_fraction": [0.0, 0.3, 1.5, -0.1],
    "data.augment": ["none", "flip", "crop_flip", "rotate"],
    "data.max_train_samples": [16, 1, "null"],
    "optim": ["sgd", "adamw", "lbfgs"],
    "optim.scheduler": ["cosine", "multistep", "onecycle", "constant", "poly"],
    "optim.lr": [0.1, 1e-4, "abc"],
    "optim.warmup_epochs": [0, 0.5, 3],
    "trainer.max_epochs": [1, 0, "two"],
    "model.embed_dim": [8, "null", 0],
    "model": ["small_cnn", "resnet20", "vgg"],
    "method.k": [1, 3, 999],
    "method.gamma": [0.5, -1],
    "method.alpha": [0.002, 0.5, 1e-9],
    "seed": [0, 7],
    "trainer.typo_key": [1],
}


def fuzz_case(tmp_path, picks, outcomes):
    """One random combination of overrides: refused at composition, a clean error, or a run
    that finishes (counted in ``outcomes``)."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    ov = [f"{k}={VALUES[k][i % len(VALUES[k])]}" for k, i in picks.items()]
    ov = ["experiment=smoke", "trainer.max_epochs=1", "data.max_train_samples=64",
          "trainer.geometry=false", "method.gen_steps=200" if "method=ebv" in ov else "seed=0"] + ov
    try:
        cfg = compose(ov)
    except (HydraException, OmegaConfBaseException):
        outcomes["refused_at_composition"] += 1  # naming the key, before any work
        return
    try:
        from ortho_run.runner.run import run

        s = run(cfg, tmp_path / f"r{abs(hash(tuple(ov)))}")
        assert s["status"] == "finished"
        outcomes["trained"] += 1
    except OrthoRunError:
        outcomes["clean_error"] += 1  # a clean, explained error


def fuzz(tmp_path, examples):
    """``examples`` random override sets; every one must train or fail cleanly, and the fuzz
    must have reached all three outcomes."""
    from hypothesis import example, given, settings, strategies as st

    outcomes = {"refused_at_composition": 0, "clean_error": 0, "trained": 0}
    picks = st.dictionaries(st.sampled_from(sorted(VALUES)), st.integers(0, 10), max_size=5)

    # one case of each outcome for sure (optim=lbfgs, data.batch_size=0, the preset as it is),
    # then the random ones
    @settings(max_examples=examples, deadline=None, database=None)
    @given(picks)
    @example({"optim": 2})
    @example({"data.batch_size": 3})
    @example({})
    def case(p):
        fuzz_case(tmp_path, p, outcomes)

    case()
    print("config fuzz outcomes:", outcomes)
    assert all(v > 0 for v in outcomes.values()), outcomes


def test_random_overrides_train_or_fail_cleanly(tmp_path):
    # 20 cases: the 3 fixed ones and 17 random ones
    fuzz(tmp_path, int(os.environ.get("ORTHO_RUN_FUZZ_EXAMPLES", "17")))


@pytest.mark.slow
def test_many_random_overrides_train_or_fail_cleanly(tmp_path):
    fuzz(tmp_path, 100)


@pytest.mark.slow
def test_sigterm_stops_a_whole_sweep(tmp_path):
    env = dict(os.environ, WANDB_MODE="disabled")
    p = subprocess.Popen([sys.executable, "-m", "ortho_run", "-m", "experiment=smoke",
                          "seed=0,1,2", "trainer.max_epochs=40", f"output_root={tmp_path}"],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    while time.time() - t0 < 120 and p.poll() is None:
        if any(len(_rows(d.parent)) >= 2 for d in tmp_path.rglob(".hydra")):
            break
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == EXIT_PREEMPTED, err[-2000:]
    jobs = [d.parent for d in tmp_path.rglob(".hydra")]
    assert len(jobs) == 1  # the later jobs never started
    assert json.loads((jobs[0] / "summary.json").read_text())["status"] == "preempted"


WRITER = """
import sys, torch
from pathlib import Path
from ortho_run.checkpoint import save

path = Path(sys.argv[1])
big = torch.arange(10_000_000, dtype=torch.float32)  # 40 MB: writes take long enough to be hit
print("ready", flush=True)
v = 0
while True:
    v += 1
    save(path, {"version": v, "data": big + v})
"""


@pytest.mark.slow
def test_sigkill_during_checkpoint_writes_leaves_a_complete_file(tmp_path):
    """Kill a process that does nothing but write checkpoints: kills land inside writes."""
    rng = random.Random(7)
    path = tmp_path / "last.pt"
    versions = []
    for trial in range(int(os.environ.get("ORTHO_RUN_WRITE_KILLS", "6"))):
        p = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE,
                             text=True)
        assert p.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.3, 1.5))
        p.kill()
        p.wait()
        st = torch.load(path, weights_only=True)  # always complete and loadable
        assert torch.equal(st["data"][:3], torch.tensor([0.0, 1.0, 2.0]) + st["version"])
        assert float(st["data"][-1]) == 9_999_999 + st["version"]
        versions.append(st["version"])
    assert max(versions) > 1
    leftover = list(tmp_path.glob(".*.tmp"))
    assert len(leftover) <= 1  # at most the write the last kill interrupted
    print(f"write-kills: versions found after each kill {versions}; leftover temp files: "
          f"{len(leftover)}")
