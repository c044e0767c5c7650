"""Multirun launchers, failing jobs, data-parallel training and ortho-report."""

import csv
import json
import os
import statistics
import subprocess
import sys

import pytest

from conftest import cli, summaries

SWEEP = ["-m", "experiment=smoke", "method=ce,cosine", "seed=0,1", "tag=runs/a"]

pytestmark = pytest.mark.slow  # subprocesses, launchers, DDP


@pytest.mark.parametrize("launcher", [
    [],
    ["hydra/launcher=local_parallel", "hydra.launcher.n_jobs=2"],
    ["hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10"],
])
def test_multirun_gives_distinct_run_dirs_with_summaries(tmp_path, launcher):
    r = cli([*SWEEP, *launcher, f"output_root={tmp_path}"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    s = summaries(tmp_path)
    assert len(s) == 4 and len({x["run_dir"] for x in s}) == 4
    assert sorted((x["method"], x["seed"]) for x in s) == [
        ("ce", 0), ("ce", 1), ("cosine", 0), ("cosine", 1)]
    assert all(x["status"] == "finished" and x["sweep"] for x in s)
    assert len({x["sweep"] for x in s}) == 1  # W&B group = the sweep name
    # a "/" in an override value does not open sub-directories: <sweep>/<n>_<overrides>
    from pathlib import Path
    assert {Path(x["run_dir"]).parent.parent.name for x in s} == {"multirun"}
    assert all("tag=runs_a" in Path(x["run_dir"]).name for x in s)


def test_a_slurm_sweep_without_slurm_is_one_paragraph_before_any_job(tmp_path):
    import shutil

    if shutil.which("srun"):
        pytest.skip("this machine has SLURM")
    r = cli([*SWEEP, "hydra/launcher=slurm", f"output_root={tmp_path}"], cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "hydra/launcher=slurm submits the jobs to SLURM, but this machine has no srun" in r.stderr
    assert not list(tmp_path.rglob("summary.json"))


def test_path_safe_keeps_names_one_component_and_distinct():
    from ortho_run.store import path_safe
    assert path_safe("data.root=/a/b,seed=1") == "data.root=_a_b,seed=1"
    long_a, long_b = "x=" + "a" * 300, "x=" + "a" * 299 + "b"
    assert len(path_safe(long_a)) == 120 and path_safe(long_a) != path_safe(long_b)


def test_a_failing_job_does_not_stop_the_sweep(tmp_path):
    r = cli(["-m", "experiment=smoke", "data.classes=[0,1],[42],[2,3]",
             f"output_root={tmp_path}"], cwd=tmp_path)
    assert r.returncode == 4
    assert "1 job(s) of the sweep" in r.stderr and "1_data.classes=[42]" in r.stderr
    s = summaries(tmp_path)
    assert sorted(x["status"] for x in s) == ["failed", "finished", "finished"]


def test_a_value_some_jobs_get_wrong_refuses_the_sweep_before_any_job(tmp_path):
    """The pre-flight of a sweep checks every job's config as its run will: a bad value in the
    sweep list is named per job, and nothing is trained or written; a job that fails at run
    time (the data above) still leaves the others to finish."""
    r = cli(["-m", "experiment=smoke", "optim.lr=0.1,-0.1", "seed=0,1",
             f"output_root={tmp_path}"], cwd=tmp_path)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "2 of the sweep's 4 jobs would be refused, so none is started" in r.stderr
    assert "job 2 (optim.lr=-0.1 seed=0): optim.lr=-0.1 is out of range: it must be > 0" in r.stderr
    assert "Traceback" not in r.stderr and not list(tmp_path.rglob("*.json"))


def test_ddp_two_processes_on_cpu(tmp_path):
    env = dict(os.environ, WANDB_MODE="disabled", OMP_NUM_THREADS="1")
    args = ["experiment=smoke", "trainer.device=cpu", "trainer.max_epochs=4"]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc_per_node=2", "-m", "ortho_run", *args,
                        f"output_root={tmp_path}/ddp"], env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    dirs = [p for p in (tmp_path / "ddp").rglob("summary.json")]
    assert len(dirs) == 1  # one run dir, written by rank 0
    ddp = json.loads(dirs[0].read_text())
    assert ddp["world_size"] == 2 and ddp["status"] == "finished"
    assert len(list((tmp_path / "ddp").rglob(".hydra"))) == 1
    single = cli([*args, f"output_root={tmp_path}/one"], cwd=tmp_path)
    assert single.returncode == 0
    one = summaries(tmp_path / "one")[0]
    # each rank sees half of every epoch: same order of magnitude, not the same number
    assert ddp["test/acc1"] > 0.3 and abs(ddp["test/acc1"] - one["test/acc1"]) < 0.4


def test_report_table_matches_summaries_and_writes_plots(tmp_path):
    r = cli([*SWEEP, f"output_root={tmp_path}"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    sweep = next((tmp_path / "multirun").iterdir())
    (sweep / "99_broken" / ".hydra").mkdir(parents=True)  # an unfinished job
    from ortho_run.report import report

    table, problems, files, out = report([sweep])
    runs = summaries(sweep)
    for method in ("ce", "cosine"):
        vals = [x["test/acc1"] for x in runs if x["method"] == method]
        row = table[f"experiment=smoke method={method} tag=runs/a"]["test/acc1"]
        assert row["n"] == 2
        assert row["mean"] == pytest.approx(statistics.fmean(vals))
        assert row["std"] == pytest.approx(statistics.stdev(vals))
    assert any("99_broken" in d for d, _ in problems)
    md = (out / "report.md").read_text()
    assert "99_broken" in md and "± " in md
    rows = list(csv.DictReader(open(out / "report.csv")))
    assert {r["metric"] for r in rows} >= {"test/acc1", "geometry/class_mean_abs_cos"}
    names = {f.name for f in files}
    assert {"test_acc1.png", "curves.png"} <= names
    assert all(f.stat().st_size > 5000 for f in files)
    r = subprocess.run([sys.executable, "-m", "ortho_run.report", str(sweep), "--no-plots"],
                       capture_output=True, text=True)
    assert r.returncode == 0 and "4 finished runs in 2 groups" in r.stdout


def test_two_concurrent_jobs_do_not_interfere(tmp_path):
    """Two identical jobs at once through joblib (as on one shared GPU): each writes its own run
    dir, the two agree bit for bit, and with the job run alone up to float summation order
    (joblib gives each worker cores // n_jobs threads)."""
    args = ["experiment=smoke", "method=opl", "trainer.deterministic=true"]
    r = cli(["-m", *args, "hydra/launcher=local_parallel", "hydra.launcher.n_jobs=2", "tag=a,b",
             f"output_root={tmp_path}/par"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    r = cli([*args, "tag=a", f"output_root={tmp_path}/alone"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    par, alone = summaries(tmp_path / "par"), summaries(tmp_path / "alone")[0]
    assert sorted(x["tag"] for x in par) == ["a", "b"] and len({x["run_dir"] for x in par}) == 2
    keys = ["test/acc1", "test/acc5", "test/loss"]
    assert all(s["status"] == "finished" for s in par)
    assert [par[0][k] for k in keys] == [par[1][k] for k in keys]
    assert [par[0][k] for k in keys] == pytest.approx([alone[k] for k in keys], rel=1e-3)


TOY_SWEEPER = {"PYTHONPATH": os.pathsep.join(
    [os.path.join(os.path.dirname(__file__), "plugins"), os.environ.get("PYTHONPATH", "")])}


def test_a_search_space_reaching_past_a_keys_range_refuses_the_search_before_any_trial(tmp_path):
    """A sweeper that picks its trials as it goes (Optuna's contract, here a toy one): the
    pre-flight checks the trials at the edges of the search space, so an interval that reaches
    below a key's range, or a choice of no option, is named before any trial trains."""
    r = cli(["-m", "hydra/sweeper=toy", "experiment=smoke", "method=opl",
             "method.gamma=interval(-1.0, 4.0)", "optim=choice(sgd,nope)",
             f"output_root={tmp_path}"], cwd=tmp_path, env=TOY_SWEEPER)
    assert r.returncode == 2, r.stderr[-3000:]
    assert ("2 of the sweep's 3 trials checked at the edges of its search space would be "
            "refused, so none is started") in r.stderr
    assert "trial 0 (method.gamma=-1.0 optim=sgd): method.gamma=-1.0 is out of range" in r.stderr
    assert "trial 2 (method.gamma=-1.0 optim=nope): In 'config': Could not find 'optim/nope'" in r.stderr
    assert "Traceback" not in r.stderr and not list(tmp_path.rglob("*.json"))


def test_a_trial_that_diverges_is_ranked_last_and_the_search_goes_on(tmp_path):
    """A sweeper that stops the search at a trial without a number (Optuna's does) is given the
    worst value of its direction for a diverged or failed trial, so the other trials still
    run; the sweep's end lists the diverged one and exits 4."""
    out = tmp_path / "toy"
    r = cli(["-m", "hydra/sweeper=toy", "hydra.sweeper.n_trials=3", "experiment=smoke",
             "optim.lr=choice(0.1,1e30)", f"hydra.sweep.dir={out}"], cwd=tmp_path,
            env=TOY_SWEEPER)
    assert r.returncode == 4, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    from omegaconf import OmegaConf

    values = OmegaConf.load(out / "toy_values.yaml")["values"]
    assert values[1] == float("-inf") and values[0] == values[2] > 0.3  # trials 0, 2: lr 0.1
    assert sorted(s["status"] for s in summaries(out)) == ["diverged", "finished", "finished"]
    assert "2 finished, 0 failed, 1 diverged" in r.stdout
    # minimising, the worst is +inf
    r = cli(["-m", "hydra/sweeper=toy", "hydra.sweeper.direction=minimize", "experiment=smoke",
             "optim.lr=choice(1e30)", "objective=test/loss", f"hydra.sweep.dir={out}_min"],
            cwd=tmp_path, env=TOY_SWEEPER)
    assert r.returncode == 4 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert OmegaConf.load(out.parent / "toy_min" / "toy_values.yaml")["values"] == [
        float("inf")] * 2


def test_a_finished_trial_without_the_objective_is_listed_and_the_sweep_fails(tmp_path):
    r = cli(["-m", "hydra/sweeper=toy", "experiment=smoke", "objective=test/acc9",
             f"hydra.sweep.dir={tmp_path}/toy"], cwd=tmp_path, env=TOY_SWEEPER)
    assert r.returncode == 4, r.stderr[-3000:]
    assert r.stderr.count("finished without objective=test/acc9, so the sweeper ranked it "
                          "last") == 2
    assert "2 finished, 0 failed, 0 diverged" in r.stdout


def _optuna_search(out, *extra):
    return cli(["-m", "hydra/sweeper=opl_search", "experiment=smoke", "method=opl",
                "hydra.sweeper.n_trials=2", "trainer.max_epochs=1", *extra,
                f"hydra.sweep.dir={out}"], cwd=out.parent)


def test_the_shipped_optuna_search_runs_and_draws_the_same_trials_from_the_same_seed(tmp_path):
    """``hydra/sweeper=opl_search`` with the real Optuna plugin: the trials it draws come from
    the run's seed (the same command searches the same points, so a search run again in its
    folder resumes its trials), and its best value is the best trial's objective as the
    summaries hold it."""
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    from omegaconf import OmegaConf

    def search(name, *extra):
        r = _optuna_search(tmp_path / name, *extra)
        assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
        points = sorted((s["overrides"][0], s["overrides"][1], s["test/acc1"])
                        for s in summaries(tmp_path / name))
        return points, OmegaConf.load(tmp_path / name / "optimization_results.yaml")

    first, best = search("a")
    # the same command in the same folder draws the same trials, so a stopped search continues:
    # each finished trial is found in its run dir and resumed, none trained again
    r = _optuna_search(tmp_path / "a")
    assert r.returncode == 0 and (r.stdout + r.stderr).count("resumed from") == 2, r.stderr[-3000:]
    assert search("a")[0] == first and len(list((tmp_path / "a").iterdir())) == 3
    again, _ = search("b")
    other, _ = search("c", "seed=1")
    assert len(first) == 2 and first == again and [p[:2] for p in other] != [p[:2] for p in first]
    assert all(p[0].startswith("method.gamma=") and p[1].startswith("method.lambda_=")
               for p in first)
    assert best.best_value == max(p[2] for p in first)


def test_an_optuna_search_whose_trials_all_diverge_ends_listing_them_not_with_a_traceback(
        tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    from omegaconf import OmegaConf

    r = _optuna_search(tmp_path / "s", "optim.lr=1e30")
    assert r.returncode == 4 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert [s["status"] for s in summaries(tmp_path / "s")] == ["diverged"] * 2
    assert "0 finished, 0 failed, 2 diverged" in r.stdout
    assert OmegaConf.load(tmp_path / "s" / "optimization_results.yaml").best_value == float(
        "-inf")
