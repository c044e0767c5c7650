"""Data-parallel runs (torchrun, two CPU processes on gloo): the ranks take every decision
together and the evaluation is that of the whole split, as one process computes it."""

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, cli, summaries

pytestmark = pytest.mark.slow  # subprocesses under torchrun

BASE = ["experiment=smoke", "trainer.device=cpu", "trainer.progress=off"]


def launch(argv, env=None, timeout=300):
    """``argv`` (a torchrun command line without its ``torchrun``) with this interpreter."""
    e = dict(os.environ, WANDB_MODE="disabled", OMP_NUM_THREADS="1",
             PYTHONPATH=os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]),
             **(env or {}))
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", *argv], env=e,
                          capture_output=True, text=True, timeout=timeout)


def torchrun(args, run_dir, script=None, env=None, timeout=300):
    """``torchrun --standalone --nproc_per_node=2`` of ortho-run (or of ``script``)."""
    target = [str(script)] if script else ["-m", "ortho_run"]
    return launch(["--standalone", "--nproc_per_node=2", *target, *BASE, *args,
                   f"hydra.run.dir={run_dir}"], env, timeout)


def summary(run_dir):
    return json.loads((Path(run_dir) / "summary.json").read_text())


FAULTS = REPO / "tests" / "ddp_faults.py"


def test_the_evaluation_is_the_saved_nets_on_the_whole_split(tmp_path):
    """Retrieval and geometry read every test image (rank r evaluates r, r + 2, ...), and each
    rank evaluates rank 0's net (its BatchNorm statistics too): the figures equal the saved
    net's, evaluated again in one process."""
    extra = ["trainer.max_epochs=2", "trainer.retrieval=true", "trainer.geometry=true"]
    r = torchrun(extra, tmp_path / "ddp")
    assert r.returncode == 0, r.stderr[-3000:]
    ddp = summary(tmp_path / "ddp")
    assert ddp["world_size"] == 2
    # the finished run evaluated once more by one process (resumed after its last epoch)
    import shutil

    shutil.copytree(tmp_path / "ddp", tmp_path / "one")
    r = cli([*BASE, *extra, "trainer.resume=force", f"hydra.run.dir={tmp_path / 'one'}"],
            cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    one = summary(tmp_path / "one")
    keys = [k for k in ddp if k.startswith(("retrieval/", "geometry/", "test/acc"))]
    assert {"retrieval/cmc1", "retrieval/map", "geometry/effective_rank"} <= set(keys)
    for k in keys:
        assert ddp[k] == pytest.approx(one[k], rel=1e-6, abs=1e-9), k
    assert ddp["test/loss"] == pytest.approx(one["test/loss"], rel=1e-6)
    assert one["world_size"] == 1 and one["resume_forced"]["world_size"] == [2, 1]
    # its saved config rerun by one process: said to train another run
    r = cli(["--from", str(tmp_path / "ddp"), "trainer.max_epochs=1",
             f"hydra.run.dir={tmp_path / 'rerun'}"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "trained with 2 data-parallel process(es), this rerun has 1" in r.stderr


def test_a_nonfinite_loss_on_one_rank_stops_every_rank_at_its_step(tmp_path):
    r = torchrun(["trainer.max_epochs=3", "trainer.nonfinite_check_every=5"], tmp_path / "run",
                 FAULTS, env={"FAULT": "nan", "FAULT_RANK": "1", "FAULT_STEP": "5"})
    assert r.returncode != 0
    # both ranks stop at the same check, naming the step: none dies in a collective
    assert r.stderr.count("ortho-run: error: non-finite loss at step 5 (epoch 2)") == 2, \
        r.stderr[-3000:]
    assert "Connection closed" not in r.stderr and "exitcode: 3" in r.stderr
    s = summary(tmp_path / "run")
    assert s["status"] == "diverged" and "step 5" in s["error"]


def test_a_step_skipped_on_one_rank_is_skipped_on_every_rank(tmp_path):
    r = torchrun(["trainer.max_epochs=3", "trainer.on_nonfinite=skip"], tmp_path / "run",
                 FAULTS, env={"FAULT": "nan", "FAULT_RANK": "1", "FAULT_STEP": "6"},
                 timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [row.get("train/skipped_steps", 0) for row in rows] == [0, 1, 0]
    assert summary(tmp_path / "run")["status"] == "finished"


def test_a_signal_to_one_rank_stops_both_and_the_printed_command_continues_it(tmp_path):
    """SIGTERM reaches rank 1 alone (mid-epoch): every rank stops after the same step, and
    the resume command it prints (torchrun's) continues it to the uninterrupted run's numbers;
    one process may not continue it."""
    extra = ["trainer.max_epochs=4", "trainer.deterministic=true",
             "trainer.nonfinite_check_every=2"]
    r = torchrun(extra, tmp_path / "full")
    assert r.returncode == 0, r.stderr[-3000:]
    r = torchrun(extra, tmp_path / "cut", FAULTS,
                 env={"FAULT": "signal", "FAULT_RANK": "1", "FAULT_STEP": "5"})
    # agreed at step 6 (every 2 steps), batch 2 of epoch 2, the same on both ranks
    assert r.stderr.count("stopped by signal 15 at epoch 1, batch 2") == 2, r.stderr[-3000:]
    assert "Connection closed" not in r.stderr and "exitcode: 75" in r.stderr
    s = summary(tmp_path / "cut")
    assert s["status"] == "preempted"
    cmd = shlex.split(s["resume_command"])
    assert cmd[:4] == ["torchrun", "--standalone", "--nproc_per_node=2", "-m"]
    single = cli([*BASE, *extra, "trainer.resume=auto", f"hydra.run.dir={tmp_path / 'cut'}"],
                 cwd=tmp_path)
    assert single.returncode == 2 and "written by a run of 2 data-parallel" in single.stderr
    r = launch(cmd[1:])
    assert r.returncode == 0, r.stderr[-3000:]
    full, cut = summary(tmp_path / "full"), summary(tmp_path / "cut")
    assert cut["status"] == "finished"
    for k in ("test/acc1", "test/loss", "train/loss"):
        assert cut[k] == full[k], k


def test_a_compatibility_run_trains_its_old_model_with_every_rank(tmp_path):
    """The old model is trained data-parallel by the same ranks (the earlier design left rank
    1 waiting on the cache lock while rank 0 waited on rank 1), written to the cache once, and
    read from it by the next run."""
    cache = tmp_path / "cache"
    args = ["experiment=compat_smoke", "method=bct", f"cache_dir={cache}"]
    r = torchrun(args, tmp_path / "a", timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    (old,) = summaries(cache / "models")
    assert old["status"] == "finished" and old["world_size"] == 2
    s = summary(tmp_path / "a")
    assert s["status"] == "finished" and s["compat/new_old/cmc1"] > 0
    r = torchrun(args, tmp_path / "b", timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    # rank 0 looks, the others follow
    assert (r.stdout + r.stderr).count("reusing the cached old model") == 1
    assert summary(tmp_path / "b")["compat/old_old/cmc1"] == s["compat/old_old/cmc1"]


def test_the_tasks_of_a_submitit_job_are_the_ranks_of_one_run(tmp_path):
    """``hydra.launcher.tasks_per_node=2`` (the SLURM launcher's way to a data-parallel job;
    submitit_local here): the two tasks train one run together, as torchrun's two processes do
    (the same figures), instead of two runs of one process each into the same run dir."""
    extra = ["trainer.max_epochs=2", "trainer.deterministic=true"]
    r = torchrun(extra, tmp_path / "torchrun")
    assert r.returncode == 0, r.stderr[-3000:]
    r = cli(["-m", "hydra/launcher=submitit_local", "hydra.launcher.tasks_per_node=2",
             "hydra.launcher.timeout_min=10", *BASE, *extra,
             f"hydra.sweep.dir={tmp_path / 'sweep'}"], cwd=tmp_path,
            env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    (job,) = summaries(tmp_path / "sweep")
    assert job["world_size"] == 2 and job["status"] == "finished"
    ref = summary(tmp_path / "torchrun")
    for k in ("test/acc1", "test/loss", "train/loss"):
        assert job[k] == ref[k], k


def test_a_sweep_under_torchrun_is_one_sweep_reported_once(tmp_path):
    """Each rank runs the sweep's jobs together; only rank 0's folder is made (the others'
    Hydra files go to a temporary folder, removed at exit) and rank 0 alone reports the jobs
    and the sweep."""
    import tempfile

    def rank_folders():
        return set(Path(tempfile.gettempdir()).glob("ortho-run-rank*"))

    before = rank_folders()
    r = launch(["--standalone", "--nproc_per_node=2", "-m", "ortho_run", "-m", *BASE,
                "trainer.max_epochs=1", "method=ce,cosine", f"output_root={tmp_path}"])
    assert r.returncode == 0, r.stderr[-3000:]
    (sweep,) = (tmp_path / "multirun").iterdir()
    assert sorted(p.name.split("_")[0] for p in sweep.iterdir() if p.is_dir()) == ["0", "1"]
    runs = summaries(sweep)
    assert [s["world_size"] for s in runs] == [2, 2]
    assert all(s["sweep_dir"] == str(sweep) for s in runs)
    assert r.stdout.count("ortho-run: job 0 finished") == 1
    assert r.stdout.count("ortho-run sweep: 2 jobs in") == 1
    assert rank_folders() <= before
