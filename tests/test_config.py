"""Config composition and validation: errors name the key, before any work starts."""

from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ValidationError

from conftest import REPO, cli, compose


def test_defaults_compose_to_digits_ce():
    cfg = compose()
    assert (cfg.data.name, cfg.model.name, cfg.method.name) == ("digits", "small_cnn", "ce")
    assert cfg.optim.name == "sgd" and cfg.trainer.max_epochs == 30


def test_every_method_yaml_composes_with_its_schema():
    from ortho_run.methods import METHODS

    for name in METHODS.names():
        cfg = compose([f"method={name}"])
        assert cfg.method.name == name


def test_method_typo_is_an_error_naming_the_key():
    with pytest.raises(ConfigCompositionException) as e:
        compose(["method=opl", "method.gama=1"])
    assert "gama" in str(e.value.__cause__ or e.value)


def test_wrong_type_is_an_error_naming_the_key():
    with pytest.raises((ConfigCompositionException, ValidationError)) as e:
        compose(["trainer.max_epochs=abc"])
    assert "max_epochs" in str(e.value) + str(e.value.__cause__)


@pytest.mark.parametrize("override,key", [("data.pipeline=fast", "pipeline"),
                                          ("trainer.compile_mode=reduce-overhead", "compile_mode")])
def test_bad_choice_is_rejected(override, key):
    with pytest.raises((ConfigCompositionException, ValidationError)) as e:
        compose([override])
    assert key in str(e.value) + str(e.value.__cause__)
    assert str(compose(["trainer.compile_mode=reduce_overhead"]).trainer.compile_mode) == "reduce-overhead"


def test_experiment_smoke_only_lists_differences():
    cfg = compose(["experiment=smoke"])
    assert cfg.trainer.max_epochs == 2 and cfg.logger.mode == "disabled"
    assert cfg.data.name == "digits"


@pytest.mark.slow
@pytest.mark.parametrize("args,needle", [
    (["data.nme=3"], "data.nme"),
    (["trainer.max_epochs=abc"], "trainer.max_epochs"),
    (["method=nope"], "nope"),
])
def test_cli_fails_fast_naming_the_key(tmp_path, args, needle):
    r = cli([f"output_root={tmp_path}", *args], cwd=tmp_path, timeout=120)
    assert r.returncode != 0
    assert needle in r.stderr
    assert "Traceback" not in r.stderr
    assert not list(tmp_path.rglob("summary.json")), "no work may start on a bad config"


@pytest.mark.slow
def test_cli_missing_cifar_says_where_to_put_files(tmp_path):
    r = cli([f"output_root={tmp_path}", "data=cifar100", f"data.root={tmp_path}/empty"],
            cwd=tmp_path, timeout=120)
    assert r.returncode == 2
    assert "cifar-100-python" in r.stderr and "data.root" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("exp,method,model,epochs", [
    ("opl_cifar100", "opl", "resnet56", 200),
    ("gcr_cifar100", "gcr", "resnet18_cifar", 200),
    ("ebv_cifar100", "ebv", "resnet18_cifar", 200),
    ("cifar10_fast", "ce", "resnet18_cifar", 45),
    ("compat_cifar100", "ce", "resnet18_cifar", 100),
])
def test_recipes_compose_and_the_command_line_picks_the_method(exp, method, model, epochs):
    cfg = compose([f"experiment={exp}"])
    assert (cfg.method.name, cfg.model.name, cfg.trainer.max_epochs) == (method, model, epochs)
    assert compose([f"experiment={exp}", "method=ce"]).method.name == "ce"  # the baseline row
    if exp == "opl_cifar100":
        assert list(cfg.optim.milestones) == [60, 120, 160] and cfg.optim.gamma == 0.2
        assert cfg.data.batch_size == 128 and cfg.data.name == "cifar100"


def test_out_of_range_values_are_refused_before_any_write(tmp_path):
    from ortho_run.errors import ConfigError
    from ortho_run.runner.run import run

    with pytest.raises(ConfigError, match="data.batch_size=0 .*>= 1"):
        run(compose(["data.batch_size=0"]), tmp_path / "r")
    assert not (tmp_path / "r").exists()


def test_an_empty_cache_dir_is_refused_instead_of_caching_in_the_working_folder(tmp_path):
    from ortho_run.errors import ConfigError
    from ortho_run.runner.run import run

    for value in ("", "'  '"):
        with pytest.raises(ConfigError, match="cache_dir=.* must be a folder, not empty"):
            run(compose([f"cache_dir={value}", "experiment=compat_smoke", "method=bct"]),
                tmp_path / "r")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("env,said", [
    ({"WORLD_SIZE": "abc"}, "WORLD_SIZE='abc' must be an integer >= 1"),
    ({"WORLD_SIZE": "0"}, "WORLD_SIZE='0' must be an integer >= 1"),
    ({"WORLD_SIZE": "2", "RANK": "x"}, "RANK='x' must be an integer >= 0"),
    ({"WORLD_SIZE": "2", "RANK": "2"}, "RANK=2 with WORLD_SIZE=2: RANK must be below WORLD_SIZE"),
    ({"LOCAL_RANK": "-1"}, "LOCAL_RANK='-1' must be an integer >= 0"),
])
def test_a_launcher_variable_that_is_no_rank_is_refused_naming_it(tmp_path, monkeypatch, env,
                                                                   said):
    from ortho_run.errors import ConfigError
    from ortho_run.runner.run import run

    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ConfigError) as e:
        run(compose([]), tmp_path / "r")
    assert said in str(e.value) and not (tmp_path / "r").exists()


@pytest.mark.slow
def test_plain_wheel_ships_conf_and_runs_from_elsewhere(tmp_path):
    """`pip install .` (not -e): the conf/ tree travels inside the wheel."""
    import subprocess
    import sys

    from conftest import REPO

    # build from a copy of the checkout's files: a build/ folder left by an earlier build
    # would carry packages that pyproject.toml no longer (or not yet) lists
    import shutil

    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("build", "dist", "*.egg-info", ".venv*", ".git", "outputs",
                                    "__pycache__", ".gpu", "multirun")
    shutil.copytree(REPO, src, ignore=ignore)
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                        "--no-build-isolation", "-w", str(tmp_path / "dist"), str(src)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    wheel = next((tmp_path / "dist").glob("ortho_run-*.whl"))
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
                        str(tmp_path / "site"), str(wheel)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    code = ("import ortho_run, ortho_run.store as s; "
            "assert ortho_run.__file__.startswith(%r), ortho_run.__file__; "
            "s.register_configs(); "  # imports every plugin package from the wheel
            "import sys; out = [m for m, v in sys.modules.items() if m.startswith('ortho_run') "
            "and getattr(v, '__file__', None) and not v.__file__.startswith(%r)]; "
            "assert not out, ('not from the wheel', out); "
            "print({g: r.names() for g, r in s.plugin_registries().items()}); "
            "print(sorted(p.name for p in (s.config_dir() / 'method').glob('*.yaml')))"
            % (str(tmp_path / "site"), str(tmp_path / "site")))
    env = {**__import__("os").environ, "PYTHONPATH": str(tmp_path / "site")}
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "opl.yaml" in r.stdout and "lambda_orth.yaml" in r.stdout
    assert "'muon'" in r.stdout and "'conv_orth'" in r.stdout and "'timm'" in r.stdout


PRESETS = sorted(p.stem for p in (REPO / "conf" / "experiment").glob("*.yaml"))
REAL_CLASSES = {"cifar10": 10, "cifar100": 100}


def preset_data(preset: str):
    """The data group a preset picks (``override /data: X``, or through the preset it extends),
    read from its yaml alone: None when it keeps the default."""
    from omegaconf import OmegaConf

    for d in OmegaConf.load(REPO / "conf" / "experiment" / f"{preset}.yaml").get("defaults", []):
        if OmegaConf.is_dict(d) and "override /data" in d:
            return d["override /data"]
        if isinstance(d, str) and d in PRESETS:
            return preset_data(d)
    return None


#: the presets of a paper's setting (a real data set, swapped here for synthetic images of its
#: class count and size, and a full-size backbone): one step of each is the slow layer's; the
#: fast layer steps the presets of the small settings
SLOW_PRESETS = {p for p in PRESETS if preset_data(p) in REAL_CLASSES}


@pytest.mark.parametrize("preset", [pytest.param(p, marks=pytest.mark.slow) if p in SLOW_PRESETS
                                    else p for p in PRESETS])
def test_every_experiment_preset_trains_a_step(tmp_path, preset):
    """Each preset as a paper table cites it, for one step: its model, method, optimiser and
    schedule. A real data set that is not on this machine is swapped for synthetic images of
    the same class count and size."""
    from ortho_run.runner.run import run

    base = compose([f"experiment={preset}"])
    ov = [f"experiment={preset}", "logger.mode=disabled", "trainer.progress=off",
          "trainer.max_epochs=1", "trainer.limit_train_batches=1", "trainer.compile=false",
          "trainer.warmup_steps=" + str(min(1, base.trainer.warmup_steps)),
          "data.batch_size=8", "data.eval_batch_size=64", f"cache_dir={tmp_path}/cache"]
    if base.data.name in REAL_CLASSES:
        # a multi-step preset builds every step's model (and their class means): fewer images
        per_class = 2 if base.compat.steps and base.data.name == "cifar100" else 10
        ov += ["data=synthetic", f"data.num_classes={REAL_CLASSES[base.data.name]}",
               "data.image_size=32", f"data.train_per_class={per_class}", "data.test_per_class=1"]
    if base.method.name == "ebv":
        ov.append("method.gen_steps=200")
    s = run(compose(ov), tmp_path / "run")
    assert s["status"] == "finished" and s["step"] == 1
    assert s["model"] == base.model.name and s["method"] == base.method.name


def test_the_edge_trials_of_a_search_space_are_its_ends_and_each_choice():
    """What the pre-flight checks of a sweeper that picks its trials as it goes: every searched
    key at its first value, then each key alone at each of its other edges (an interval's two
    ends, a range's first and last values, every choice); a key given twice counts once, the
    later."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from ortho_run.cli import _edge_trials

    parsed = OverridesParser.create().parse_overrides([
        "method.gamma=interval(0.1, 4.0)", "method.lambda_=tag(log, interval(0.01, 2.0))",
        "experiment=smoke", "seed=range(0, 10)", "optim=choice(sgd,adam,muon)",
        "method.lambda_=0.5"])
    trials = _edge_trials(parsed)
    assert [label for _, label in trials] == [
        "method.gamma=0.1 seed=0 optim=sgd", "method.gamma=4.0 seed=0 optim=sgd",
        "method.gamma=0.1 seed=9 optim=sgd", "method.gamma=0.1 seed=0 optim=adam",
        "method.gamma=0.1 seed=0 optim=muon"]
    assert trials[1][0] == ["method.lambda_=0.5", "experiment=smoke",  # the fixed ones first
                            "method.gamma=4.0", "seed=0", "optim=sgd"]
    assert _edge_trials(OverridesParser.create().parse_overrides(["seed=1"])) == [
        (["seed=1"], "every trial")]


def _needed_keys():
    """Every plugin key that has no default (``???``): the chosen plugin needs a value."""
    import dataclasses

    from omegaconf import MISSING

    from ortho_run.store import plugin_registries

    return [(group, name, f.name) for group, reg in plugin_registries().items()
            for name in reg.names() if dataclasses.is_dataclass(reg.schema(name))
            for f in dataclasses.fields(reg.schema(name)) if f.default is MISSING
            and f.default_factory is dataclasses.MISSING and f.name != "name"]


@pytest.mark.parametrize("group,name,key", _needed_keys())
def test_a_plugin_key_left_without_a_value_is_refused_before_the_run_reads_it(
        tmp_path, group, name, key):
    """``data=imagefolder`` without ``data.root`` (every such key of every plugin) was a
    traceback from the data source; it is refused by the pre-flight, naming the key and the
    plugin, and the run leaves nothing behind."""
    from ortho_run.errors import ConfigError
    from ortho_run.runner.run import run

    cfg = compose([f"{group}={name}", "logger.mode=disabled"])
    with pytest.raises(ConfigError, match=rf"{group}\.{key} has no value \(\?\?\?\): "
                                          rf"{group}={name} needs it"):
        run(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_the_plugins_have_keys_without_a_default_to_check():
    assert {(g, n) for g, n, _ in _needed_keys()} >= {("data", "imagefolder"), ("data", "hf")}


def _deletable_keys():
    import dataclasses

    from ortho_run.config import RunConfig

    return [f.name for f in dataclasses.fields(RunConfig)]


@pytest.mark.parametrize("key", _deletable_keys())
def test_a_key_deleted_with_a_tilde_is_refused_naming_it_before_anything_reads_it(tmp_path, key):
    """``~seed``, ``~compat``, ``~data``: Hydra lets some top-level keys be deleted; the run read
    them before its checks (a traceback from the run's start or its plan). Each is refused by
    the pre-flight, naming the key, or by Hydra's composition; the run dir is left as it was."""
    from ortho_run.errors import ConfigError
    from ortho_run.runner.run import run

    try:
        cfg = compose([f"~{key}", "logger.mode=disabled"])
    except (ConfigCompositionException, ValidationError) as exc:  # Hydra refuses it itself
        assert key in str(exc)
        return
    with pytest.raises(ConfigError, match=rf"^{key} (is gone|has no value)"):
        run(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_some_top_level_keys_can_be_deleted_so_the_check_is_exercised():
    deletable = []
    for key in _deletable_keys():
        try:
            compose([f"~{key}"])
            deletable.append(key)
        except (ConfigCompositionException, ValidationError):
            pass
    assert {"seed", "compat", "data", "tag"} <= set(deletable)


def test_overrides_are_read_as_written_not_resolved():
    """An override holding an interpolation is recorded as typed: resolving Hydra's node would
    give the launching process's value (``tag=s${seed}`` → ``tag=s0`` for every job of a
    sweep over seeds, so its resume command would retrain them under one tag) or fail."""
    from omegaconf import OmegaConf

    from ortho_run.cli import overrides_as_written

    node = OmegaConf.create({"seed": 3, "task": ["tag=s${seed}", "seed=${oops}", "optim.lr=0.1"]})
    assert overrides_as_written(node.task) == ["tag=s${seed}", "seed=${oops}", "optim.lr=0.1"]


def test_a_fault_in_a_pre_flight_callback_stops_the_command_instead_of_a_warning(monkeypatch):
    """Hydra turns an exception in a callback into a warning and starts the run unchecked."""
    from omegaconf import OmegaConf

    from ortho_run import cli as cli_module

    def broken(*a, **k):
        raise RuntimeError("a fault")

    monkeypatch.setattr(cli_module, "_check_output_root", broken)
    monkeypatch.setitem(cli_module._STATE, "crashed", False)
    config = OmegaConf.create({"output_root": "outputs", "hydra": {"run": {"dir": "x"}}})
    with pytest.raises(SystemExit) as exc:
        cli_module.SweepReport().on_run_start(config)
    assert exc.value.code == 1 and cli_module._STATE["crashed"]


@pytest.mark.slow
@pytest.mark.parametrize("args,says", [
    (["-m", "--cfg", "job"], "Only one of --run, --multirun, --cfg"),
    (["--experimental-rerun", "nowhere.pickle"], "File nowhere.pickle does not exist"),
    (["-m", "seed=range(0)"], "the sweep has no job: seed=range(0) lists no value"),
    (["-m", "seed=range(3,0)", "method=ce,opl"], "the sweep has no job: seed=range(3,0)"),
    (["hydra.run.dir="], "hydra.run.dir is empty: name the folder"),
    (["~data"], "data has no value: choose one"),
    (["-m", "~seed", "method=ce,opl"], "job 1 (method=opl): seed is gone"),
    (["seed=${oops}"], "the config does not resolve: Interpolation key 'oops' not found"),
    (["data=imagefolder"], "data.root has no value (???): data=imagefolder needs it"),
])
def test_command_lines_hydra_or_the_run_refuse_are_one_paragraph_and_write_nothing(
        tmp_path, args, says):
    r = cli([*args, f"output_root={tmp_path}/out"], cwd=tmp_path)
    assert r.returncode == 2 and says in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []


def test_a_plain_key_left_at_no_value_is_named_with_how_to_set_it():
    """A saved config (``--from``) or a user's yaml can hold ``tag: ???``: a key to set, not a
    group to choose."""
    from ortho_run.errors import ConfigError
    from ortho_run.validate import validate

    cfg = compose([])
    cfg.tag = "???"
    with pytest.raises(ConfigError, match=r"^tag has no value \(\?\?\?\): set tag=<value>"):
        validate(cfg)
    cfg = compose([])
    cfg.trainer.max_epochs = "???"
    with pytest.raises(ConfigError, match=r"^trainer.max_epochs has no value \(\?\?\?\): set "
                                          r"trainer.max_epochs=<value> on the command line"):
        validate(cfg)


def test_a_sweeps_continuing_command_keeps_hydras_own_choices():
    """The command a stopped sweep prints kept the task's overrides alone: an Optuna search
    (``hydra/sweeper=opl_search``) or a SLURM sweep would have continued as a grid of one job
    on the default launcher."""
    from omegaconf import OmegaConf

    from ortho_run.cli import sweep_command_overrides
    from ortho_run.runner.run import resume_command

    config = OmegaConf.create({"hydra": {"overrides": {
        "hydra": ["hydra/sweeper=opl_search", "hydra.sweeper.n_trials=3", "hydra.mode=MULTIRUN",
                  "hydra.sweep.dir=/s/x", "hydra/launcher=slurm"],
        "task": ["method=opl", "tag=s${seed}"]}}})
    kept = sweep_command_overrides(config)
    assert kept == ["hydra/sweeper=opl_search", "hydra.sweeper.n_trials=3",
                    "hydra/launcher=slurm", "method=opl", "tag=s${seed}"]
    assert resume_command(Path("/s/x/0_a"), {"job_num": 0, "sweep_dir": "/s/x",
                                             "sweep_overrides": kept}) == (
        "ortho-run -m hydra/sweeper=opl_search hydra.sweeper.n_trials=3 hydra/launcher=slurm "
        "method=opl 'tag=s${seed}' hydra.sweep.dir=/s/x")
