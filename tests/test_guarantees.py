"""The guarantees for the newer parts (optimisers, regularisers, sources, the report, names,
resume commands), by class of fault: each fixed where the value enters, for every plugin of the
kind. A refusal is a ConfigError/DataError/CheckpointError (exit 2) naming what is wrong and
what to do, with nothing written."""

import json
import logging
from pathlib import Path

import pytest
import torch

from conftest import compose, run_inprocess
from ortho_run.errors import CheckpointError, ConfigError, DataError, Preempted

SMOKE = ["experiment=smoke", "trainer.max_epochs=1", "data.max_train_samples=128"]


def refused(tmp_path, overrides, exc=ConfigError, match=None):
    with pytest.raises(exc, match=match) as e:
        run_inprocess(tmp_path, overrides)
    assert e.value.exit_code == 2
    assert not (tmp_path / "run").exists()  # nothing written
    return str(e.value)


# ---------------------------------------------------------------- 1. a setting that selects nothing
@pytest.mark.parametrize("optim", ["muon", "normuon", "root", "auon", "auon_hybrid"])
def test_orthogonalised_roles_that_select_no_weight_matrix_are_refused(tmp_path, optim):
    msg = refused(tmp_path, [*SMOKE, f"optim={optim}", "optim.roles=[backbone_1d]"])
    assert "selects no trainable weight matrix" in msg and f"optim={optim}" in msg


@pytest.mark.parametrize("roles", ["[]", "[hiden]", "[hidden,bogus]"])
def test_unknown_or_empty_roles_are_refused_by_the_schema_check(tmp_path, roles):
    msg = refused(tmp_path, [*SMOKE, "optim=muon", f"optim.roles={roles}"])
    assert msg.startswith("optim.roles=") and "hidden" in msg


def test_an_orthogonalised_optimiser_on_a_frozen_backbone_is_refused_before_any_model_trains(
        tmp_path):
    msg = refused(tmp_path, ["experiment=compat_smoke", "method=lambda_orth", "optim=muon",
                             f"cache_dir={tmp_path}/cache"])
    assert "keeps its backbone frozen" in msg and "optim.roles" in msg
    assert not (tmp_path / "cache").exists()  # refused in the pre-flight: no old model trained


def test_role_tables_name_roles_and_absent_roles_are_said(tmp_path, caplog):
    msg = refused(tmp_path, [*SMOKE, "+optim.role_lr={heads: 0.1}"])
    assert msg.startswith("optim.role_lr=") and "backbone_1d" in msg
    with caplog.at_level(logging.WARNING, logger="ortho_run"):
        run_inprocess(tmp_path, [*SMOKE, "+optim.role_lr={method: 0.5}"], name="ok")
    assert "optim.role_lr: method name no role with trainable parameters" in caplog.text


@pytest.mark.parametrize("reg", ["soft_orth", "srip", "conv_orth"])
def test_a_regulariser_glob_that_matches_nothing_is_said_and_none_at_all_refused(
        tmp_path, reg, caplog):
    msg = refused(tmp_path, [*SMOKE, f"regularizer={reg}", "regularizer.layers=[nothing.*]"])
    assert "matches no" in msg and "body.0" in msg  # the layers it could have named
    with caplog.at_level(logging.WARNING, logger="ortho_run"):
        run_inprocess(tmp_path, [*SMOKE, f"regularizer={reg}",
                                 "regularizer.layers=[body.3,nothing.*]"], name="ok")
    assert "regularizer.layers: nothing.* match no" in caplog.text


# ---------------------------------------------------------------- 2. malformed values, foreign weights
@pytest.mark.parametrize("table,why", [
    ("{64by576: [1, 2, 3]}", "is not a matrix shape"),
    ("{64x576: [1, 2]}", "three finite numbers"),
    ("{64x576: [a, 2, 3]}", "three finite numbers"),
    ("{64x576: 3}", "three finite numbers"),
    ("{64x576: [1, nan, 3]}", "not a finite number"),
])
def test_malformed_root_coefficients_are_refused_before_any_work(tmp_path, table, why):
    msg = refused(tmp_path, [*SMOKE, "optim=root", f"+optim.root_coefficients={table}"])
    assert "optim.root_coefficients" in msg and why in msg


@pytest.mark.parametrize("override,key", [
    ("optim.betas=[0.9]", "optim.betas"), ("optim.brake_gamma=2.0", "optim.brake_gamma"),
    ("optim.ns_steps=0", "optim.ns_steps"), ("optim.ns_steps=1000", "optim.ns_steps"),
])
def test_malformed_orthogonalised_values_name_their_key(tmp_path, override, key):
    msg = refused(tmp_path, [*SMOKE, "optim=auon_hybrid", override])
    assert key in msg, msg


def _timm_weights(tmp_path, arch, in_chans):
    timm = pytest.importorskip("timm")
    f = tmp_path / f"{arch}_{in_chans}.pt"
    torch.save(timm.create_model(arch, num_classes=0, in_chans=in_chans).state_dict(), f)
    return f


@pytest.mark.parametrize("arch,in_chans,words", [
    ("resnet34", 1, "missing"),  # another architecture: keys that do not exist
    ("resnet18", 3, "takes 3-channel images, this data set has 1"),  # another input
])
def test_foreign_timm_weights_are_one_paragraph_naming_the_file(tmp_path, arch, in_chans, words):
    f = _timm_weights(tmp_path, arch, in_chans)
    msg = refused(tmp_path, [*SMOKE, "model=timm", "model.arch=resnet18",
                             f"model.checkpoint={f}"], exc=CheckpointError)
    assert str(f) in msg and words in msg and "model.arch=resnet18" in msg


# ---------------------------------------------------------------- 3. legitimate data that crashed
def test_label_names_become_sorted_class_ids():
    from ortho_run.datasets.base import label_ids

    assert label_ids([[1, 0], [0]], "k") == ([[1, 0], [0]], None)
    assert label_ids([[1.0, 0.0], [2.0]], "k") == ([[1, 0], [2]], None)  # a CSV's integers
    assert label_ids([["dog", "cat"], ["emu", "cat"]], "k") == ([[1, 0], [2, 0]],
                                                               ["cat", "dog", "emu"])
    with pytest.raises(DataError, match="missing values"):
        label_ids([["dog", None]], "data.label_key=label")


@pytest.mark.parametrize("form", ["save_to_disk", "parquet"])
def test_a_hugging_face_set_with_string_labels_trains_and_records_the_mapping(tmp_path, form):
    datasets = pytest.importorskip("datasets")
    from PIL import Image

    rng = torch.Generator().manual_seed(0)
    names = ["cat", "dog", "emu"]
    rows = {"image": [], "label": []}
    for i in range(60):
        c = i % 3
        arr = (torch.rand(8, 8, 3, generator=rng) * 60 + 60 * c).to(torch.uint8).numpy()
        rows["image"].append(Image.fromarray(arr))
        rows["label"].append(names[c])
    ds = datasets.Dataset.from_dict(rows, features=datasets.Features(
        {"image": datasets.Image(), "label": datasets.Value("string")}))
    if form == "save_to_disk":
        path = tmp_path / "hfset"
        ds.save_to_disk(str(path))
    else:
        path = tmp_path / "set.parquet"
        ds.to_parquet(str(path))
    s = run_inprocess(tmp_path, ["data=hf", f"data.path={path}", "trainer.max_epochs=2",
                                 "data.batch_size=16"])
    assert s["status"] == "finished" and s["num_classes"] == 3
    assert s["label_names"] == {"cat": 0, "dog": 1, "emu": 2}
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["label_names"]["emu"] == 2


def test_batches_of_one_image_are_refused_where_batch_norm_cannot_train_them(tmp_path):
    msg = refused(tmp_path, [*SMOKE, "model=resnet18_cifar", "data.batch_size=1"])
    assert "data.batch_size=1" in msg and "model=resnet18_cifar" in msg, msg
    # small_cnn's batch norms see 8x8 maps: one image is enough for them
    s = run_inprocess(tmp_path, [*SMOKE, "data.batch_size=1", "data.max_train_samples=4"],
                      name="ok")
    assert s["status"] == "finished" and s["step"] == 4


# ---------------------------------------------------------------- 4. the report drops or crashes
def _summary(d: Path, **kw):
    d.mkdir(parents=True)
    (d / "summary.json").write_text(json.dumps({"status": "finished", "method": "ce",
                                                "data": "digits", **kw}))


def test_the_report_shows_nan_and_lists_every_run_it_does_not_show(tmp_path):
    from ortho_run.report import report

    _summary(tmp_path / "a", overrides=["method=ce"], **{"test/acc1": 0.9})
    (tmp_path / "a" / "summary.json").write_text(
        (tmp_path / "a" / "summary.json").read_text().replace("0.9", "NaN"))
    _summary(tmp_path / "b", overrides=["method=ce"], **{"test/acc1": 0.8})
    _summary(tmp_path / "c", status="diverged", error="non-finite loss at step 3")
    _summary(tmp_path / "d", overrides=["method=bt2"], **{"compat/ac": 0.5})  # no table metric
    _summary(tmp_path / "e", overrides=["method=oca"], **{
        "test/acc1": 0.7, "compat/steps/cmc1": [[0.5, None], [float("nan"), 0.6]],
        "compat/steps/map": [[0.4, None], [0.3, 0.5]], "compat/steps/classes": [2, 4]})
    _summary(tmp_path / "f", overrides=["method=bct"], **{"test/acc1": 0.6})
    (tmp_path / "f" / "resolved_config.yaml").write_text("compat:\n  steps: [first_half, all]\n")
    table, problems, _, out = report([tmp_path], plots=False, metrics=["test/acc1"])
    md = (out / "report.md").read_text()
    assert "nan ± nan (n=2)" in md  # a NaN run is in its group, shown as NaN
    left = {Path(d).name: why for d, why in problems}
    assert "diverged" in left["c"] and "non-finite" in left["c"]
    assert "none of the table's metrics" in left["d"]
    assert "without its step matrices" in left["f"]
    assert "nan" in md.split("## Multi-step compatibility")[1]  # the matrix shows it too
    shown = {"a", "b", "e", "f"}
    assert shown | set(left) == {"a", "b", "c", "d", "e", "f"}  # every run somewhere


# ---------------------------------------------------------------- 5. names that collide
def test_jobs_of_a_sweep_never_share_a_name():
    from ortho_run.naming import job_name

    cfg = compose(["experiment=smoke"])
    names = {job_name(cfg, {"overrides": ov, "job_num": i})
             for i, ov in enumerate([["experiment=smoke"], ["experiment=optim_study"],
                                     ["experiment=smoke", "trainer.compile=true"],
                                     ["experiment=smoke", "trainer.compile=false"]])}
    assert len(names) == 4
    assert any("experiment=optim_study" in n for n in names)  # the group override is named


# ---------------------------------------------------------------- 6. resume commands
def test_a_stop_while_an_earlier_model_trains_prints_the_users_command(tmp_path, monkeypatch):
    import ortho_run.compat.provider as provider

    def stopped(*a, **k):
        raise Preempted("stopped by signal 15 at epoch 1, batch 2; ... Resume with: ortho-run "
                        "trainer.resume=auto hydra.run.dir=/the/cache/models/abc")

    monkeypatch.setattr(provider, "cached_run", stopped)
    from ortho_run.runner.run import run

    cfg = compose(["logger.mode=disabled", "trainer.progress=off", "experiment=compat_smoke",
                   "method=bct", f"cache_dir={tmp_path}/cache"])
    with pytest.raises(Preempted) as e:
        run(cfg, tmp_path / "mine", sweep={"overrides": ["experiment=compat_smoke",
                                                         "method=bct"]})
    msg = str(e.value)
    assert msg.count("Resume with:") == 1 and "/the/cache" not in msg
    assert msg.endswith(f"ortho-run experiment=compat_smoke method=bct trainer.resume=auto "
                        f"hydra.run.dir={tmp_path / 'mine'}")


def test_a_checkpoint_that_may_not_be_continued_is_refused_before_an_earlier_model_trains(
        tmp_path, monkeypatch):
    import ortho_run.compat.provider as provider
    from ortho_run.errors import CheckpointError

    run_inprocess(tmp_path, ["experiment=smoke", "trainer.max_epochs=1"], name="mine")
    before = {p: p.read_bytes() for p in (tmp_path / "mine").rglob("*") if p.is_file()}

    def trained(*a, **k):
        raise AssertionError("an earlier model was trained or loaded before the resume check")

    monkeypatch.setattr(provider, "cached_run", trained)
    with pytest.raises(CheckpointError, match="another config"):
        run_inprocess(tmp_path, ["experiment=compat_smoke", "method=bct", "trainer.resume=auto",
                                 f"cache_dir={tmp_path}/cache"], name="mine")
    assert {p: p.read_bytes() for p in (tmp_path / "mine").rglob("*") if p.is_file()} == before


def test_a_stopped_sweep_job_prints_the_sweep_command():
    from ortho_run.runner.run import resume_command

    sweep = {"overrides": ["method=opl", "seed=1"], "job_num": 3, "sweep_dir": "/s/x",
             "sweep_overrides": ["method=ce,opl", "seed=0,1"]}
    assert resume_command(Path("/s/x/3_method=opl"), sweep) == \
        "ortho-run -m method=ce,opl seed=0,1 hydra.sweep.dir=/s/x"
    # a rerun of a saved config continues from its own saved config; a rerun sweep, the sweep
    rerun = {"overrides": ["optim=muon", "seed=1"], "rerun_of": "/runs/a"}
    assert resume_command(Path("/r/x y"), rerun) == \
        "ortho-run --from '/r/x y' trainer.resume=auto 'hydra.run.dir=/r/x y'"
    rerun.update(job_num=1, sweep_dir="/s/y", sweep_overrides=["seed=0,1"])
    assert resume_command(Path("/s/y/1_seed=1"), rerun) == \
        "ortho-run --from /runs/a -m seed=0,1 hydra.sweep.dir=/s/y"


# ---------------------------------------------------------------- 7. absurd but finite values
@pytest.mark.parametrize("override,key", [
    ("trainer.nonfinite_check_every=1000000000000", "trainer.nonfinite_check_every"),
    ("data.batch_size=1000000000", "data.batch_size"),
    ("data.eval_batch_size=1000000000", "data.eval_batch_size"),
    ("data.crop_padding=100000", "data.crop_padding"),
    ("model.embed_dim=1000000000", "model.embed_dim"),
    ("model.width=1000000", "model.width"),
    ("trainer.warmup_steps=1000000000", "trainer.warmup_steps"),
])
def test_values_that_would_exhaust_memory_are_refused_naming_the_key(tmp_path, override, key):
    msg = refused(tmp_path, [*SMOKE, override])
    assert msg.startswith(key) and "<=" in msg or "in [" in msg


@pytest.mark.parametrize("extra,key", [
    (["data=synthetic", "data.image_size=100000"], "data.image_size"),
    (["data=synthetic", "data.train_per_class=100000000"], "data.train_per_class"),
    (["model=airbench94", "model.widths=[64,1000000,256]"], "model.widths"),
    (["method=ebv", "method.dim=10000000"], "method.dim"),
    (["method=gcr", "method.k=100000"], "method.k"),
])
def test_plugin_sizes_are_bounded_where_their_schema_is(tmp_path, extra, key):
    msg = refused(tmp_path, [*SMOKE, *extra])
    assert msg.startswith(key), msg


# ---------------------------------------------------------------- 8. numbers without a range
def _numeric_keys(node, prefix=""):
    """The dotted keys of a composed config whose schema type is a number (or a list of them)."""
    import typing

    from omegaconf import DictConfig, ListConfig

    def numeric(t):
        return t in (int, float) or any(a in (int, float) for a in typing.get_args(t))

    for k in node.keys():
        child, key = node._get_node(k), f"{prefix}{k}"
        if isinstance(child, DictConfig):
            yield from _numeric_keys(child, key + ".")
        elif numeric(child._metadata.element_type if isinstance(child, ListConfig)
                     else child._metadata.ref_type):
            yield key


def test_every_number_a_schema_declares_has_a_range():
    """A numeric key of any plugin's schema (or of the shared ones) that no check covers takes a
    meaningless value silently: each must have a range in ``config.RANGES`` or in its schema's
    checks (a schema inherits those of the schema it extends)."""
    from omegaconf import OmegaConf

    from ortho_run.config import RANGES, schema_checks
    from ortho_run.store import plugin_registries

    shared = {k for k, _, _ in RANGES}
    cfg = compose()
    groups = plugin_registries()
    unchecked = {k for k in _numeric_keys(cfg) if k.split(".")[0] not in groups} - shared
    for group, reg in groups.items():
        for name in reg.names():
            schema = reg.schema(name)
            checked = shared | {f"{group}.{f}" for f, _, _ in schema_checks(schema)}
            unchecked |= {f"{group}={name}: {k}" for k in
                          _numeric_keys(OmegaConf.structured(schema), f"{group}.")
                          if k not in checked}
    assert not unchecked, sorted(unchecked)


def test_a_schema_that_extends_another_keeps_its_checks():
    from dataclasses import dataclass
    from typing import ClassVar

    from ortho_run.config import schema_checks
    from ortho_run.methods.ce import CEConfig

    @dataclass
    class Extended(CEConfig):
        margin: float = 0.5
        checks: ClassVar[list] = [("margin", lambda v: v >= 0, ">= 0")]

    assert {f for f, _, _ in schema_checks(Extended)} == {"init_std", "margin"}


@pytest.mark.parametrize("extra,key", [
    (["method=opl", "method.init_std=-1"], "method.init_std"),  # a field of the CE head it extends
    (["method=bct", "method.init_std=0"], "method.init_std"),
    (["optim=muon", "optim.other=sgd", "optim.other_momentum=1.5"], "optim.other_momentum"),
    (["optim=normuon", "optim.norm_eps=-1e-10"], "optim.norm_eps"),
    (["optim=root", "optim.root_scale=0"], "optim.root_scale"),
    (["optim=sgd", "optim.scheduler=multistep", "optim.milestones=[0,3]"], "optim.milestones"),
    (["method=ebv", "method.gen_seed=-1"], "method.gen_seed"),
    (["model=airbench94", "model.bn_eps=0"], "model.bn_eps"),
    (["data=torchvision", "data.dataset=CIFAR10", "data.in_memory_mb=-1"], "data.in_memory_mb"),
])
def test_a_meaningless_number_is_refused_naming_the_key(tmp_path, extra, key):
    msg = refused(tmp_path, [*SMOKE, *extra])
    assert msg.startswith(f"{key}=") and "out of range" in msg, msg


@pytest.mark.parametrize("milestones,said", [("[]", True), ("[5,9]", True), ("[1,5]", False)])
def test_a_step_schedule_that_never_steps_inside_the_run_is_said(milestones, said, caplog):
    from ortho_run.validate import validate

    with caplog.at_level(logging.WARNING, logger="ortho_run"):
        validate(compose(["optim.scheduler=multistep", f"optim.milestones={milestones}",
                          "trainer.max_epochs=5"]))
    assert ("the learning rate never steps down" in caplog.text) == said, caplog.text


@pytest.mark.parametrize("objective", ["", "acc1", "test/", "tset/acc1"])
def test_an_objective_that_names_no_metric_is_refused(tmp_path, objective):
    msg = refused(tmp_path, [*SMOKE, f"objective={objective}"])
    assert msg.startswith("objective=") and "test/acc1" in msg, msg


def test_the_objective_a_sweeper_gets_is_a_summary_metric_or_said_missing(tmp_path, caplog):
    from ortho_run.keys import METRIC_FAMILIES, objective_value

    s = run_inprocess(tmp_path, SMOKE)
    families = {k.split("/")[0] for k in s if "/" in k}
    assert families <= set(METRIC_FAMILIES), families - set(METRIC_FAMILIES)
    assert objective_value(s, "test/acc1") == s["test/acc1"]
    with caplog.at_level(logging.WARNING, logger="ortho_run"):
        assert objective_value(s, "test/acc7") is None
    assert "objective=test/acc7" in caplog.text and "test/acc1" in caplog.text


# ---------------------------------------------------------------- 9. messages that say what to do
def test_a_compat_checkpoint_without_its_old_model_record_says_what_to_do(tmp_path):
    from ortho_run.assemble import load_run

    run_inprocess(tmp_path, ["experiment=compat_smoke", "method=bct", "trainer.max_epochs=1",
                             f"cache_dir={tmp_path}/cache"])
    ck = tmp_path / "run" / "checkpoints" / "last.pt"
    state = torch.load(ck, weights_only=False)
    del state["shape"]["compat"]  # as another run or version wrote it
    torch.save(state, ck)
    with pytest.raises(CheckpointError, match="without the record of the old model") as e:
        load_run(tmp_path / "run", "cpu")
    assert "Delete" in str(e.value) and "compat.old_ckpt" in str(e.value)


def test_a_torchvision_set_without_its_files_names_the_files(tmp_path):
    msg = refused(tmp_path, [*SMOKE, "data=torchvision", "data.dataset=CIFAR10",
                             f"data.root={tmp_path}/none"], exc=DataError)
    assert "cifar-10-batches-py" in msg and "data_batch_1" in msg and "test_batch" in msg


@pytest.mark.parametrize("saved,resumed,older", [
    ("muon", "sgd", False),  # another number of optimisers
    ("muon", "normuon", False),  # one class, another rule: its row moments are missing
    ("sgd", "adam", False),  # one optimiser each, another kind of state
    ("muon", "normuon", True),  # a checkpoint of a version that did not record the kinds
])
def test_a_forced_resume_whose_state_does_not_fit_says_what_to_do_and_keeps_the_run(
        tmp_path, saved, resumed, older):
    run_inprocess(tmp_path, [*SMOKE, f"optim={saved}"])
    ck = tmp_path / "run" / "checkpoints" / "last.pt"
    if older:
        state = torch.load(ck, weights_only=False)
        del state["optimizer_kinds"]
        torch.save(state, ck)
    before = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.is_file()}
    with pytest.raises(CheckpointError) as e:  # refused while the job is built, not at a step
        run_inprocess(tmp_path, [*SMOKE, f"optim={resumed}", "trainer.max_epochs=2",
                                 "trainer.resume=force"])
    msg = str(e.value)
    assert "trainer.resume=none" in msg or "new run" in msg, msg
    assert ("does not fit" in msg) if not older else ("another optimiser" in msg), msg
    after = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.is_file()}
    assert after == before  # nothing lost: summary, metrics, config as they were


# ---------------------------------------------------------------- a run from its saved config
def test_a_saved_config_retrains_the_run_it_was_saved_from_to_the_bit(tmp_path):
    """A run dir's resolved_config.yaml loaded as a plain config (what ``ortho-run --from RUN``
    and Hydra's ``--config-path RUN/.hydra`` give the runner) is typed by the schemas of the
    plugins it names and retrains the run exactly."""
    from omegaconf import OmegaConf

    from ortho_run.runner.run import run

    a = run_inprocess(tmp_path, [*SMOKE, "optim=muon", "trainer.max_epochs=2"])
    saved = (tmp_path / "run" / "resolved_config.yaml").read_text()
    b = run(OmegaConf.create(saved), tmp_path / "again")
    assert b["status"] == "finished" and b["test/acc1"] == a["test/acc1"]
    nets = [torch.load(tmp_path / d / "checkpoints" / "last.pt", weights_only=False)["net"]
            for d in ("run", "again")]
    assert nets[0].keys() == nets[1].keys()
    assert all(torch.equal(nets[0][k], nets[1][k]) for k in nets[0])
    assert (tmp_path / "again" / "resolved_config.yaml").read_text() == saved


def test_the_rerun_config_reads_a_saved_run_as_todays_schemas_and_refuses_what_is_none(tmp_path,
                                                                                      caplog):
    from omegaconf import OmegaConf

    from ortho_run.store import rerun_config
    from ortho_run.validate import validate

    run_inprocess(tmp_path, [*SMOKE, "optim=normuon"])
    saved = OmegaConf.to_container(OmegaConf.load(tmp_path / "run" / "resolved_config.yaml"))
    del saved["optim"]["conv_shape"]  # as a run of a version before the key existed saved it
    (tmp_path / "old.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(saved)))
    with caplog.at_level("WARNING", logger="ortho_run"):
        primary = rerun_config(tmp_path / "old.yaml")
    assert primary["optim"]["conv_shape"] == "matrix"  # the behaviour from before the key
    assert "left out" not in caplog.text
    # keys this version lacks (removed since, or a typo of an edited file) are left out, named
    saved["optim"]["ns_stepz"], saved["gone"] = 3, 1
    (tmp_path / "edited.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(saved)))
    with caplog.at_level("WARNING", logger="ortho_run"):
        edited = rerun_config(tmp_path / "edited.yaml")
    assert "ns_stepz" not in edited["optim"] and "gone" not in edited
    assert "this version has no key optim.ns_stepz, gone: left out" in caplog.text
    assert primary["hydra"]["output_subdir"] is None  # a refused rerun writes nothing either
    assert any("override hydra/help" in str(d) for d in primary["defaults"])
    job = {k: v for k, v in primary.items() if k not in ("defaults", "hydra")}
    typed = validate(OmegaConf.create(job))
    assert str(typed.optim.conv_shape) == "matrix" and float(typed.optim.lr) == 0.02
    with pytest.raises(ConfigError, match="no resolved_config.yaml there"):
        rerun_config(tmp_path)
    (tmp_path / "x.yaml").write_text("a: 1\n")
    with pytest.raises(ConfigError, match="not an ortho-run run config"):
        rerun_config(tmp_path / "x.yaml")
    job["optim"]["nosuch"] = 1
    with pytest.raises(ConfigError, match="unknown key optim.nosuch"):
        validate(OmegaConf.create(job))


# ---------------------------------------------------------------- a model and data that differ
@pytest.mark.parametrize("overrides,size", [
    (["model=airbench94"], "1 x 8 x 8"),  # digits: its pooling needs larger images
    (["experiment=airbench94", "data=synthetic", "data.image_size=16", "trainer.compile=false",
      "trainer.warmup_steps=0"], "3 x 16 x 16"),
])
def test_a_model_that_cannot_take_the_datas_images_is_refused_before_any_work(
        tmp_path, overrides, size):
    msg = refused(tmp_path, [*SMOKE, *overrides])
    assert "cannot take the images of data=" in msg and size in msg and "Choose a model" in msg
    assert not (tmp_path / "run").exists()  # refused in the pre-flight: nothing written


def test_a_backbone_is_probed_without_changing_it_and_must_give_its_declared_width():
    from torch import nn

    from ortho_run.assemble import NetSpec, check_input_shape
    from ortho_run.models import Backbone

    spec = NetSpec(channels=1, image_size=2, num_classes=2, embed_dim=None)
    body = nn.Sequential(nn.Flatten(), nn.BatchNorm1d(4), nn.Dropout(0.5))
    good = Backbone(body, feature_dim=4).train()
    before = {k: v.clone() for k, v in good.state_dict().items()}
    rng = torch.get_rng_state()
    check_input_shape(good, spec, "toy", "toy_data")
    assert good.training and torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(v, good.state_dict()[k]) for k, v in before.items())
    with pytest.raises(ConfigError, match=r"gives features of shape \(4,\).*feature_dim=5"):
        check_input_shape(Backbone(nn.Flatten(), feature_dim=5), spec, "toy", "toy_data")


def test_a_run_whose_regulariser_reparametrises_its_layers_reloads_and_serves_as_an_old_model(
        tmp_path):
    """``regularizer=orthogonal`` gives the net parametrised layers: a finished run reloads
    with them (its weights to the bit), and a compatibility run can take it as its old model."""
    from ortho_run.assemble import load_run

    run_inprocess(tmp_path, [*SMOKE, "regularizer=orthogonal", "model.embed_dim=8"])
    net, _, _ = load_run(tmp_path / "run", "cpu")
    saved = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=False)["net"]
    assert any("parametrizations" in k for k in saved)
    assert net.state_dict().keys() == saved.keys()
    assert all(torch.equal(net.state_dict()[k], v) for k, v in saved.items())
    s = run_inprocess(tmp_path, ["experiment=compat_smoke", "method=bct", "trainer.max_epochs=1",
                                 "regularizer=orthogonal", f"cache_dir={tmp_path}/cache"],
                      name="compat")
    assert s["status"] == "finished" and "compat/new_old/cmc1" in s


def test_data_num_workers_changes_nothing_that_is_learned(tmp_path):
    """``data.num_workers`` is marked as a key that changes no result: with the loader
    pipeline's per-image transform seeds, a run with workers trains bit-identically to one
    without."""
    from ortho_run.config import REPORT
    from ortho_run.store import effect_of

    assert effect_of("data.num_workers") == REPORT
    nets = []
    for workers in (0, 2):
        run_inprocess(tmp_path, [*SMOKE, "data.pipeline=loader", "data.augment=crop_flip",
                                 f"data.num_workers={workers}", "trainer.max_epochs=2"],
                      name=f"w{workers}")
        nets.append(torch.load(tmp_path / f"w{workers}" / "checkpoints" / "last.pt",
                               weights_only=False)["net"])
    assert all(torch.equal(nets[0][k], nets[1][k]) for k in nets[0])


@pytest.mark.parametrize("overrides,keys", [
    (["optim=sgd", "optim.momentum=0", "optim.nesterov=true"], ["optim.nesterov", "optim.momentum"]),
    (["optim=muon", "optim.other=sgd", "optim.other_momentum=0", "optim.other_nesterov=true"],
     ["optim.other_nesterov", "optim.other_momentum"]),
])
def test_nesterov_without_momentum_is_refused_in_the_pre_flight_naming_both_keys(
        tmp_path, overrides, keys):
    msg = refused(tmp_path, [*SMOKE, *overrides])
    assert all(k in msg for k in keys), msg
