"""``ortho-run``: the Hydra entrypoint (``python -m ortho_run`` does the same).

    ortho-run                                  # digits, small CNN, CE
    ortho-run method=opl data=cifar100 model=resnet56
    ortho-run -m method=ce,opl,gcr,ebv seed=0,1,2
    ortho-run --from outputs/<date>/<run> seed=1   # a run's saved config again

Errors the user can fix print one paragraph and exit 2 (config, data, checkpoint), 3 (the
loss diverged) or 75 (preempted; resume with trainer.resume=auto). In a multirun a failing
job does not stop the others; the sweep ends with a list of failed jobs and exit code 4.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, List, NoReturn

from hydra.experimental.callback import Callback

from omegaconf import OmegaConf

from ortho_run.store import (HELP_GROUPS, RERUN_CONFIG, config_dir, register_configs,
                             rerun_config)
from ortho_run.errors import EXIT_SWEEP_FAILED, ConfigError, OrthoRunError, Preempted
from ortho_run import keys
from ortho_run.naming import key_of, step_labels

log = logging.getLogger("ortho_run")

_FAILED: List[str] = []  # filled by SweepReport in the launching process
RERUN_OF = "ORTHO_RUN_RERUN_OF"  # set by ``--from RUN`` for the jobs it launches


def _job_info():
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    info = {"overrides": overrides_as_written(hc.overrides.task)}
    if os.environ.get(RERUN_OF):  # ``--from RUN``: the run whose saved config this one reruns
        source = Path(os.environ[RERUN_OF])
        info["overrides"] = _rerun_overrides(source, info["overrides"])
        info["rerun_of"] = str(source)
        if source == Path(hc.runtime.output_dir).absolute():  # a stopped rerun, continued
            saved, _ = keys.read_summary(source / "summary.json")
            if saved and saved.get("rerun_of"):
                info["rerun_of"] = saved["rerun_of"]
    if multirun:
        info.update(sweep=Path(hc.sweep.dir).name, job_num=hc.job.num,
                    sweep_dir=str(hc.sweep.dir))
        if _STATE.get("sweep_overrides") is not None:  # the launching process's command line
            info["sweep_overrides"] = list(_STATE["sweep_overrides"])
    return Path(hc.runtime.output_dir), multirun, info


_STATE = {"crashed": False}  # a task raised an unexpected exception (a bug: exit 1)


def _refuse(message: str) -> NoReturn:
    """A command the user can mend: ``message`` as one paragraph on stderr, exit 2."""
    print(f"ortho-run: error: {message}", file=sys.stderr)
    sys.exit(2)


def overrides_as_written(node) -> List[str]:
    """The command line's overrides as the user wrote them: Hydra keeps them in a config node,
    where an interpolation in one (``tag=s${seed}``) would be resolved on reading, against the
    launching process's config, or fail (``seed=${oops}``)."""
    return [str(o) for o in OmegaConf.to_container(node, resolve=False)]


def sweep_command_overrides(config) -> List[str]:
    """What a sweep's command line chose, for the command that continues it: Hydra's own
    choices (``hydra/sweeper=opl_search``, ``hydra/launcher=slurm``, ``hydra.sweeper.n_trials=3``;
    without them an Optuna search would continue as a grid of one job), then the task's
    overrides; the mode and the folders are the resume command's own."""
    own = ("hydra.mode=", "hydra.sweep.dir=", "hydra.run.dir=")
    return [o for o in overrides_as_written(config.hydra.overrides.hydra)
            if not o.startswith(own)] + overrides_as_written(config.hydra.overrides.task)


def task(cfg) -> Any:
    from ortho_run.runner.run import run

    run_dir, multirun, info = _job_info()
    try:
        summary = run(cfg, run_dir, sweep=info, existing=_STATE.get("existing"))
        if not _STATE.get("worker_rank"):
            print(result_line(summary) if multirun else result_block(summary), flush=True)
        value = keys.objective_value(summary, str(cfg.objective))  # what a sweeper optimises
        return value if value is not None or not multirun else _no_value(run_dir)
    except OrthoRunError as exc:
        print(f"ortho-run: error: {exc}", file=sys.stderr)
        if multirun and not isinstance(exc, Preempted):
            return _no_value(run_dir)  # summary.json records the failure; SweepReport lists it
        sys.exit(exc.exit_code)  # a preempted sweep stops: the signal was for the whole process
    except Exception:
        if multirun:
            log.exception("job %s failed", run_dir)
            return _no_value(run_dir)
        _STATE["crashed"] = True
        raise


def _no_value(run_dir: Path) -> Any:
    """What a sweep job that has no objective value (it failed, diverged, or its summary lacks
    the metric) returns. A grid sweep reads nothing; a sweeper that picks trials from the
    values (Optuna) needs a number, and stops the whole search at a missing one, so it gets
    the worst value of its direction (-inf when maximising, +inf when minimising): the search
    goes on, the trial ranks last, and the sweep's end lists the job as failed."""
    from hydra.core.hydra_config import HydraConfig

    directions = _directions(HydraConfig.get(), "sweeper.direction")
    if not directions:
        return None
    worst = [float("inf") if "min" in str(d).lower() else float("-inf") for d in directions]
    log.warning("job %s has no value of its objective: the sweeper is given %s, the worst of "
                "its direction, and the search goes on", run_dir.name,
                worst[0] if len(worst) == 1 else worst)
    return worst[0] if len(worst) == 1 else worst


def _directions(config, key: str) -> List[Any]:
    """The directions of a sweeper that optimises (Optuna's ``direction`` at ``key``: one, or a
    list), empty for one that does not (a grid) or a config without a sweeper."""
    direction = OmegaConf.select(config, key, default=None)
    if direction is None:
        return []
    return list(direction) if OmegaConf.is_list(direction) else [direction]


def _fmt(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def headline(s: dict) -> List[str]:
    """The metrics a user looks for first: accuracy, or the compatibility matrix."""
    lines = []
    acc = [f"{k} {_fmt(s[k])}" for k in (keys.TEST_ACC1, "test/acc5", keys.VAL_BEST_ACC1)
           if k in s]
    if acc:
        lines.append("  ".join(acc))
    if keys.compat("old_old", "cmc1") in s:
        pairs = [p for p in (*keys.PAIRS, "raw_old") if keys.compat(p, "cmc1") in s]
        lines.append("CMC@1 / mAP  " + "  ".join(
            f"{p.replace('_', '/')} {s[keys.compat(p, 'cmc1')]:.3f} / {s[keys.compat(p, 'map')]:.3f}"
            for p in pairs))

        def verdict(k: str) -> str:
            v = s.get(k)
            if isinstance(v, float) and v != v:  # a model's embeddings were not finite
                return "undefined (non-finite embeddings)"
            return "passes" if v == 1.0 else "fails"

        lines.append(f"ECC (new/old beats old/old): {verdict(keys.ecc())} on top-1, "
                     f"{verdict(keys.ecc('map'))} on mAP")
    if keys.multistep("ac") in s:
        steps = step_labels(s)
        lines.append(f"{len(steps)} steps ({' -> '.join(steps)}): AC "
                     f"{s[keys.multistep('ac')]:.3f}  AM {s[keys.multistep('am')]:.3f} (CMC@1), "
                     f"AC {s[keys.multistep('ac', 'map')]:.3f}  AM "
                     f"{s[keys.multistep('am', 'map')]:.3f} (mAP)")
    return lines


def wandb_line(s: dict) -> str:
    w = s.get("wandb") or {}
    mode = w.get("mode", "disabled")
    if mode == "online":
        return f"W&B: {w.get('url') or 'online run ' + str(w.get('id'))}"
    if mode == "offline":  # a resumed run adds a folder with the same run id: sync them all
        where = f"{s.get('run_dir')}/wandb/offline-run-*"
        return f"W&B: offline run {w.get('id')} in {where}; upload it with: wandb sync {where}"
    return "W&B: off (logger.mode=disabled)"


def result_block(s: dict) -> str:
    """The block that ends a run on the terminal."""
    rule = "-" * 72
    head = (f"ortho-run: {s.get('status')}: {s.get('method')} on {s.get('data')} "
            f"({s.get('model')}, seed {s.get('seed')}, {s.get('epoch')} epochs)")
    return "\n".join([rule, head, *headline(s), f"run dir: {s.get('run_dir')}", wandb_line(s),
                      rule])


def result_line(s: dict) -> str:
    """One line per sweep job: the compatibility matrix for a compat run, else accuracy."""
    lines = headline(s)
    main = next((ln for ln in lines if ln.startswith("CMC@1")), lines[0] if lines else "-")
    return f"ortho-run: job {s.get('job_num')} {s.get('status')}: {main}  ({s.get('run_dir')})"


def _check_writable(path: Path, key: str) -> None:
    """Fail before Hydra creates anything when the output folder cannot be written."""
    import os

    for part in path.parts:
        if len(part.encode()) > 255:
            _refuse(f"the output folder {path} has a path component of "
                    f"{len(part.encode())} bytes ({part[:40]}...); file systems allow 255. "
                    f"Shorten {key} (or output_root).")
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    reason = None
    if not probe.is_dir():
        reason = f"{probe} exists and is not a folder"
    elif not os.access(probe, os.W_OK | os.X_OK):
        reason = f"{probe} is not writable"
    if reason:
        _refuse(f"cannot create the output folder {path}: {reason}. Set "
                f"output_root (or {key}) to a writable folder.")


def _deepest_existing(path: Path) -> Path:
    probe = path.absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return probe


def _output_dir(config, key: str) -> Path:
    """The folder ``key`` (``hydra.run.dir``, ``hydra.sweep.dir``) names, or one paragraph
    and exit 2 where it does not resolve or is empty (a run in whatever folder it is started
    from)."""
    from ortho_run.errors import first_line

    try:
        value = OmegaConf.select(config, key, throw_on_missing=True)
    except Exception as exc:
        _refuse(f"{key} does not resolve: {first_line(exc)}")
    if value is None or not str(value).strip():
        _refuse(f"{key} is empty: name the folder the run writes to ({key}=. for the current "
                f"one)")
    return Path(str(value))


def _check_output_root(config) -> None:
    from ortho_run.config import output_root_error

    why = output_root_error(config.get("output_root", "outputs"))
    if why:
        _refuse(why)


def _check_launcher(config) -> None:
    """A SLURM launcher where SLURM is not: one paragraph before any job is submitted."""
    import shutil

    target = str(OmegaConf.select(config, "hydra.launcher._target_", default="") or "")
    if target.endswith("SlurmLauncher") and shutil.which("srun") is None:
        _refuse("hydra/launcher=slurm submits the jobs to SLURM, but this machine has no srun: "
                "run the sweep on a SLURM login node, or here with hydra/launcher=basic (one job "
                "after another), local_parallel or submitit_local")


def _check_sweep_jobs(config) -> None:
    """The pre-flight of a sweep's jobs, before the first one starts: each job's config,
    composed as its launcher will compose it, goes through ``validate``; a value that some job
    gets wrong (``optim.lr=0.1,-0.1``) refuses the sweep, naming each such job, instead of
    failing that job after the others trained. A grid sweep checks every job; a sweeper that
    picks its trials as it goes (Optuna) checks the trials at the edges of its search space
    (``_edge_trials``), which is where a range that reaches past what a key accepts shows."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException
    from omegaconf import open_dict

    from ortho_run.errors import refusal
    from ortho_run.validate import validate

    target = str(OmegaConf.select(config, "hydra.sweeper._target_", default="") or "")
    if not target or not GlobalHydra.instance().is_initialized():
        return
    loader = GlobalHydra.instance().config_loader()
    params = OmegaConf.select(config, "hydra.sweeper.params")
    params = OmegaConf.to_container(params, resolve=False) if params is not None else {}
    given = [f"{k}={v}" for k, v in params.items()] + overrides_as_written(
        config.hydra.overrides.task)
    parsed = OverridesParser.create(config_loader=loader).parse_overrides(given)
    if target.endswith(".BasicSweeper"):
        from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

        swept_keys = {o.get_key_element() for o in parsed if o.is_sweep_override()}
        jobs = [(list(job), " ".join(o for o in job if o.split("=", 1)[0] in swept_keys)
                 or "every job")
                for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]
        noun, kind = "job", "jobs"
        if not jobs:  # an axis of no value (range(0), range(3, 0)): nothing would run
            empty = [o.input_line for o in parsed if o.is_sweep_override()
                     and not list(o.sweep_string_iterator())]
            _refuse(f"the sweep has no job: {', '.join(empty) or 'its sweep'} lists no value")
    else:
        jobs = _edge_trials(parsed)
        noun, kind = "trial", "trials checked at the edges of its search space"
    refused = []
    for num, (job, label) in enumerate(jobs):
        try:
            cfg = loader.load_sweep_config(master_config=config, sweep_overrides=job)
            with open_dict(cfg):
                del cfg["hydra"]
            validate(cfg)
        except (ConfigError, HydraException) as exc:  # a value, or an option of no group
            refused.append(f"  {noun} {num} ({label}): {refusal(exc)}")
    if refused:
        _refuse(f"{len(refused)} of the sweep's {len(jobs)} {kind} would be refused, so none is "
                f"started:\n" + "\n".join(refused[:20])
                + (f"\n  ... and {len(refused) - 20} more" if len(refused) > 20 else ""))


def _edge_trials(parsed) -> List[tuple]:
    """Trials of a search space (``interval(a, b)``, ``range(...)``, ``choice(...)``) for the
    pre-flight: one with every searched key at its first value (an interval's low end, a
    range's start, the first choice), then one per other value of each key alone (an
    interval's high end, a range's last value, every other choice), each as (overrides, the
    searched values it sets). A key given twice (in the sweeper's params and on the command
    line) takes the later, as the sweeper does."""
    from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep

    fixed, axes = [], []
    last = {o.get_key_element(): o for o in parsed}  # a key given twice: the later one counts
    for o in last.values():
        if not o.is_sweep_override():
            fixed.append(o.input_line)
            continue
        key, v = o.get_key_element(), o.value()
        if isinstance(v, IntervalSweep):  # its two ends
            values = [str(v.start), str(v.end)]
        elif isinstance(v, RangeSweep):  # its first and last values
            values = list(o.sweep_string_iterator())
            values = values[:1] + values[-1:]
        elif isinstance(v, ChoiceSweep):  # every choice
            values = list(o.sweep_string_iterator())
        else:  # a sweep of no listed values (a glob): its trials check it
            continue
        if values:  # (an empty range: no trial takes it)
            axes.append([f"{key}={x}" for x in dict.fromkeys(values)])
    base = [a[0] for a in axes]
    trials = [(fixed + base, " ".join(base) or "every trial")]
    for i, axis in enumerate(axes):
        for value in axis[1:]:
            point = base[:i] + [value] + base[i + 1:]
            trials.append((fixed + point, " ".join(point)))
    return trials


def _loud(hook):
    """Hydra turns an exception in a callback into a warning and goes on, so a fault in a
    pre-flight would let the run start unchecked: here it stops the command (exit 1) with its
    traceback, as a fault of ortho-run."""
    import functools

    @functools.wraps(hook)
    def checked(self, config, **kwargs):
        try:
            return hook(self, config, **kwargs)
        except Exception:
            _STATE["crashed"] = True
            log.exception("ortho-run: %s failed (a fault of ortho-run, not of the command)",
                          hook.__name__)
            sys.exit(1)

    return checked


class SweepReport(Callback):
    """Before: the output folder must be writable. After a multirun: list the failed jobs."""

    @_loud
    def on_run_start(self, config, **kwargs) -> None:
        from ortho_run.validate import schema_error

        why = schema_error(config)  # before Hydra resolves the run dir from those keys
        if why:
            _refuse(why)
        _check_output_root(config)
        run_dir = _output_dir(config, "hydra.run.dir")
        _check_writable(run_dir, "hydra.run.dir")
        _STATE["existing"] = _deepest_existing(run_dir)

    @_loud
    def on_multirun_start(self, config, **kwargs) -> None:
        _STATE["sweep_overrides"] = sweep_command_overrides(config)
        _check_output_root(config)
        _check_writable(_output_dir(config, "hydra.sweep.dir"), "hydra.sweep.dir")
        _check_launcher(config)
        _check_sweep_jobs(config)

    @_loud
    def on_multirun_end(self, config, **kwargs) -> None:
        if _STATE.get("worker_rank"):  # rank 0 reports the sweep, from its folder
            return
        sweep = Path(config.hydra.sweep.dir)
        failed = []
        counts: Dict[str, int] = {"finished": 0, "failed": 0, "diverged": 0}
        jobs = [p for p in sweep.iterdir() if p.is_dir()] if sweep.is_dir() else []
        # a sweeper that optimises (it has a direction) ranks a job without the objective last
        optimising = _directions(config, "hydra.sweeper.direction")
        objective = str(config.get("objective", "")) if optimising else ""
        for job in sorted(p for p in jobs if (p / "summary.json").exists() or (p / ".hydra").is_dir()):
            s, why = keys.read_summary(job / "summary.json")
            status = "failed" if s is None else str(s.get("status"))
            if s is None:
                failed.append(f"{job.name}: {why}")
            elif status != "finished":
                failed.append(f"{job.name}: {status}: {str(s.get('error', ''))[:300]}")
            elif objective and not keys.is_number(s.get(objective)):
                failed.append(f"{job.name}: finished without objective={objective}, so the "
                              f"sweeper ranked it last: set objective to a metric its "
                              f"summary reports")
            counts[status] = counts.get(status, 0) + 1
        _FAILED.extend(failed)
        if failed:
            print(f"ortho-run: {len(failed)} job(s) of the sweep in {sweep} failed:\n  "
                  + "\n  ".join(failed), file=sys.stderr)
        print("-" * 72 + f"\northo-run sweep: {sum(counts.values())} jobs in {sweep}: "
              + ", ".join(f"{n} {k}" for k, n in counts.items())
              + f"\nnext: ortho-report {sweep}\n" + "-" * 72, flush=True)


def _hide_schemas_from_completion() -> None:
    """Tab completion offers the user's groups only: the schemas (``schema/...``, referenced by
    the group yamls) are not options."""
    from hydra.plugins.completion_plugin import CompletionPlugin

    query = CompletionPlugin._query_config_groups

    def visible(self, word, config_name, words):
        matches, exact = query(self, word, config_name, words)
        return [m for m in matches if not m.lstrip("+~").startswith("schema")], exact

    CompletionPlugin._query_config_groups = visible


def _worker_rank_overrides() -> None:
    """Under torchrun, ranks > 0 keep Hydra's own files out of the outputs, a sweep's too:
    they write nothing there and use rank 0's run dir (broadcast at start); what a run or a
    sweep ends with on the terminal is rank 0's to say (their errors they say themselves)."""
    import atexit
    import os
    import shutil
    import tempfile

    from ortho_run.runner.env import launch_env

    try:
        world, rank, _ = launch_env()
    except ConfigError as exc:
        _refuse(str(exc))
    if world > 1 and rank > 0:
        tmp = Path(tempfile.gettempdir()) / f"ortho-run-rank{rank}-{os.getpid()}"
        sys.argv += [f"hydra.run.dir={tmp}", f"hydra.sweep.dir={tmp}", "hydra.output_subdir=null"]
        _STATE["worker_rank"] = True
        atexit.register(shutil.rmtree, tmp, True)  # Hydra's log of this rank, gone with it


def main() -> None:
    try:
        _main()
        sys.stdout.flush()
    except BrokenPipeError:  # `ortho-run --help | head`: the reader left; nothing to report
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)


def _main() -> None:
    import hydra

    if "--version" in sys.argv[1:] or "-V" in sys.argv[1:]:
        from ortho_run import __version__

        print(f"ortho-run {__version__}")
        return
    register_configs()
    if any(a in ("-sc", "--shell-completion") or a.startswith("--shell-completion=")
           for a in sys.argv[1:]):
        _hide_schemas_from_completion()
    _worker_rank_overrides()
    _FAILED.clear()
    with tempfile.TemporaryDirectory(prefix="ortho-run-from-") as tmp:
        config_path, config_name = _from_run(Path(tmp))
        _hydra_main(hydra, config_path, config_name)


def _from_run(tmp: Path):
    """``--from RUN`` (a run dir, or a saved config file): the primary config is that run's
    saved config (``store.rerun_config``, written to ``tmp``), so the run is retrained exactly
    as it was; the other arguments are key overrides on it (``seed=1``,
    ``trainer.max_epochs=50``, ``-m seed=0,1,2``). Returns the primary config's folder and
    name (ortho-run's own without ``--from``)."""
    args = sys.argv[1:]
    at = next((i for i, a in enumerate(args) if a == "--from" or a.startswith("--from=")), None)
    if at is None:
        return str(config_dir()), "config"
    source = args[at].partition("=")[2] if "=" in args[at] else (
        args[at + 1] if at + 1 < len(args) else "")
    rest = args[:at] + args[at + (1 if "=" in args[at] else 2):]
    groups = [a for a in rest if not a.startswith("-") and "=" in a
              and key_of(a) in {g for g, _ in HELP_GROUPS}]
    try:
        if not source:
            raise ConfigError("--from needs a run dir (or a saved config file): "
                              "ortho-run --from outputs/<date>/<run> [key=value ...]")
        if groups:
            raise ConfigError(f"--from {source} reruns that run's config, its plugins "
                              f"included; {', '.join(groups)} would choose another: change its "
                              f"keys (optim.lr=0.01, seed=1), or compose a new run without "
                              f"--from")
        primary = rerun_config(Path(source))
        _warn_of_other_processes(Path(source).expanduser())
    except ConfigError as exc:
        _refuse(str(exc))
    (tmp / f"{RERUN_CONFIG}.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(primary)))
    os.environ[RERUN_OF] = str(Path(source).expanduser().absolute())  # the jobs' processes too
    sys.argv = [sys.argv[0], *rest]
    return str(tmp), RERUN_CONFIG


def _warn_of_other_processes(source: Path) -> None:
    """A rerun's numbers are its run's with as many data-parallel processes only (each reads
    batches of data.batch_size images of its own): say so where this one has another count."""
    from ortho_run.runner.env import launch_env

    run_dir = source if source.is_dir() else source.parent
    summary, _ = keys.read_summary(run_dir / "summary.json")
    then, now = (summary or {}).get("world_size"), launch_env()[0]
    if isinstance(then, int) and then != now:
        print(f"ortho-run: warning: {run_dir} trained with {then} data-parallel process(es), "
              f"this rerun has {now}: each process reads batches of data.batch_size images of "
              f"its own, so its numbers will differ; start it with {then} (torchrun "
              f"--nproc_per_node={then} -m ortho_run --from ...) to retrain that run",
              file=sys.stderr)


def _rerun_overrides(source: Path, own: List[str]) -> List[str]:
    """What defines a rerun, for its name, tags and report group: the overrides of the run it
    reruns (its summary's, else its ``.hydra/overrides.yaml``; none for a loose config file),
    each replaced by this command's override of the same key, then this command's others."""
    run_dir = source if source.is_dir() else source.parent
    summary, _ = keys.read_summary(run_dir / "summary.json")
    saved: List[str] = list(summary["overrides"]) if summary and "overrides" in summary else []
    if not saved:
        for f in (run_dir / ".hydra" / "overrides.yaml", run_dir / "overrides.yaml"):
            if f.is_file():
                try:
                    loaded = OmegaConf.to_container(OmegaConf.load(f))
                except Exception:  # not yaml: the rerun is named by its own overrides alone
                    loaded = None
                if isinstance(loaded, list) and all(isinstance(o, str) for o in loaded):
                    saved = loaded
                break
    mine = {key_of(o) for o in own}
    return [o for o in saved if key_of(o) not in mine] + list(own)


def _hydra_main(hydra, config_path: str, config_name: str) -> None:
    try:
        hydra.main(config_path=config_path, config_name=config_name,
                   version_base="1.3")(task)()
    except SystemExit as exc:
        # Hydra reports its own errors (an unknown option, a bad override, a config that does
        # not compose) with exit code 1, outside any task: they are the user's config errors
        if exc.code == 1 and not _STATE["crashed"]:
            sys.exit(2)
        raise
    except ValueError as exc:
        # Hydra refuses flags that do not go together (-m with --cfg, --run with -m) and an
        # --experimental-rerun file that is not there by raising, outside any task
        if _STATE["crashed"] or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        _refuse(f"{exc} (ortho-run --help lists the flags)")
    if _FAILED:
        sys.exit(EXIT_SWEEP_FAILED)


if __name__ == "__main__":
    main()
