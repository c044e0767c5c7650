"""End-to-end runs: learning, determinism, resume, the run dir contract, the CLI."""

import json

import pytest
import torch

from conftest import cli, run_inprocess, summaries
from ortho_run.methods import METHODS
from ortho_run.store import compatibility_methods

#: every method that trains alone (a new one is covered without touching this file)
ALONE = compatibility_methods(compat=False)

METRICS = ("test/acc1", "test/acc5", "test/loss", "train/loss")


@pytest.mark.slow
def test_default_run_learns_digits_and_writes_the_contract(tmp_path):
    s = run_inprocess(tmp_path)  # the defaults: digits, small_cnn, ce, 30 epochs
    d = tmp_path / "run"
    assert s["status"] == "finished" and s["test/acc1"] >= 0.95
    saved = json.loads((d / "summary.json").read_text())
    for k in ("test/acc1", "test/acc5", "epoch", "method", "data", "model", "seed",
              "git_commit", "versions"):
        assert k in saved
    assert saved["versions"]["torch"] == torch.__version__.split("+")[0]
    rows = [json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == list(range(1, 31))
    assert rows[-1]["test/acc1"] == saved["test/acc1"]
    ck = torch.load(d / "checkpoints" / "last.pt", weights_only=False)
    assert ck["epoch"] == 30 and (d / "resolved_config.yaml").is_file()
    assert not list((d / "checkpoints").glob("*.tmp"))


@pytest.fixture(scope="module")
def digits_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("methods")
    return {m: run_inprocess(root, [f"method={m}", "trainer.max_epochs=3"], name=m)
            for m in ALONE}


@pytest.mark.parametrize("method", ALONE)
def test_every_method_learns_digits(digits_runs, method):
    s = digits_runs[method]
    assert s["test/acc1"] >= 0.95, s["test/acc1"]
    for k in ("intra_class_cos", "class_mean_abs_cos", "effective_rank",
              *METHODS.get(method).DIAGNOSTICS):  # what the method declares it reports
        assert f"geometry/{k}" in s, k


def test_opl_separates_class_means_more_than_ce(digits_runs):
    assert (digits_runs["opl"]["geometry/class_mean_abs_cos"]
            < digits_runs["ce"]["geometry/class_mean_abs_cos"])
    assert "train/opl_s" in digits_runs["opl"] and "train/opl_d" in digits_runs["opl"]


def test_gcr_run_keeps_bases_orthonormal(digits_runs):
    assert digits_runs["gcr"]["geometry/classifier_orth_err"] < 1e-4


@pytest.mark.parametrize("method", ALONE)
def test_smoke_on_100_synthetic_classes(tmp_path, method):
    s = run_inprocess(tmp_path, [f"method={method}", "data=synthetic", "data.num_classes=100",
                                 "experiment=smoke", "trainer.max_epochs=1",
                                 "data.image_size=16", "data.train_per_class=4",
                                 "data.test_per_class=2",
                                 "method.dim=128" if method == "ebv" else "seed=0"])
    assert s["status"] == "finished" and s["num_classes"] == 100


def _metrics(s):
    return {k: s[k] for k in METRICS}


def test_deterministic_runs_are_identical(tmp_path):
    args = ["experiment=smoke", "trainer.deterministic=true", "method=opl"]
    a = run_inprocess(tmp_path, args, name="a")
    b = run_inprocess(tmp_path, args, name="b")
    assert _metrics(a) == _metrics(b)


def test_killed_after_epoch_k_and_resumed_equals_uninterrupted(tmp_path, monkeypatch):
    from ortho_run.runner import trainer as tr

    args = ["experiment=smoke", "trainer.max_epochs=4", "trainer.deterministic=true",
            "method=gcr", "data.augment=crop_flip", "data.crop_padding=1"]
    full = run_inprocess(tmp_path, args, name="full")

    real_save = tr.Trainer.save

    def save_then_die(self, name="last.pt"):
        real_save(self, name)
        if self.state.epoch == 2:
            raise KeyboardInterrupt("simulated kill after epoch 2")

    monkeypatch.setattr(tr.Trainer, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run_inprocess(tmp_path, args, name="resumed")
    monkeypatch.setattr(tr.Trainer, "save", real_save)
    assert json.loads((tmp_path / "resumed" / "summary.json").read_text())["status"] == "failed"
    resumed = run_inprocess(tmp_path, args + ["trainer.resume=auto"], name="resumed")
    assert _metrics(resumed) == _metrics(full)
    rows = [json.loads(l) for l in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]


@pytest.mark.slow
def test_cli_default_command_and_multirun(tmp_path):
    r = cli([f"output_root={tmp_path}/single", "experiment=smoke", "method=cosine",
             "data=synthetic", "data.num_classes=100", "data.image_size=16"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert len(summaries(tmp_path / "single")) == 1
    r = cli(["-m", f"output_root={tmp_path}/multi", "seed=0,1", "experiment=smoke"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    s = summaries(tmp_path / "multi")
    assert sorted(x["seed"] for x in s) == [0, 1] and all(x["status"] == "finished" for x in s)
    assert len({x["run_dir"] for x in s}) == 2


def _rows(run_dir):
    return [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_compiled_training_matches_eager(tmp_path):
    """torch.compile (inductor; C++ on a CPU) through the net and the method's loss, OPL's
    autograd Function included: the same losses and accuracy as eager, step for step."""
    args = ["experiment=smoke", "trainer.deterministic=true", "method=opl"]
    eager = run_inprocess(tmp_path, args, name="eager")
    compiled = run_inprocess(tmp_path, args + ["trainer.compile=true"], name="compiled")
    import torch._dynamo

    torch._dynamo.reset()
    pairs = list(zip(_rows(tmp_path / "eager"), _rows(tmp_path / "compiled")))
    assert len(pairs) == 2
    for a, b in pairs:
        for k in ("train/loss", "train/ce", "train/opl", "test/loss"):
            assert b[k] == pytest.approx(a[k], rel=2e-3), k
    assert compiled["test/acc1"] == pytest.approx(eager["test/acc1"], abs=0.02)


def test_compile_mode_reaches_torch_compile(tmp_path, monkeypatch):
    import torch

    modes = []

    def record(fn, mode=None, **kw):
        modes.append(mode)
        return fn

    monkeypatch.setattr(torch, "compile", record)
    run_inprocess(tmp_path, ["experiment=smoke", "trainer.max_epochs=1", "trainer.compile=true",
                             "trainer.compile_mode=reduce_overhead"])
    assert modes == ["reduce-overhead", "reduce-overhead"]  # the net and the loss


def test_the_commit_and_versions_are_those_the_process_loaded(tmp_path, monkeypatch):
    """Every job of a sweep records the commit and package versions read at the process's first
    run: a checkout that moves on (or a package upgraded) while the sweep runs does not change
    what later jobs, which still run the code loaded at the start, record."""
    import subprocess

    from ortho_run.runner import env

    first = run_inprocess(tmp_path, ["trainer.max_epochs=1"], name="first")

    def moved_on(*a, **k):  # git and the package metadata would now answer otherwise
        raise AssertionError("read again after the first run")

    monkeypatch.setattr(subprocess, "run", moved_on)
    monkeypatch.setattr(env.metadata, "version", moved_on)
    later = run_inprocess(tmp_path, ["trainer.max_epochs=1"], name="later")
    for k in ("git_commit", "git_dirty", "versions"):
        assert later[k] == first[k], k


# ------------------------------------------------------------------ what is marked as not learned
#: an other value for every key of the smoke run's config marked as changing nothing learned
NOT_LEARNED = {
    "data.eval_batch_size": 7, "data.num_workers": 0, "trainer.eval_every": 2,
    "trainer.checkpoint_every": 0, "trainer.resume": "none", "trainer.progress": "on",
    "trainer.log_every_steps": 1, "trainer.nonfinite_check_every": 1, "trainer.geometry": False,
    "trainer.retrieval": True, "trainer.tta_flip": True, "trainer.tta_translate": True,
    "trainer.warmup_steps": 3, "logger.mode": "offline", "logger.project": "elsewhere",
    "logger.entity": "someone", "logger.group": "g", "logger.name": "n", "logger.tags": ["t"],
    "logger.init_timeout": 5.0, "compat.evaluate": False, "tag": "other", "objective": "test/acc5",
    "reference": "airbench94", "output_root": "{tmp}/elsewhere", "cache_dir": "{tmp}/cache2",
}
#: keys that run the same maths in other kernels (another device, compiled code, another memory
#: layout): equal up to the order of floating-point operations, so not compared bit for bit
OTHER_KERNELS = {"trainer.device", "trainer.compile", "trainer.compile_mode",
                 "trainer.channels_last"}


def _not_learned_keys(cfg):
    from omegaconf import OmegaConf

    from ortho_run.config import LEARNED
    from ortho_run.store import effect_of

    def flat(d, p=""):
        for k, v in d.items():
            yield from flat(v, f"{p}{k}.") if isinstance(v, dict) else [f"{p}{k}"]

    return {k for k in flat(OmegaConf.to_container(cfg)) if effect_of(k) != LEARNED}


def test_every_key_marked_as_not_learned_has_an_other_value_to_train_with():
    from conftest import compose

    keys = _not_learned_keys(compose(["experiment=smoke"]))
    assert keys == set(NOT_LEARNED) | OTHER_KERNELS, (
        "a key marked as changing nothing learned needs an other value in NOT_LEARNED (or, "
        "if it only changes the kernels, a place in OTHER_KERNELS)", keys ^ (set(NOT_LEARNED)
                                                                          | OTHER_KERNELS))


@pytest.mark.slow
@pytest.mark.parametrize("key", sorted(NOT_LEARNED))
def test_a_key_marked_as_not_learned_trains_the_same_net_to_the_bit(tmp_path, key):
    """The mark says the key changes where or how a run is reported or evaluated, never what
    it learns: trained with another value of it, the net is bit-identical."""
    value = NOT_LEARNED[key]
    value = value.format(tmp=tmp_path) if isinstance(value, str) else value
    base = ["experiment=smoke", "trainer.max_epochs=2", "data.max_train_samples=256",
            "optim=muon", "data.augment=crop_flip"]
    if key == "data.num_workers":
        base.append("data.pipeline=loader")
    if key == "trainer.tta_translate":
        base.append("trainer.tta_flip=true")
    over = f"{key}={json.dumps(value) if not isinstance(value, str) else value}"
    nets = []
    for name, extra in (("ref", []), ("other", [over])):
        s = run_inprocess(tmp_path, [*base, *extra], name=name)
        assert s["status"] == "finished", s
        nets.append(torch.load(tmp_path / name / "checkpoints" / "last.pt",
                               weights_only=False)["net"])
    assert all(torch.equal(nets[0][k], nets[1][k]) for k in nets[0]), key
