"""What a user sees: the end-of-run and after-sweep blocks, --help and --version, progress, the
W&B run (name, tags, config, one run across a resume) and ortho-report's tables and plots."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import cli, compose, run_inprocess

SMOKE = ["experiment=smoke", "trainer.max_epochs=1", "data.max_train_samples=128"]


def test_result_block_for_a_classification_and_a_compat_run():
    from ortho_run.cli import result_block

    base = {"status": "finished", "method": "opl", "data": "digits", "model": "small_cnn",
            "seed": 0, "epoch": 30, "run_dir": "/x/run", "test/acc1": 0.99721, "test/acc5": 1.0,
            "wandb": {"mode": "offline", "id": "abc"}}
    text = result_block(base)
    assert "ortho-run: finished: opl on digits" in text and "test/acc1 0.9972" in text
    assert "run dir: /x/run" in text
    assert "wandb sync /x/run/wandb/offline-run-*" in text
    compat = dict(base, **{f"compat/{p}/{m}": v for p, v in
                           (("old_old", 0.7), ("new_old", 0.8), ("new_new", 0.9))
                           for m in ("cmc1", "map")}, **{"compat/ecc": 1.0, "compat/ecc_map": 0.0})
    compat["wandb"] = {"mode": "disabled"}
    text = result_block(compat)
    assert "old/old 0.700 / 0.700  new/old 0.800 / 0.800  new/new 0.900 / 0.900" in text
    assert "passes on top-1, fails on mAP" in text and "W&B: off" in text


def test_summary_names_the_resident_pipeline(tmp_path):
    s = run_inprocess(tmp_path, SMOKE)
    assert s["pipeline"] == "resident"
    assert str(compose(["data.pipeline=gpu"]).data.pipeline) == "resident"  # the old name


def test_wandb_gets_a_distinct_name_tags_overrides_versions_and_expanded_paths(tmp_path,
                                                                               monkeypatch):
    import wandb

    from ortho_run.naming import run_name

    assert run_name("opl", "digits", 0, ["method=opl", "method.gamma=0.5", "seed=0"]) \
        == "opl_digits_s0[method.gamma=0.5]"
    assert run_name("opl", "digits", 0, ["method=opl", "method.gamma=1.0"]) \
        != run_name("opl", "digits", 0, ["method=opl", "method.gamma=0.5"])
    assert run_name("ce", "digits", 1, ["seed=1", "logger.mode=offline"]) == "ce_digits_s1"
    seen = []

    class FakeRun:
        id = "fake1"
        settings = type("S", (), {"sync_dir": str(tmp_path / "w")})()

        def log(self, *a, **k):
            pass

        summary = {}

        def finish(self, **k):
            pass

    monkeypatch.setattr(wandb, "init", lambda **kw: seen.append(kw) or FakeRun())
    from ortho_run.runner.run import run

    cfg = compose([*SMOKE, "logger=wandb", "logger.mode=offline", "method=opl",
                   "method.gamma=0.5", "cache_dir='~/somewhere'"])
    run(cfg, tmp_path / "run", sweep={"overrides": ["method=opl", "method.gamma=0.5"]})
    kw = seen[0]
    assert kw["name"] == "opl_digits_s0[method.gamma=0.5]"
    assert kw["tags"] == ["method.gamma=0.5", "method=opl"]
    assert kw["config"]["run"]["overrides"] == ["method=opl", "method.gamma=0.5"]
    assert "torch" in kw["config"]["run"]["versions"]
    assert kw["config"]["cache_dir"] == os.path.expanduser("~/somewhere")
    assert kw["resume"] == "allow" and kw["id"]


def test_run_progress_covers_the_whole_run_and_keeps_epoch_lines_off_the_console(capsys):
    import logging

    from ortho_run.runner.sinks import RunProgress

    handler = logging.StreamHandler(sys.stdout)
    logging.getLogger().addHandler(handler)
    level = logging.getLogger("ortho_run").level
    logging.getLogger("ortho_run").setLevel(logging.INFO)
    try:
        bar = RunProgress("on", epochs=5, batches=10, epoch=2, batch=3)
        assert bar.bar.total == 50 and bar.bar.n == 23  # resumed at epoch 3, batch 3
        assert bar.bar.desc.startswith("epoch 3/5")
        logging.getLogger("ortho_run").info("epoch=3 row", extra={"epoch_row": True})
        logging.getLogger("ortho_run").warning("a warning still shows")
        bar.close()
        logging.getLogger("ortho_run").info("after the bar", extra={"epoch_row": True})
    finally:
        logging.getLogger().removeHandler(handler)
        logging.getLogger("ortho_run").setLevel(level)
    out = capsys.readouterr().out
    assert "epoch=3 row" not in out and "a warning still shows" in out and "after the bar" in out
    assert not RunProgress("auto", 5, 10, 0).on  # not a TTY here: no bar, plain lines


# ------------------------------------------------------------------ ortho-report
def _summary(d: Path, method, seed, acc, extra=None):
    d.mkdir(parents=True)
    s = {"status": "finished", "method": method, "data": "digits", "seed": seed,
         "overrides": [f"method={method}", f"seed={seed}", "experiment=smoke"],
         "test/acc1": acc, "test/acc5": 1.0, "time/epoch_s": 0.1,
         "geometry/class_mean_abs_cos": 0.1, "geometry/effective_rank": 9.0, **(extra or {})}
    (d / "summary.json").write_text(json.dumps(s))
    (d / "metrics.jsonl").write_text("\n".join(json.dumps(
        {"epoch": e, "train/loss": 1.0 / e, "train/ce": 1.0 / e, "test/acc1": acc}) for e in (1, 2, 3)))


def test_a_report_stopped_while_it_writes_leaves_the_previous_files_whole(tmp_path, capsys,
                                                                          monkeypatch):
    """Ctrl-C (or SIGTERM, taken as it) while ortho-report writes: one line and exit 130, not a
    traceback, and report.csv / report.md are the previous complete files, no partial one and
    no temp file left (they were written in place)."""
    import csv

    from ortho_run.report import main

    _summary(tmp_path / "a0", "ce", 0, 0.9)
    _summary(tmp_path / "b0", "gcr", 0, 0.95)
    main([str(tmp_path), "--no-plots"])
    before = {n: (tmp_path / n).read_bytes() for n in ("report.csv", "report.md")}
    _summary(tmp_path / "a1", "ce", 1, 0.8)  # the next report would differ
    writer = csv.writer

    class Stopped:
        def __init__(self, f):
            self.w, self.rows = writer(f), 0

        def writerow(self, row):
            self.w.writerow(row)
            self.rows += 1
            if self.rows == 2:
                raise KeyboardInterrupt

    monkeypatch.setattr(csv, "writer", Stopped)
    with pytest.raises((SystemExit, KeyboardInterrupt)) as e:  # (a failure, not a stop)
        main([str(tmp_path), "--no-plots"])
    assert e.type is SystemExit and e.value.code == 130
    err = capsys.readouterr().err
    assert "ortho-report: stopped" in err and "Traceback" not in err
    assert {n: (tmp_path / n).read_bytes() for n in before} == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == sorted(before)
    monkeypatch.undo()
    main([str(tmp_path), "--no-plots"])
    assert "(n=2)" in (tmp_path / "report.md").read_text()


def test_report_legend_n1_cells_and_readable_default(tmp_path):
    from ortho_run.report import main

    _summary(tmp_path / "a0", "ce", 0, 0.9)
    _summary(tmp_path / "a1", "ce", 1, 0.8)
    _summary(tmp_path / "b0", "gcr", 0, 0.95, {"geometry/classifier_orth_err": 0.0})
    main([str(tmp_path), "--no-plots"])
    md = (tmp_path / "report.md").read_text()
    header = md.splitlines()[2]
    assert header == "| group | test/acc1 | geometry/class_mean_abs_cos |"  # not every key
    assert "0.8500 ± 0.0707 (n=2)" in md and "0.9500 (n=1)" in md and "± 0.0000 (n=1)" not in md
    assert "## Metrics" in md and "mean |cos| between the class means" in md
    main([str(tmp_path), "--no-plots", "--all"])
    md = (tmp_path / "report.md").read_text()
    assert "geometry/effective_rank" in md and "geometry/classifier_orth_err" in md
    assert "gcr: the largest ‖SᵀS − I‖_F" in md and "ce, cosine" in md  # both meanings, said
    main([str(tmp_path), "--no-plots", "--metrics", "test/acc5"])
    assert (tmp_path / "report.md").read_text().splitlines()[2] == "| group | test/acc5 |"


def test_a_chosen_metric_no_run_reports_is_said_with_the_nearest_and_the_table_stays_whole(
        tmp_path):
    """``--metrics test/acc2`` was a silently missing column; ``--metrics nope/x`` alone gave a
    header of two cells over a separator of one."""
    from ortho_run.report import main

    _summary(tmp_path / "a0", "ce", 0, 0.9)
    main([str(tmp_path), "--no-plots", "--metrics", "test/acc2", "test/acc1"])
    md = (tmp_path / "report.md").read_text()
    assert md.splitlines()[2:5] == ["| group | test/acc1 |", "|---|---|",
                                    "| experiment=smoke method=ce | 0.9000 (n=1) |"]
    assert "- `test/acc2`: no run reports it, so the table has no column for it (the runs' " \
           "nearest: `test/acc5`, `test/acc1`)" in md
    main([str(tmp_path), "--no-plots", "--metrics", "nope/x"])
    table = (tmp_path / "report.md").read_text().splitlines()[2:5]
    assert table == ["| group |", "|---|", "| experiment=smoke method=ce |"]
    assert all(line.count("|") == 2 for line in table)


def test_report_plot_labels_show_what_differs(tmp_path):
    from ortho_run.report import report, split_labels

    shared, own = split_labels(["experiment=smoke method=ce", "experiment=smoke method=gcr"])
    assert shared == "experiment=smoke" and own == ["method=ce", "method=gcr"]
    assert split_labels(["experiment=smoke method=ce"]) == ("", ["experiment=smoke method=ce"])
    _summary(tmp_path / "a0", "ce", 0, 0.9)
    _summary(tmp_path / "b0", "gcr", 0, 0.95)
    _, _, files, _ = report([tmp_path])
    assert {f.name for f in files} >= {"test_acc1.png", "curves.png"}


def test_report_counts_each_run_once_across_overlapping_folders_and_copies(tmp_path):
    import shutil

    from ortho_run.report import report

    sweep = tmp_path / "sweep"
    for seed, acc in ((0, 0.9), (1, 0.8)):
        _summary(sweep / str(seed), "ce", seed, acc, {"run_dir": str(sweep / str(seed))})
    # the sweep and one of its jobs, and the sweep given twice: two runs, not three or four
    for dirs in ([sweep, sweep / "0"], [sweep, sweep]):
        table, problems, _, _ = report(dirs, tmp_path / "out", plots=False)
        (row,) = table.values()
        assert row["test/acc1"]["n"] == 2 and row["test/acc1"]["mean"] == pytest.approx(0.85)
        assert problems == []
    # a copied run dir records the folder it ran in: listed, not counted a second time
    shutil.copytree(sweep / "1", sweep / "1-copy")
    table, problems, _, _ = report([sweep], tmp_path / "out", plots=False)
    assert next(iter(table.values()))["test/acc1"]["n"] == 2
    assert problems == [(str(sweep / "1-copy"), f"a copy of the run in {sweep / '1'} (both "
                                                 f"record run_dir {sweep / '1'}): counted once")]
    assert "1-copy`: a copy of the run in" in (tmp_path / "out" / "report.md").read_text()


def test_report_refuses_an_output_it_cannot_write_and_folders_without_runs(tmp_path, capsys):
    from ortho_run.report import main

    _summary(tmp_path / "runs" / "a0", "ce", 0, 0.9)
    (tmp_path / "file").write_text("kept")
    (tmp_path / "empty").mkdir()
    cases = [([str(tmp_path / "runs"), "--out", str(tmp_path / "file")], "is a file"),
             ([str(tmp_path / "runs"), "--out", str(tmp_path / "file" / "sub")],
              "cannot write the report there"),
             ([str(tmp_path / "empty")], "no run under")]
    for argv, said in cases:
        with pytest.raises(SystemExit) as e:
            main(argv + ["--no-plots"])
        assert e.value.code == 2 and said in capsys.readouterr().err
    assert (tmp_path / "file").read_text() == "kept" and not any((tmp_path / "empty").iterdir())


def test_report_help_documents_metrics_and_all(capsys):
    from ortho_run.report import main

    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "--metrics METRIC" in out and "--all" in out


# ------------------------------------------------------------------ the CLI (slow layer)
@pytest.mark.slow
def test_cli_help_version_and_a_closed_pipe(tmp_path):
    r = cli(["--help"], cwd=tmp_path)
    assert r.returncode == 0 and "Config groups" in r.stdout and "Examples" in r.stdout
    assert "schema" not in r.stdout and "powered by Hydra" not in r.stdout
    assert "method           ce, bct" in r.stdout
    r = cli(["--version"], cwd=tmp_path)
    from ortho_run import __version__

    assert r.returncode == 0 and r.stdout.strip() == f"ortho-run {__version__}"
    p = subprocess.run(f"{sys.executable} -m ortho_run --help | head -2", shell=True,
                       cwd=tmp_path, capture_output=True, text=True,
                       env=dict(os.environ, WANDB_MODE="disabled"))
    assert "Traceback" not in p.stderr and "BrokenPipe" not in p.stderr
    r = cli(["method=nonexistent"], cwd=tmp_path)
    options = r.stderr.split("Available options in 'method':")[1].split("Config search path")[0]
    assert r.returncode == 2 and "schema" not in options and "\tce\n" in options


@pytest.mark.slow
def test_cli_end_of_run_and_after_sweep_blocks(tmp_path):
    r = cli([*SMOKE, f"hydra.run.dir={tmp_path}/run"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-1500:]
    assert "ortho-run: finished: ce on digits" in r.stdout and "test/acc1" in r.stdout
    assert f"run dir: {tmp_path}/run" in r.stdout and "W&B: off" in r.stdout
    r = cli(["-m", *SMOKE, "method=ce,opl", f"hydra.sweep.dir={tmp_path}/sweep"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-1500:]
    assert (f"ortho-run sweep: 2 jobs in {tmp_path}/sweep: 2 finished, 0 failed, 0 diverged"
            in r.stdout)
    assert f"next: ortho-report {tmp_path}/sweep" in r.stdout


@pytest.mark.slow
def test_from_reruns_a_run_dir_to_the_bit_and_takes_key_overrides(tmp_path):
    import torch

    def net(d):
        return torch.load(tmp_path / d / "checkpoints" / "last.pt", weights_only=False)["net"]

    r = cli([*SMOKE, "optim=muon", f"hydra.run.dir={tmp_path}/a"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-1500:]
    r = cli(["--from", str(tmp_path / "a"), f"hydra.run.dir={tmp_path}/b"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-1500:]
    a, b = net("a"), net("b")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert ((tmp_path / "b" / "resolved_config.yaml").read_text()
            == (tmp_path / "a" / "resolved_config.yaml").read_text())
    s = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert s["rerun_of"] == str(tmp_path / "a") and s["status"] == "finished"
    assert not (tmp_path / "b" / "cli.log").exists()  # ortho-run's Hydra settings, not Hydra's
    r = cli([f"--from={tmp_path}/a", "seed=1", "trainer.max_epochs=2",
             f"hydra.run.dir={tmp_path}/c"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-1500:]
    s = json.loads((tmp_path / "c" / "summary.json").read_text())
    assert s["seed"] == 1 and s["epoch"] == 2
    # named and grouped by what defines it: the saved run's overrides, then its own
    assert s["overrides"] == ["experiment=smoke", "data.max_train_samples=128", "optim=muon",
                              "seed=1", "trainer.max_epochs=2"]
    assert not all(torch.equal(a[k], net("c")[k]) for k in a)
    for args, says in ((["optim=adamw"], "its plugins included"),
                       (["optim.lr=-1"], "optim.lr=-1.0 is out of range"),
                       (["+optim.nosuch=1"], "unknown key optim.nosuch")):
        r = cli(["--from", str(tmp_path / "a"), *args, f"hydra.run.dir={tmp_path}/d"],
                cwd=tmp_path)
        assert r.returncode == 2 and says in r.stderr, (args, r.stderr[-1500:])
        assert not (tmp_path / "d").exists()  # a refused rerun writes nothing
    r = cli(["--from", str(tmp_path / "nowhere")], cwd=tmp_path)
    assert r.returncode == 2 and "Give a run dir" in r.stderr


@pytest.mark.slow
def test_a_resumed_run_continues_its_wandb_run(tmp_path):
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    args = [*SMOKE, "logger=wandb", f"hydra.run.dir={tmp_path}/run"]
    assert cli(args, cwd=tmp_path, env=env).returncode == 0
    r = cli([*args, "trainer.max_epochs=2"], cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr[-1500:]
    run_id = (tmp_path / "run" / "wandb" / "ortho-run-id").read_text().strip()
    folders = sorted((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(folders) == 2 and all(f.name.endswith(run_id) for f in folders)
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert s["wandb"]["id"] == run_id and s["epoch"] == 2


def test_report_multistep_matrices_mean_and_std_over_seeds(tmp_path):
    from ortho_run.report import report

    mats = {0: [[0.8, None], [0.6, 0.9]], 1: [[0.6, None], [0.8, 0.7]]}
    for seed, c in mats.items():
        _summary(tmp_path / f"bt2_{seed}", "bt2", seed, 0.9, {
            "compat/steps/cmc1": c, "compat/steps/map": [[0.5, None], [0.4, 0.6]],
            "compat/steps/classes": [5, 10], "compat/ac": float(c[1][0] > c[0][0]),
            "compat/am": sum(v for row in c for v in row if v is not None) / 3})
    _summary(tmp_path / "step", "bt2", 0, 0.1, {"tag": "step-1-model"})  # a cached model
    table, _, files, _ = report([tmp_path])
    md = (tmp_path / "report.md").read_text()
    assert "## Multi-step compatibility" in md and "step 1 (10 cl.)" in md
    # element-wise over the two seeds: C[1][0] = 0.7 ± 0.1414, C[0][0] = 0.7 ± 0.1414
    row1 = next(ln for ln in md.splitlines() if ln.startswith("| step 1 (10 cl.) | 0.700"))
    assert row1 == "| step 1 (10 cl.) | 0.700 ± 0.141 | 0.800 ± 0.141 |"
    (group,) = table
    assert table[group]["compat/ac"] == {"mean": 0.5, "std": pytest.approx(0.7071, abs=1e-4),
                                         "n": 2}
    assert "compat/am" in md.splitlines()[2] and "the share of pairs" in md
    assert "steps_0.png" in {f.name for f in files}
    csv_rows = (tmp_path / "report.csv").read_text()
    assert "compat/steps/cmc1[1][0],0.7" in csv_rows
