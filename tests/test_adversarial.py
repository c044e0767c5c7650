"""Adversarial cases, by class of fault: nothing silently mixed, nothing overwritten, and a
user's mistake is one paragraph with exit code 2, never a traceback.

In-process cases assert the OrthoRunError's exit code and message (the CLI prints exactly that
message and exits with that code); the CLI cases (slow layer) check the process itself.
"""

import errno
import json
import logging
import math
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import cli, compose, run_inprocess
from ortho_run.errors import (EXIT_PREEMPTED, CheckpointError, ConfigError, DataError, DiskFull,
                              OrthoRunError, Preempted)

SMOKE = ["experiment=smoke", "trainer.max_epochs=1", "data.max_train_samples=128"]


def tree(d: Path) -> dict:
    """Every file under ``d`` with its bytes and mode: what must stay identical."""
    return {str(p.relative_to(d)): (p.read_bytes(), p.stat().st_mode)
            for p in sorted(Path(d).rglob("*")) if p.is_file()}


def refused(tmp_path, overrides, name="run", exc=OrthoRunError, match=None):
    with pytest.raises(exc, match=match) as e:
        run_inprocess(tmp_path, overrides, name=name)
    assert e.value.exit_code == 2, e.value
    return str(e.value)


@pytest.fixture
def finished(tmp_path):
    """A finished smoke run in tmp_path/run, and a snapshot of its dir."""
    run_inprocess(tmp_path, SMOKE)
    return tmp_path / "run", tree(tmp_path / "run")


# ---------------------------------------------------------------- 1. resume continues another
@pytest.mark.parametrize("change,keys", [
    (["optim.lr=0.001", "seed=5"], ["optim.lr=0.001", "seed=5"]),
    (["data=synthetic"], ['data.name="synthetic"']),
    (["optim=adamw"], ['optim.name="adamw"']),
    (["method=opl"], ['method.name="opl"']),
    (["data.augment=flip"], ['data.augment="flip"']),
    (["model.width=8"], ["model.width=8"]),
])
def test_resume_with_another_config_is_refused_listing_the_keys(tmp_path, finished, change, keys):
    run_dir, before = finished
    msg = refused(tmp_path, [*SMOKE, *change], exc=CheckpointError)
    assert "another config" in msg and "trainer.resume=force" in msg
    for k in keys:
        assert k in msg, (k, msg)
    assert "'step'" not in msg
    assert tree(run_dir) == before  # and the finished run is untouched


def _rows(run_dir: Path) -> list:
    return [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_resume_force_continues_and_says_so(tmp_path, finished):
    run_dir, _ = finished
    s = run_inprocess(tmp_path, [*SMOKE, "trainer.max_epochs=2", "optim.lr=0.05",
                                 "trainer.resume=force"])
    assert s["status"] == "finished" and s["epoch"] == 2
    assert s["resume_forced"] == {"optim.lr": [0.1, 0.05]}
    assert json.loads((run_dir / "summary.json").read_text())["resume_forced"]
    # what it accepted is what it trained with: the resumed epoch's lr is that of a run made
    # with optim.lr=0.05 from the start (same schedule, same step), not the checkpoint's 0.1
    ref = run_inprocess(tmp_path, [*SMOKE, "trainer.max_epochs=2", "optim.lr=0.05"], name="ref")
    assert ref["status"] == "finished"
    assert _rows(run_dir)[-1]["lr"] == _rows(tmp_path / "ref")[-1]["lr"]
    old = run_inprocess(tmp_path, [*SMOKE, "trainer.max_epochs=2"], name="old")
    assert old["status"] == "finished"
    assert _rows(run_dir)[-1]["lr"] == pytest.approx(_rows(tmp_path / "old")[-1]["lr"] / 2)


def test_a_checkpoint_of_another_number_of_processes_is_refused_unless_forced(tmp_path, finished):
    """Each data-parallel process reads batches of its own: a checkpoint written by two would
    continue with other steps per epoch, another schedule and random state in one."""
    run_dir, _ = finished
    f = run_dir / "checkpoints" / "last.pt"
    st = torch.load(f, weights_only=False)
    assert st["world_size"] == 1
    torch.save(dict(st, world_size=2), f)
    before = tree(run_dir)
    msg = refused(tmp_path, [*SMOKE, "trainer.max_epochs=2"], exc=CheckpointError)
    assert "written by a run of 2 data-parallel process(es), this one has 1" in msg
    assert "trainer.resume=force" in msg and tree(run_dir) == before
    s = run_inprocess(tmp_path, [*SMOKE, "trainer.max_epochs=2", "trainer.resume=force"])
    assert s["status"] == "finished" and s["resume_forced"] == {"world_size": [2, 1]}


def test_resume_may_grow_max_epochs_and_change_reporting_keys(tmp_path, finished):
    s = run_inprocess(tmp_path, [*SMOKE, "trainer.max_epochs=2", "trainer.eval_every=2",
                                 "tag=more", "trainer.geometry=false"])
    assert s["status"] == "finished" and s["epoch"] == 2
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]


def test_resume_cannot_shrink_max_epochs(tmp_path):
    run_inprocess(tmp_path, [*SMOKE, "trainer.max_epochs=2"])
    before = tree(tmp_path / "run")
    refused(tmp_path, [*SMOKE, "trainer.max_epochs=1"], exc=CheckpointError,
            match="beyond trainer.max_epochs=1")
    assert tree(tmp_path / "run") == before


# ---------------------------------------------------------------- 2. a refused run overwrites
@pytest.mark.parametrize("damage", ["zero_bytes", "truncated", "garbage"])
def test_a_broken_checkpoint_is_refused_and_the_dir_kept(tmp_path, finished, damage):
    run_dir, _ = finished
    f = run_dir / "checkpoints" / "last.pt"
    data = f.read_bytes()
    f.write_bytes({"zero_bytes": b"", "truncated": data[: len(data) // 2],
                   "garbage": b"\x00not a checkpoint" * 10}[damage])
    before = tree(run_dir)
    refused(tmp_path, SMOKE, exc=CheckpointError, match="cannot be read as a checkpoint")
    assert tree(run_dir) == before


def _momentum_of_another_shape(st):
    for state in st["optimizers"][0]["state"].values():
        state["momentum_buffer"] = torch.zeros(2)


CHECKPOINT_FAULTS = [  # (what is changed, how, what the refusal says)
    ("net", lambda st: st.update(net=None), "net must be a state dict"),
    ("net entry", lambda st: st["net"].update(x="zz"), "net must be a state dict"),
    ("epoch", lambda st: st.pop("epoch"), "epoch is missing"),
    ("epoch str", lambda st: st.update(epoch="1"), "epoch must be an integer >= 0"),
    ("epoch float", lambda st: st.update(epoch=1.5), "epoch must be an integer >= 0"),
    ("step", lambda st: st.update(step=-5), "step must be an integer >= 0"),
    ("batch", lambda st: st.update(batch=None), "batch must be an integer >= 0"),
    ("sums", lambda st: st.update(sums={"ce": 1.0}), "sums must be the partial epoch's sums"),
    ("best", lambda st: st.update(best="zz"), "best must be a number or null"),
    ("history", lambda st: st.update(history=[1]), "history must be a list of metrics rows"),
    ("rng", lambda st: st.update(rng={}), "rng must be the random states"),
    ("rng torch", lambda st: st["rng"].update(torch="zz"), "rng must be the random states"),
    ("optimizers", lambda st: st.update(optimizers=None), "optimizers must be a list of"),
    ("train_s", lambda st: st.update(train_s="zz"), "train_s must be a number of seconds"),
    ("config", lambda st: st.update(config="zz"), "config must be the run's config"),
    ("shape", lambda st: st.update(shape={"channels": 1}), "shape must be the net spec"),
    ("earlier models", lambda st: st.update(earlier_models=3), "earlier_models must be a list"),
    ("batch past the epoch", lambda st: st.update(batch=99),
     "written at batch 99 of epoch 2, but this run's epoch has 2 batches"),
    ("optimiser state", _momentum_of_another_shape,
     "momentum_buffer for a weight of shape .* has shape \\(2,\\)"),
]


@pytest.mark.parametrize("fault,change,says", CHECKPOINT_FAULTS,
                         ids=[f[0] for f in CHECKPOINT_FAULTS])
def test_a_checkpoint_holding_the_wrong_thing_is_refused_naming_it_and_the_dir_kept(
        tmp_path, finished, fault, change, says):
    """Resumed, and (what rebuilds a net) given as an old model: a clear refusal, never a
    TypeError or a broadcast error at the first step, and nothing of the run dir changed."""
    run_dir, _ = finished
    f = run_dir / "checkpoints" / "last.pt"
    st = torch.load(f, weights_only=False)
    change(st)
    torch.save(st, f)
    before = tree(run_dir)
    refused(tmp_path, [*SMOKE, "trainer.max_epochs=2"], exc=CheckpointError, match=says)
    assert tree(run_dir) == before
    if "must be" in says or "missing" in says:  # what every reader of a checkpoint refuses
        refused(tmp_path, [*SMOKE, "method=bct", "data.classes=all",
                           f"compat.old_ckpt={run_dir}"], name="new", exc=CheckpointError,
                match=says)
        assert tree(run_dir) == before


def test_a_checkpoint_without_the_keys_later_versions_added_still_resumes(tmp_path, finished):
    from ortho_run.checkpoint import FIELDS

    run_dir, _ = finished
    f = run_dir / "checkpoints" / "last.pt"
    st = torch.load(f, weights_only=False)
    later = [k for k, (required, _, _) in FIELDS.items() if not required]
    assert set(later) == {"train_s", "optimizer_kinds", "earlier_models", "config", "shape",
                          "world_size"}
    torch.save({k: v for k, v in st.items() if k not in later}, f)
    s = run_inprocess(tmp_path, [*SMOKE, "trainer.max_epochs=2"])
    assert s["status"] == "finished" and s["epoch"] == 2


@pytest.mark.parametrize("bad", ["data.batch_size=0", "method=ebv", "optim.lr=-1",
                                 "data.classes=[3]"])
def test_a_refused_run_in_a_finished_dir_changes_nothing(tmp_path, finished, bad):
    run_dir, before = finished
    extra = ["method.dim=0"] if bad == "method=ebv" else []
    refused(tmp_path, [*SMOKE, bad, *extra])
    assert tree(run_dir) == before
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "finished"


def test_a_refused_run_creates_no_run_dir(tmp_path):
    refused(tmp_path, [*SMOKE, "data.batch_size=0"], name="new")
    refused(tmp_path, [*SMOKE, "data.classes=[3]"], name="new2")  # refused after data loading
    assert not (tmp_path / "new").exists() and not (tmp_path / "new2").exists()


# ---------------------------------------------------------------- 3. two processes, one run dir
def test_a_run_dir_in_use_is_refused_naming_the_process(tmp_path):
    from ortho_run.runner.rundir import RunDir, RunDirBusy

    with RunDir(tmp_path / "run"):
        msg = refused(tmp_path, SMOKE, exc=RunDirBusy)
    assert f"process {os.getpid()}" in msg and "in use" in msg
    assert run_inprocess(tmp_path, SMOKE)["status"] == "finished"  # free again afterwards


def test_checkpoint_saving_leaves_a_live_writers_temp_file_alone(tmp_path):
    from ortho_run.checkpoint import save

    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        d = tmp_path / "checkpoints"
        d.mkdir()
        mine = d / f".last.pt.{live.pid}.abc.tmp"
        dead = d / ".last.pt.999999999.abc.tmp"
        mine.write_bytes(b"half")
        dead.write_bytes(b"half")
        save(d / "last.pt", {"x": 1})
        assert mine.exists() and not dead.exists()
    finally:
        live.kill()


# ---------------------------------------------------------------- 4. full disks
@pytest.fixture
def disk_full(monkeypatch):
    import ortho_run.io as io

    real = io.torch.save

    def save(obj, f, *a, **k):
        if str(f).endswith(".tmp") and "last.pt" in str(f):
            raise RuntimeError("[enforce fail at inline_container.cc:778] . PytorchStreamWriter "
                               "failed writing file data/0: file write failed")
        return real(obj, f, *a, **k)

    monkeypatch.setattr(io.torch, "save", save)


def test_a_full_disk_during_a_checkpoint_is_one_paragraph_and_a_true_summary(tmp_path, disk_full):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "summary.json").write_text('{"status": "finished"}')  # a stale one
    msg = refused(tmp_path, [*SMOKE, "trainer.resume=none"], exc=DiskFull)
    assert "no space left writing" in msg and "last.pt" in msg
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert s["status"] == "failed" and "no space left" in s["error"]


def test_a_full_disk_for_the_summary_leaves_no_stale_status(tmp_path, finished, monkeypatch):
    import ortho_run.runner.rundir as rundir

    def full(obj, path):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(rundir, "atomic_write_json", full)
    run_inprocess(tmp_path, [*SMOKE, "trainer.max_epochs=2"])
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert s["status"] == "finished" and set(s) == {"status", "error"}  # the truth, in few bytes


# ---------------------------------------------------------------- 5. a user's mistake
def _imagefolder(root: Path, bad=None, extra_test_class=False):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            for i in range(6):
                arr = (rng.random((12, 12, 3)) * 255).astype("uint8")
                Image.fromarray(arr).save(root / split / c / f"{i}.png")
    if bad == "fake":
        (root / "train" / "a" / "fake.jpg").write_text("this is not an image")
    if bad == "truncated":
        data = (root / "train" / "b" / "0.png").read_bytes()
        (root / "train" / "b" / "cut.png").write_bytes(data[: len(data) // 3])
    if extra_test_class:
        (root / "test" / "c").mkdir()
        Image.fromarray(np.zeros((12, 12, 3), "uint8")).save(root / "test" / "c" / "0.png")


IMAGEFOLDER = ["data=imagefolder", "data.image_size=8", "data.batch_size=4", "data.num_workers=0",
               "trainer.max_epochs=1", "logger.mode=disabled"]


@pytest.mark.parametrize("bad,workers", [("fake", 0), ("truncated", 0), ("fake", 2)])
def test_an_undecodable_image_is_named(tmp_path, bad, workers):
    _imagefolder(tmp_path / "imgs", bad)
    msg = refused(tmp_path, [*IMAGEFOLDER, f"data.root={tmp_path}/imgs",
                             f"data.num_workers={workers}"], exc=DataError)
    assert "cannot decode the image" in msg and ("fake.jpg" in msg or "cut.png" in msg)
    assert "data.verify_images=true" in msg and "Traceback" not in msg
    import multiprocessing

    assert not multiprocessing.active_children()  # the failed run stopped its loader workers


def test_verify_images_leaves_bad_files_out_with_a_count(tmp_path, caplog):
    _imagefolder(tmp_path / "imgs", "fake")
    with caplog.at_level(logging.WARNING, logger="ortho_run"):
        s = run_inprocess(tmp_path, [*IMAGEFOLDER, f"data.root={tmp_path}/imgs",
                                     "data.verify_images=true"])
    assert s["status"] == "finished" and s["train_size"] == 12
    assert "left out 1 train image" in caplog.text


def test_a_test_only_class_is_reported(tmp_path, caplog):
    _imagefolder(tmp_path / "imgs", extra_test_class=True)
    with caplog.at_level(logging.WARNING, logger="ortho_run"):
        run_inprocess(tmp_path, [*IMAGEFOLDER, f"data.root={tmp_path}/imgs"])
    assert "have no training folder" in caplog.text and "c" in caplog.text


def test_an_unreadable_data_dir_is_named(tmp_path, monkeypatch):
    from ortho_run.datasets.base import SOURCES

    def denied(cfg):
        raise PermissionError(errno.EACCES, "Permission denied", f"{tmp_path}/locked")

    monkeypatch.setitem(SOURCES._items, "digits", denied)
    msg = refused(tmp_path, SMOKE, exc=DataError)
    assert f"{tmp_path}/locked" in msg and "permission" in msg


def test_an_unwritable_cache_dir_is_named(tmp_path):
    (tmp_path / "file").write_text("x")
    msg = refused(tmp_path, [*SMOKE, "method=ebv", "method.gen_steps=10",
                             f"cache_dir={tmp_path}/file"], exc=ConfigError)
    assert "cache_dir=" in msg and "writable" in msg


def test_an_old_model_on_other_images_is_explained(tmp_path):
    run_inprocess(tmp_path, [*SMOKE, "model.embed_dim=32"], name="digits_run")  # 1 channel
    msg = refused(tmp_path, ["experiment=compat_smoke", "data=synthetic", "trainer.max_epochs=1",
                             f"compat.old_ckpt={tmp_path}/digits_run", "method=oca"],
                  exc=ConfigError)
    assert "1-channel" in msg and "3" in msg


def test_a_bad_old_override_names_the_option(tmp_path):
    msg = refused(tmp_path, ["experiment=compat_smoke", "method=bct", "trainer.max_epochs=1",
                             'compat.old_overrides=["model.nope=3"]', f"cache_dir={tmp_path}/c"],
                  exc=ConfigError)
    assert "compat.old_overrides" in msg and "nope" in msg


def test_old_classes_errors_name_compat_old_classes(tmp_path):
    msg = refused(tmp_path, ["experiment=compat_smoke", "method=bct", "compat.old_classes=[99]",
                             f"cache_dir={tmp_path}/c"], exc=ConfigError)
    assert msg.startswith("compat.old_classes") and "data.classes" not in msg


@pytest.mark.parametrize("override,key", [
    ("method.dim=-5", "method.dim"), ("method.dim=0", "method.dim"),
    ("method.tau=0", "method.tau"), ("method.alpha=1.5", "method.alpha"),
])
def test_meaningless_ebv_values_are_refused(tmp_path, override, key):
    msg = refused(tmp_path, [*SMOKE, "method=ebv", override], exc=ConfigError)
    assert msg.startswith(key)


@pytest.mark.parametrize("override,key", [
    ("seed=99999999999999999999999", "seed"),
    ("seed=-1", "seed"),
    ("data=synthetic", "data.image_size"),
    ("optim.lr=inf", "optim.lr"),
    ("optim.lr=nan", "optim.lr"),
    ("method=opl", "method.gamma"),
    ("method=cosine", "method.scale"),
    ("method=gcr", "method.k"),
    ("data.classes=[3]", "data.classes"),
    ("data.classes=[]", "data.classes"),
    ("+data.nme=3", "data.nme"),
    ("+trainer.max_epoch=3", "trainer.max_epoch"),
    ("optim.scheduler=poly", "optim.scheduler"),
    ("logger.init_timeout=0", "logger.init_timeout"),
    ("data.color_jitter=2", "data.color_jitter"),
])
def test_bad_values_are_refused_naming_the_key(tmp_path, override, key):
    extra = {"data=synthetic": ["data.image_size=0"], "method=opl": ["method.gamma=nan"],
             "method=cosine": ["method.scale=0"], "method=gcr": ["method.k=0"]}.get(override, [])
    msg = refused(tmp_path, [*SMOKE, override, *extra], exc=ConfigError)
    assert key in msg, msg
    assert not (tmp_path / "run").exists()


def test_a_float_cifar_batch_is_refused(tmp_path):
    from ortho_run.datasets.cifar import write_cifar

    x = np.random.default_rng(0).integers(0, 255, (50, 3, 32, 32)).astype(np.uint8)
    y = np.arange(50) % 10
    write_cifar(str(tmp_path / "c"), "cifar10", x, y, x, y, [str(i) for i in range(10)])
    f = tmp_path / "c" / "cifar-10-batches-py" / "data_batch_1"
    with open(f, "rb") as fh:
        obj = pickle.load(fh, encoding="latin1")
    obj["data"] = obj["data"].astype(np.float32) / 255.0
    with open(f, "wb") as fh:
        pickle.dump(obj, fh)
    msg = refused(tmp_path, [*SMOKE, "data=cifar10", f"data.root={tmp_path}/c"], exc=DataError)
    assert "float32" in msg and "uint8" in msg and "data_batch_1" in msg


def test_a_warm_up_longer_than_the_run_is_said(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="ortho_run"):
        run_inprocess(tmp_path, [*SMOKE, "optim.warmup_epochs=3"])
    assert "longer than the run" in caplog.text


def test_report_lists_a_list_summary_and_refuses_a_plain_file(tmp_path):
    from ortho_run.report import collect, main

    run_inprocess(tmp_path, SMOKE, name="good")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "summary.json").write_text("[1, 2]")
    runs, problems = collect([tmp_path])
    assert len(runs) == 1 and any("bad" in d and "not a JSON object" in why
                                  for d, why in problems)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path / "notes.txt"), "--no-plots"])
    assert e.value.code == 2


@pytest.fixture(scope="module")
def two_finished_runs(tmp_path_factory):
    """Two finished smoke runs (seeds 0 and 1); run ``s1`` also holds the multi-step keys, as
    the multi-step evaluation writes them."""
    from ortho_run.compat.evaluate import multistep_matrix

    root = tmp_path_factory.mktemp("runs")
    for seed in (0, 1):
        run_inprocess(root, [*SMOKE, f"seed={seed}"], name=f"s{seed}")
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(40) % 4
    steps = multistep_matrix([torch.randn(40, 8, generator=g) for _ in range(3)], labels,
                             [2, 3, 4], [0.5, 1.0, 1.0])
    f = root / "s1" / "summary.json"
    f.write_text(json.dumps({**json.loads(f.read_text()), **steps}))
    return root


SUMMARY_FAULTS = [
    ("s0", "overrides", 5), ("s0", "overrides", "method=opl"), ("s0", "overrides", [1, 2]),
    ("s0", "overrides", None), ("s0", "method", ["opl"]), ("s0", "status", 3),
    ("s0", "tag", ["a"]), ("s0", "test/acc1", "high"), ("s0", "test/acc1", None),
    ("s0", "test/acc1", True), ("s0", "reference", 5), ("s0", "seed", "0"),
    ("s0", "data", {"name": "digits"}), ("s1", "compat/steps/cmc1", [[1.0], [2.0, 3.0]]),
    ("s1", "compat/steps/cmc1", [0.5, 0.5, 0.5]), ("s1", "compat/steps/map", [["a"]]),
    ("s1", "compat/steps/cmc1", []), ("s1", "compat/steps/cmc1", [[0.5, 0.1, None],
                                                                  [0.4, 0.5, None],
                                                                  [0.3, 0.3, 0.5]]),
    ("s1", "compat/steps/classes", "4"), ("s1", "compat/steps/classes", [2, 4]),
    ("s1", "compat/steps/fractions", ["a", 1, 1]), ("s1", "compat/steps/fractions", 1.0),
    ("s1", "compat/steps/fractions", [0.0, 1.0, 1.0]),
]


@pytest.mark.parametrize("run,key,value", SUMMARY_FAULTS,
                         ids=[f"{k}={json.dumps(v)}" for _, k, v in SUMMARY_FAULTS])
def test_report_leaves_out_a_summary_whose_key_holds_the_wrong_thing_and_names_it(
        two_finished_runs, tmp_path, run, key, value):
    """A summary edited by hand or written by other code: the report neither fails nor half-reads
    it (a string of overrides grouped by its letters, a string accuracy dropped from n); the
    run is listed as left out, naming the key and what it holds, the other run is reported."""
    from ortho_run.report import report

    root = tmp_path / "runs"
    shutil.copytree(two_finished_runs, root)
    f = root / run / "summary.json"
    f.write_text(json.dumps({**json.loads(f.read_text()), key: value}))
    table, problems, _, out = report([root], plots=True)
    assert [Path(d).name for d, _ in problems] == [run], problems
    assert f"{key} must be" in problems[0][1] or "disagree on the number of steps" in \
        problems[0][1], problems
    assert sum(row["test/acc1"]["n"] for row in table.values()) == 1
    assert key in (out / "report.md").read_text().split("## Runs left out")[1]


def test_report_reads_a_runs_non_finite_metric_back_as_the_number_it_was(tmp_path):
    """A run writes a NaN metric as the string "nan" (JSON has no NaN): the report counts it
    as NaN in its group (shown, never dropped from n), as it does for any other value."""
    from ortho_run.report import report

    s = run_inprocess(tmp_path / "runs", [*SMOKE, "data=synthetic", "data.test_per_class=1"])
    assert math.isnan(s["geometry/intra_class_cos"])  # no class has two test images
    assert '"geometry/intra_class_cos": "nan"' in (tmp_path / "runs" / "run" /
                                                   "summary.json").read_text()
    table, problems, _, out = report([tmp_path / "runs"], plots=False,
                                     metrics=["test/acc1", "geometry/intra_class_cos"])
    (row,) = table.values()
    assert math.isnan(row["geometry/intra_class_cos"]["mean"]) and not problems
    assert "| nan (n=1) |" in (out / "report.md").read_text()


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf"), 0.25, 3])
def test_what_a_run_writes_for_a_metric_reads_back_as_that_number(tmp_path, value):
    from ortho_run import keys
    from ortho_run.io import atomic_write_json, dumps

    atomic_write_json({"status": "finished", "test/acc1": value,
                       "compat/steps/cmc1": [[value, None], [value, value]]}, tmp_path / "s.json")
    summary, why = keys.read_summary(tmp_path / "s.json")
    row, errors = keys.parse_metrics_row(json.loads(dumps({"epoch": 1, "train/ce": value})))
    for got in (summary["test/acc1"], summary["compat/steps/cmc1"][1][0], row["train/ce"]):
        assert (math.isnan(got) and math.isnan(value)) or got == value, (got, why, errors)


def test_report_names_the_lines_of_metrics_jsonl_that_are_no_row_and_plots_the_others(
        two_finished_runs, tmp_path):
    from ortho_run.report import report

    root = tmp_path / "runs"
    shutil.copytree(two_finished_runs, root)
    f = root / "s0" / "metrics.jsonl"
    good = f.read_text().splitlines()
    bad = ["[1, 2]", "5", '{"epoch": "x", "test/acc1": 0.5}', '{"test/acc1": 0.5}',
           '{"epoch": [1], "train/ce": 1}', '{"epoch": 1, "train/ce": "low"}', '{"epo']
    f.write_text("\n".join([good[0], *bad, *good[1:]]) + "\n")
    table, problems, files, _ = report([root], plots=True)
    lines = sorted(int(why.split("line ")[1].split(":")[0]) for _, why in problems)
    assert lines == list(range(2, 2 + len(bad))), problems
    assert any(f.name == "curves.png" for f in files)
    assert sum(row["test/acc1"]["n"] for row in table.values()) == 2


def test_report_says_which_runs_name_a_reference_it_does_not_have(two_finished_runs, tmp_path):
    from ortho_run.report import main, report

    root = tmp_path / "runs"
    shutil.copytree(two_finished_runs, root)
    f = root / "s0" / "summary.json"
    f.write_text(json.dumps({**json.loads(f.read_text()), "reference": "opl_cifar1000"}))
    table, problems, _, _ = report([root], plots=False)
    assert [(Path(d).name, "reference=opl_cifar1000" in why) for d, why in problems] == [
        ("s0", True)]
    assert sum(row["test/acc1"]["n"] for row in table.values()) == 2  # still in the table
    with pytest.raises(SystemExit) as e:
        main([str(root), "--no-plots", "--against", "opl_cifar1000"])
    assert e.value.code == 2


def test_a_sweeps_end_block_counts_a_malformed_summary_as_failed(two_finished_runs, tmp_path,
                                                                 capsys):
    from omegaconf import OmegaConf

    from ortho_run import cli

    root = tmp_path / "sweep"
    shutil.copytree(two_finished_runs, root)
    (root / "s0" / "summary.json").write_text('{"status": ["finished"]}')
    before = list(cli._FAILED)
    try:
        cli.SweepReport().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(root)}}}))
        failed = cli._FAILED[len(before):]
    finally:
        cli._FAILED[:] = before
    assert len(failed) == 1 and failed[0].startswith("s0: summary.json: status must be")
    assert "2 jobs" in capsys.readouterr().out


def test_a_rerun_is_named_from_the_source_runs_overrides_only_where_they_read_as_such(tmp_path):
    from ortho_run.cli import _rerun_overrides

    d = tmp_path / "run"
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "overrides.yaml").write_text("- method=opl\n- seed=3\n")
    (d / "summary.json").write_text(json.dumps({"status": "finished",
                                                "overrides": ["method=gcr", "seed=1"]}))
    assert _rerun_overrides(d, ["seed=2"]) == ["method=gcr", "seed=2"]
    (d / "summary.json").write_text(json.dumps({"status": "finished", "overrides": "method=gcr"}))
    assert _rerun_overrides(d, ["seed=2"]) == ["method=opl", "seed=2"]  # the letters: never
    for text in ("method: opl\n", "[unclosed\n", "- 5\n"):
        (d / ".hydra" / "overrides.yaml").write_text(text)
        assert _rerun_overrides(d, ["seed=2"]) == ["seed=2"]


def test_a_cached_model_is_reused_only_when_its_summary_reads_finished(tmp_path):
    """The cache takes a model whose summary's status is ``finished``, not one whose summary
    merely holds that word (a failed model's tag, say), nor one it cannot read."""
    from ortho_run.compat.provider import cached_run, independent_config, model_key
    from ortho_run.io import cache_folder

    sub = independent_config(compose(["experiment=compat_smoke", "method=bct",
                                      f"cache_dir={tmp_path}/cache"]))
    run_dir = cache_folder(sub.cache_dir, "models") / model_key(sub)
    run_dir.mkdir(parents=True)
    launched = []

    def launch(c, d):
        launched.append(d)
        raise Preempted("stopped")

    for text in ('{"status": "failed", "error": "x", "tag": "finished"}',
                 '{"status": "finished", "seed": "0"}', '{"status": "finished"'):
        (run_dir / "summary.json").write_text(text)
        with pytest.raises(Preempted):
            cached_run(sub, launch)
    assert launched == [run_dir] * 3


def test_a_resume_leaves_out_the_lines_of_metrics_jsonl_that_are_no_row(tmp_path, caplog):
    run_inprocess(tmp_path, SMOKE)
    f = tmp_path / "run" / "metrics.jsonl"
    rows = f.read_text().splitlines()
    f.write_text("\n".join([*rows, "[1, 2]", '{"epoch": "x"}', '{"test/acc1": 1}', '{"epo']))
    with caplog.at_level(logging.WARNING, logger="ortho_run"):
        s = run_inprocess(tmp_path, [*SMOKE, "trainer.max_epochs=2"])
    assert s["status"] == "finished" and s["epoch"] == 2
    assert "left out 4 line(s)" in caplog.text
    kept = [json.loads(x) for x in f.read_text().splitlines()]
    assert kept[:len(rows)] == [json.loads(x) for x in rows]
    assert [r["epoch"] for r in kept] == [1, 2]


# ---------------------------------------------------------------- 7. W&B settings
def test_explicit_logger_mode_beats_the_environment(tmp_path, monkeypatch):
    import ortho_run.runner.sinks as sinks

    started = []
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setattr(sinks, "_have_wandb_key", lambda: True)
    import wandb

    run = type("Run", (), {"id": "r1", "settings": None, "url": None})()
    monkeypatch.setattr(wandb, "init", lambda **kw: started.append(kw) or run)
    cfg = compose([*SMOKE, "logger.mode=disabled"])
    assert str(cfg.logger.mode) == "disabled"
    sinks.WandbSink(cfg.logger, tmp_path, {}, "n", None)
    assert started == []
    cfg = compose([*SMOKE, "logger=wandb"])  # no explicit mode: the environment counts
    sink = sinks.WandbSink(cfg.logger, tmp_path, {}, "n", None)
    assert sink.mode == "online" and started[0]["mode"] == "online"


def test_wandb_start_up_timeout_is_configurable(tmp_path, monkeypatch):
    import wandb

    import ortho_run.runner.sinks as sinks

    seen = []
    run = type("Run", (), {"id": "r1", "settings": None, "url": None})()
    monkeypatch.setattr(wandb, "init", lambda **kw: seen.append(kw["settings"]) or run)
    cfg = compose(["logger=wandb", "logger.mode=offline", "logger.init_timeout=7"])
    sinks.WandbSink(cfg.logger, tmp_path, {}, "n", None)
    assert seen[0].init_timeout == 7


# ---------------------------------------------------------------- 8. file modes
@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o027, 0o640)])
def test_run_files_get_the_mode_a_plain_open_gives(tmp_path, umask, mode):
    import ortho_run.io as io

    old = os.umask(umask)
    io._UMASK = None
    try:
        run_inprocess(tmp_path, SMOKE)
        run_inprocess(tmp_path, [*SMOKE, "trainer.max_epochs=2"])  # a resume rewrites metrics
    finally:
        os.umask(old)
        io._UMASK = None
    d = tmp_path / "run"
    for f in ("summary.json", "resolved_config.yaml", "checkpoints/last.pt", "metrics.jsonl"):
        assert (d / f).stat().st_mode & 0o777 == mode, f


# ---------------------------------------------------------------- the CLI (slow layer)
@pytest.mark.slow
def test_cli_refusals_leave_a_finished_dir_byte_identical(tmp_path):
    run_dir = tmp_path / "run"
    r = cli([*SMOKE, f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    before = tree(run_dir)
    assert ".hydra/config.yaml" in before and "run.log" in before
    for bad in (["method=opl"], ["data.batch_size=0"], ["optim.lr=0.5"], ["method.bogus=1"],
                ["+data.nme=3"], ["trainer.resume=/nonexistent"]):
        r = cli([*SMOKE, *bad, f"hydra.run.dir={run_dir}"], cwd=tmp_path)
        assert r.returncode == 2, (bad, r.stderr[-1500:])
        assert "Traceback" not in r.stderr, bad
        assert tree(run_dir) == before, bad


@pytest.mark.slow
@pytest.mark.parametrize("args,needle", [
    (["method=bogus"], "bogus"),
    (["optim.milestones=[ten,20]"], "milestones"),
    (["+data.nme=3"], "data.nme"),
    (["data.batch_size=0"], "data.batch_size"),
    (["output_root="], "output_root is empty"),
    (["hydra.run.dir=" + "x" * 300], "255"),
])
def test_cli_user_mistakes_exit_2_without_a_traceback_or_a_run_dir(tmp_path, args, needle):
    r = cli([*SMOKE, f"output_root={tmp_path}/out", *args], cwd=tmp_path, timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    assert needle in r.stderr and "Traceback" not in r.stderr
    assert sorted(os.listdir(tmp_path)) == []
    assert not any(p.name.startswith("20") for p in Path("/").iterdir())


@pytest.mark.slow
def test_cli_second_process_in_a_run_dir_exits_2_naming_the_first(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from ortho_run.runner.rundir import RunDir\n"
        "with RunDir(sys.argv[1]):\n    print('locked', flush=True); time.sleep(60)"),
        str(tmp_path / "run")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        r = cli([*SMOKE, f"hydra.run.dir={tmp_path}/run"], cwd=tmp_path)
        assert r.returncode == 2 and f"process {holder.pid}" in r.stderr, r.stderr[-1500:]
        assert "Traceback" not in r.stderr
    finally:
        holder.kill()


@pytest.mark.slow
def test_cli_repeated_sigint_never_interrupts_the_shutdown(tmp_path):
    run_dir = tmp_path / "run"
    env = dict(os.environ, WANDB_MODE="disabled")
    p = subprocess.Popen([sys.executable, "-m", "ortho_run", "experiment=smoke",
                          "trainer.max_epochs=50", "data.max_train_samples=1024",
                          f"hydra.run.dir={run_dir}"], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    while not (run_dir / "metrics.jsonl").exists() and time.time() - t0 < 120:
        time.sleep(0.05)
    for _ in range(40):  # a burst: some land while the first one is being handled
        p.send_signal(signal.SIGINT)
        time.sleep(0.01)
    out, err = p.communicate(timeout=120)
    assert p.returncode == EXIT_PREEMPTED, err[-2000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert "Resume with: ortho-run" in err
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "preempted"


@pytest.mark.slow
def test_nested_old_model_never_touches_the_main_wandb_run(tmp_path):
    """A compat run with W&B on: the main run's history and summary hold its metrics, and the
    cached old model has no W&B run of its own."""
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    r = cli(["experiment=compat_smoke", "method=bct", "trainer.max_epochs=2", "logger=wandb",
             f"cache_dir={tmp_path}/cache", f"hydra.run.dir={tmp_path}/run"], cwd=tmp_path,
            env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1  # one W&B run: the main one
    records = runs[0].read_bytes()  # W&B's offline record log (history and summary rows)
    assert records.count(b"train/loss") >= 2 and b"compat/new_old/cmc1" in records
    assert not list((tmp_path / "cache").rglob("wandb"))


def test_a_validation_fraction_that_holds_out_nothing_is_refused(tmp_path):
    msg = refused(tmp_path, [*SMOKE, "data=synthetic", "data.train_per_class=3",
                             "data.val_fraction=0.1"], exc=ConfigError)
    assert msg.startswith("data.val_fraction=0.1 holds out no image")


def test_the_run_dir_writes_nothing_on_another_rank_and_cuts_metrics_on_resume(tmp_path):
    """Every run-dir file but the checkpoints goes through ``RunDir``: on a rank other than the
    main one it writes nothing; on resume it keeps the rows of the checkpoint's epochs only."""
    from omegaconf import OmegaConf

    from ortho_run.runner.rundir import RunDir

    cfg = OmegaConf.create({"seed": 0})
    other = tmp_path / "rank1"
    with RunDir(other, enabled=False) as rd:
        rd.begin(cfg, {"status": "running"})
        rd.write_metrics({"epoch": 1})
        rd.write_summary({"status": "finished"})
    assert not other.exists()

    main = tmp_path / "rank0"
    main.mkdir()
    rows = [{"epoch": 1, "a": 1}, {"epoch": 2, "a": 2}, {"epoch": 3, "a": 3}]
    (main / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"epo')
    with RunDir(main) as rd:
        rd.begin(cfg, {"status": "running"}, resumed_epoch=2)
        rd.write_metrics({"epoch": 3, "a": 30})
    got = [json.loads(line) for line in (main / "metrics.jsonl").read_text().splitlines()]
    assert got == [rows[0], rows[1], {"epoch": 3, "a": 30}]
    assert OmegaConf.load(main / "resolved_config.yaml") == cfg
    assert json.loads((main / "summary.json").read_text()) == {"status": "running"}
