"""The plugin shape: one registry style for every group, one place for every default, and the
import graph flowing one way."""

import ast
import dataclasses
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from conftest import REPO

PLUGIN_GROUPS = ("data", "model", "method", "optim", "regularizer")


def _schema_defaults(schema) -> dict:
    out = {}
    for f in dataclasses.fields(schema):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return OmegaConf.to_container(OmegaConf.create(
        {k: (v.value if hasattr(v, "value") else v) for k, v in out.items()}))


def test_no_yaml_restates_a_schema_default():
    """A default lives in one place: the schema. A group yaml holds only what differs."""
    from ortho_run.config import GROUP_SCHEMAS
    from ortho_run.store import config_dir, plugin_registries

    regs = plugin_registries()
    restated = []
    for group in (*PLUGIN_GROUPS, *GROUP_SCHEMAS):
        for f in sorted((config_dir() / group).glob("*.yaml")):
            body = OmegaConf.to_container(OmegaConf.load(f))
            defaults = body.pop("defaults")
            target = f"/schema/{group}/{f.stem if group in regs else 'default'}@_here_"
            assert defaults[0] == target, (f, defaults)
            schema = regs[group].schema(f.stem) if group in regs else GROUP_SCHEMAS[group]
            ref = _schema_defaults(schema)
            restated += [f"{group}/{f.name}: {k}={v!r}" for k, v in body.items()
                         if k in ref and ref[k] == v]
    assert not restated, "yaml values equal to their schema default:\n" + "\n".join(restated)


def test_every_selectable_plugin_has_a_yaml_and_every_yaml_a_plugin():
    from ortho_run.store import config_dir, plugin_registries

    for group, reg in plugin_registries().items():
        assert {p.stem for p in (config_dir() / group).glob("*.yaml")} == set(reg.names()), group


def test_schemas_are_not_selectable_options():
    from conftest import compose
    from hydra.errors import MissingConfigException

    for ov in ("method=ce_schema", "data=schema", "trainer=schema", "method=schema"):
        with pytest.raises(MissingConfigException) as e:
            compose([ov])
        assert "schema" not in str(e.value).split("Available options")[-1].split("Config search")[0]


# ------------------------------------------------------------------ toy plugins of each kind
@dataclass
class _ToyDataConfig:
    pass


@pytest.fixture
def toy_plugins(tmp_path):
    """One toy plugin per group, registered the way a plugin file does, plus its yaml in a copy
    of the conf tree: nothing else changes."""
    from ortho_run.config import DataConfig, MethodConfig, ModelConfig, OptimConfig
    from ortho_run.datasets.base import SOURCES, DataSet, Split
    from ortho_run.methods import METHODS, Method, MethodOutput
    from ortho_run.models import MODELS
    from ortho_run.optim import OPTIMIZERS, SCHEDULES, torch_groups

    @dataclass
    class ToyData(DataConfig):
        n: int = 40

    @SOURCES.register("toy_data", schema=ToyData)
    def load_toy(cfg):
        g = torch.Generator().manual_seed(0)
        y = torch.arange(cfg.n) % 2
        x = (y[:, None, None, None] * 200 + torch.randint(0, 50, (cfg.n, 1, 4, 4), generator=g))
        s = Split(y=y, x=x.to(torch.uint8))
        return DataSet("toy_data", s, s, num_classes=2, channels=1, image_size=4)

    @dataclass
    class ToyModel(ModelConfig):
        hidden: int = 5

    @MODELS.register("toy_model", schema=ToyModel)
    def toy_model(cfg, in_channels, image_size):
        return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * image_size ** 2, cfg.hidden)), cfg.hidden

    @dataclass
    class ToyMethodConfig(MethodConfig):
        name: str = "toy_method"
        temperature: float = 1.0

    @METHODS.register("toy_method")
    class ToyMethod(Method):
        Config = ToyMethodConfig

        def __init__(self, cfg, ctx):
            super().__init__(cfg, ctx)
            self.fc = nn.Linear(ctx.feature_dim, ctx.num_classes)

        def forward(self, batch):
            return MethodOutput(logits=self.fc(batch.features) / self.cfg.temperature)

    @dataclass
    class ToyOptim(OptimConfig):
        lr: float = 0.05
        scheduler: str = "toy_schedule"

    calls = []

    @OPTIMIZERS.register("toy_optim", schema=ToyOptim)
    def toy_optim(groups, cfg, device):
        calls.append(sorted(g.role for g in groups))
        return [torch.optim.SGD(torch_groups(groups, cfg), lr=cfg.lr)]

    @SCHEDULES.register("toy_schedule")
    def toy_schedule(cfg, step, warm, total, spe):
        return 1.0 / (1 + step)

    from ortho_run.config import evaluation
    from ortho_run.regularizers import REGULARIZERS, Regularizer, RegularizerConfig

    @dataclass
    class ToyRegularizerConfig(RegularizerConfig):
        power: float = 2.0
        report_every: int = evaluation(1)  # a key that does not change what is learned

    @REGULARIZERS.register("toy_regularizer", schema=ToyRegularizerConfig)
    class ToyRegularizer(Regularizer):
        DIAGNOSTICS = {"toy_norm": "the toy regulariser's weight norm"}

        def penalty(self):
            return sum(w.norm() ** self.cfg.power for w in self.weights())

        def diagnostics(self):
            return {**super().diagnostics(), "toy_norm": float(self.penalty().detach())}

    conf = tmp_path / "conf"
    shutil.copytree(REPO / "conf", conf)
    for group, name in (("data", "toy_data"), ("model", "toy_model"), ("method", "toy_method"),
                        ("optim", "toy_optim"), ("regularizer", "toy_regularizer")):
        (conf / group / f"{name}.yaml").write_text(
            f"defaults: [/schema/{group}/{name}@_here_, _self_]\n")
    yield conf, calls
    for reg, name in ((SOURCES, "toy_data"), (MODELS, "toy_model"), (METHODS, "toy_method"),
                      (OPTIMIZERS, "toy_optim"), (SCHEDULES, "toy_schedule"),
                      (REGULARIZERS, "toy_regularizer")):
        reg.unregister(name)


def test_a_toy_plugin_of_each_kind_is_one_registration_plus_one_yaml(tmp_path, toy_plugins):
    from hydra import compose, initialize_config_dir

    from ortho_run.runner.run import run
    from ortho_run.store import register_configs

    conf, calls = toy_plugins
    register_configs()
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            "data=toy_data", "model=toy_model", "method=toy_method", "optim=toy_optim",
            "regularizer=toy_regularizer", "regularizer.weight=0.001",
            "logger.mode=disabled", "trainer.progress=off", "trainer.max_epochs=3",
            "data.batch_size=8", "method.temperature=0.5", "model.hidden=6"])
    s = run(cfg, tmp_path / "run")
    assert s["status"] == "finished" and s["test/acc1"] == 1.0  # a separable toy task
    assert s["train/reg"] > 0 and s["geometry/toy_norm"] > 0  # the toy regulariser ran
    # the report describes what the toy plugins declare; the bench and the tests' lists
    # (registries) include them; a key the toy schema marks is ignored by the resume check
    from ortho_run.report import describe
    from ortho_run.store import compatibility_methods, effect_of

    assert describe("geometry/toy_norm") == "toy_regularizer: the toy regulariser's weight norm"
    assert "toy_method" in compatibility_methods(compat=False)
    assert effect_of("regularizer.report_every") == "evaluation"
    assert calls == [["backbone_1d", "head", "stem"]]  # role-tagged groups reached the optimiser
    rows = [OmegaConf.to_container(OmegaConf.create(l)) for l in
            (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = rows[-1]["step"]
    assert rows[-1]["lr"] == pytest.approx(0.05 / (1 + steps))  # the toy schedule drove the lr
    assert OmegaConf.load(tmp_path / "run" / "resolved_config.yaml").model.hidden == 6


def test_gcr_bases_go_to_the_riemannian_optimiser_by_name():
    from conftest import compose

    from ortho_run.runner.run import build_job

    cfg = compose(["method=gcr", "experiment=smoke", "logger.mode=disabled"])
    job = build_job(cfg, Path("/nonexistent"))
    kinds = [type(o).__name__ for o in job.trainer.optimizers]
    assert kinds == ["SGD", "GrassmannSGD"]
    roles = [g["role"] for g in job.trainer.optimizers[0].param_groups]
    assert roles == ["stem+hidden+backbone_1d"]  # one torch group; the bases are not in SGD
    assert job.trainer.optimizers[1].param_groups[0]["params"][0] is job.net.method.bases


# ------------------------------------------------------------------ one source for each idea
def test_sweep_folder_names_leave_out_exactly_the_report_keys():
    """Hydra's exclude_keys (conf/config.yaml) is the list of keys the schemas mark REPORT."""
    from ortho_run.store import config_dir, report_override_keys

    cfg = OmegaConf.load(config_dir() / "config.yaml")
    assert list(cfg.hydra.job.config.override_dirname.exclude_keys) == report_override_keys()


@pytest.mark.parametrize("key,value,effect", [
    ("trainer.progress", "off", "report"), ("logger.mode", "online", "report"),
    ("trainer.eval_every", 3, "evaluation"), ("trainer.compile", True, "evaluation"),
    ("tag", "runs/a", "label"),  # tells runs apart without changing them
    ("optim.lr", 0.05, "learned"), ("method.gamma", 0.3, "learned")])
def test_a_keys_mark_drives_the_resume_check_the_cache_key_and_the_names_together(
        key, value, effect):
    from conftest import compose

    from ortho_run import naming
    from ortho_run.checkpoint import config_differences, config_hash, run_config
    from ortho_run.compat.provider import learned_part
    from ortho_run.store import effect_of

    assert effect_of(key) == effect
    base = compose(["method=opl"])
    other = compose(["method=opl", f"{key}={value}"])
    resume_refused = bool(config_differences(run_config(base), other))
    cache_key_changes = (config_hash(learned_part(run_config(base)))
                         != config_hash(learned_part(run_config(other))))
    name_changes = (naming.run_name("opl", "digits", 0, ["method=opl"])
                    != naming.run_name("opl", "digits", 0, ["method=opl", f"{key}={value}"]))
    assert resume_refused == cache_key_changes == (effect == "learned")
    assert name_changes == (effect != "report")


def test_a_key_added_to_a_schema_since_a_checkpoint_is_no_difference_at_its_default():
    from conftest import compose

    from ortho_run.checkpoint import config_differences, run_config

    cfg = compose(["optim=muon"])
    saved = run_config(cfg)
    del saved["optim"]["ns_coefficients"], saved["trainer"]["loss_reduction"]  # an older run's
    saved["optim"]["a_key_since_removed"] = 3
    assert config_differences(saved, cfg) == {}
    assert config_differences(saved, compose(["optim=muon", "optim.ns_coefficients=quintic"]))


def test_a_config_saved_before_the_regulariser_weight_schedule_reads_as_a_constant_weight():
    """A key added to a schema takes its schema default in an older run's config, so that
    default is the behaviour from before the key (a constant weight); SRIP's official steps live
    in its yaml, and resuming an older SRIP run under them is a difference that names them."""
    from conftest import compose

    from ortho_run.checkpoint import config_differences, run_config
    from ortho_run.store import upgraded

    cfg = compose(["regularizer=srip"])
    saved = run_config(cfg)
    del saved["regularizer"]["weight_milestones"], saved["regularizer"]["weight_factors"]
    old = upgraded(saved)["regularizer"]
    assert (old["weight_milestones"], old["weight_factors"]) == ([], [])
    assert sorted(config_differences(saved, cfg)) == ["regularizer.weight_factors",
                                                      "regularizer.weight_milestones"]
    steps = ["regularizer.weight_milestones=[]", "regularizer.weight_factors=[]"]
    assert config_differences(saved, compose(["regularizer=srip", *steps])) == {}


@pytest.mark.parametrize("preset", [["experiment=airbench94"], ["experiment=airbench94", "optim=root"],
                                    ["optim=sgd", "+optim.role_lr.head=0.5"]])
def test_a_saved_config_keeps_its_free_form_tables_and_equals_itself_read_again(preset):
    """``upgraded`` reads a saved config through today's schemas: a schema's node gets the
    fields it lacks and loses those it no longer has, but a free-form table (``optim.role_lr``,
    ``optim.root_coefficients``) is the saved one, whole. So an unchanged config is read back as
    itself (a resume of it is not refused, a rerun of it trains the same)."""
    from conftest import compose

    from ortho_run.checkpoint import config_differences, run_config
    from ortho_run.store import upgraded

    cfg = compose(preset)
    saved = run_config(cfg)
    assert upgraded(saved) == saved and config_differences(saved, cfg) == {}
    saved["optim"]["role_lr"] = {"head": 0.25, "backbone_1d": 0.5}
    if "root_coefficients" in saved["optim"]:
        saved["optim"]["root_coefficients"] = {"64x576": [3.0, -4.0, 2.0]}
    saved["optim"]["a_key_no_schema_has"] = 1
    old = upgraded(saved)["optim"]
    assert old["role_lr"] == {"head": 0.25, "backbone_1d": 0.5}
    assert old.get("root_coefficients", {"64x576": [3.0, -4.0, 2.0]}) == {"64x576": [3.0, -4.0,
                                                                                 2.0]}
    assert "a_key_no_schema_has" not in old


def test_no_plugin_schema_gives_a_base_key_another_type_or_mark():
    """A plugin's field of the same name as its group's base field (``optim.gamma``, the
    multistep factor) must mean the same thing: same type, same effect."""
    import typing

    from ortho_run.store import plugin_registries

    clashes = []
    for group, reg in plugin_registries().items():
        base = reg.base_schema
        base_fields = {f.name: f for f in dataclasses.fields(base)}
        base_hints = typing.get_type_hints(base)
        for name in reg.names(internal=True):
            schema = reg.schema(name)
            hints = typing.get_type_hints(schema)
            for f in dataclasses.fields(schema):
                if f.name in base_fields and f.name != "name":
                    same = (hints[f.name] == base_hints[f.name]
                            and f.metadata.get("effect") == base_fields[f.name].metadata.get("effect"))
                    if not same:
                        clashes.append(f"{group}={name}: {f.name}")
    assert not clashes, clashes


def test_every_diagnostic_a_plugin_reports_is_declared_and_described():
    from conftest import compose

    from ortho_run.report import describe
    from ortho_run.runner.run import build_job
    from ortho_run.store import compatibility_methods

    for method in compatibility_methods(compat=False):
        extra = ["method.gen_steps=50"] if method == "ebv" else []
        job = build_job(compose(["experiment=smoke", f"method={method}", "logger.mode=disabled",
                                 *extra]), Path("/nonexistent"))
        keys = set(job.net.method.diagnostics())
        declared = set(type(job.net.method).DIAGNOSTICS)
        assert keys <= declared, (method, keys - declared)
        assert all(describe(f"geometry/{k}") != describe("unknown/x") for k in keys)


# ------------------------------------------------------------------ the import graph
def _imports(path: Path):
    """Every ortho_run module a file imports, at module level or inside functions."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ortho_run"):
            yield node.module
        elif isinstance(node, ast.Import):
            yield from (a.name for a in node.names if a.name.startswith("ortho_run"))


def test_compat_never_imports_the_runner_and_plugins_never_import_either():
    pkg = REPO / "ortho_run"
    for sub, forbidden in (("compat", ("ortho_run.runner", "ortho_run.cli", "ortho_run.bench")),
                           ("methods", ("ortho_run.runner", "ortho_run.compat")),
                           ("models", ("ortho_run.runner", "ortho_run.compat",
                                       "ortho_run.methods")),
                           ("datasets", ("ortho_run.runner", "ortho_run.compat",
                                         "ortho_run.methods")),
                           ("optim", ("ortho_run.runner", "ortho_run.compat",
                                      "ortho_run.methods"))):
        for f in (pkg / sub).glob("*.py"):
            bad = [m for m in _imports(f) if m.startswith(forbidden)]
            assert not bad, (f, bad)
    for f in ("assemble.py", "checkpoint.py", "retrieval.py", "store.py", "validate.py"):
        bad = [m for m in _imports(pkg / f) if m.startswith(("ortho_run.runner", "ortho_run.compat"))]
        assert not bad, (f, bad)


def test_an_error_message_reads_an_exception_through_one_helper():
    """``errors.first_line`` is the one place an exception's message is cut to its first line:
    an exception without a message (EOFError()) gives its type's name there, where an inline
    ``str(exc).splitlines()[0]`` raised IndexError in the middle of reporting the error."""
    import re

    from ortho_run.errors import described, first_line

    assert first_line(EOFError()) == "EOFError" and first_line(EOFError(), empty="") == ""
    assert described(EOFError()) == "EOFError" and described(KeyError("k")) == "KeyError: 'k'"
    assert first_line(ValueError("\n  \nbad value\nmore")) == "bad value"
    assert first_line(ValueError("x" * 500), 10) == "x" * 10
    inline = [(f.relative_to(REPO), n) for f in (REPO / "ortho_run").rglob("*.py")
              for n, line in enumerate(f.read_text().splitlines(), 1)
              if re.search(r"str\((exc|e|err|cause)\)\.splitlines\(\)\[0\]", line)]
    assert not inline, inline


def test_the_runner_hands_compat_a_launch_function_and_compat_calls_only_that(monkeypatch,
                                                                              tmp_path):
    """At run time too, compat reaches training only through the function it was given."""
    import ortho_run.compat.provider as provider

    from conftest import compose

    launched = []

    def fake_launch(cfg, run_dir):
        launched.append(cfg.tag)
        raise RuntimeError("stop here")

    cfg = compose(["experiment=compat_smoke", "method=bct", f"cache_dir={tmp_path}"])
    service = provider.CompatService(cfg, provider_needs(), provider.plan_compat(cfg, 10),
                                     fake_launch, torch.device("cpu"))
    assert launched == []  # planned and built: nothing trains until it is prepared
    with pytest.raises(RuntimeError, match="stop here"):
        service.prepare()
    assert launched == ["old-model"]


def provider_needs():
    from ortho_run.methods import Needs

    return Needs(old_model=True)


def test_key_effects_follow_plugins_registered_after_first_use():
    """The schema keys' effects are derived from the registries: a plugin registered after the
    first lookup has its marked keys counted, and they go when it is removed."""
    import dataclasses

    from ortho_run.config import evaluation
    from ortho_run.methods.base import METHODS, MethodConfig
    from ortho_run.store import effect_of

    assert effect_of("method.late_probe_every") == "learned"  # first use: the cache is built

    @dataclasses.dataclass
    class LateConfig(MethodConfig):
        late_probe_every: int = evaluation(5)

    @METHODS.register("late_toy", schema=LateConfig, internal=True)
    class Late(METHODS.get("ce")):
        pass

    try:
        assert effect_of("method.late_probe_every") == "evaluation"
    finally:
        METHODS.unregister("late_toy")
    assert effect_of("method.late_probe_every") == "learned"
