"""One run: compose data → backbone → method → trainer, write the run dir contract.

    <run_dir>/resolved_config.yaml  metrics.jsonl  summary.json  checkpoints/last.pt  wandb/

``run(cfg, run_dir)`` is what the CLI calls for each job; tests call it in-process too.
"""

from __future__ import annotations

import atexit
import logging
import signal
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from ortho_run.errors import OrthoRunError, Preempted, TrainingDiverged
from ortho_run.parallel import broadcast
from ortho_run.retrieval import retrieval_metrics
from ortho_run.runner.env import git_commit, launch_env, package_versions, relaunch
from ortho_run.runner.evaluate import feature_geometry
from ortho_run.runner.job import Job, build, plan, prepare
from ortho_run.runner.rundir import RunDir
from ortho_run.runner.sinks import WandbSink
from ortho_run.runner.trainer import Dist, Trainer
from ortho_run.validate import validate

log = logging.getLogger("ortho_run")


def init_distributed(device_spec: str) -> Dist:
    """torchrun / submitit set RANK, WORLD_SIZE, LOCAL_RANK (and MASTER_ADDR/PORT)."""
    world, rank, local = launch_env()
    if world <= 1:
        return Dist()
    import torch.distributed as dist

    use_cuda = torch.cuda.is_available() and str(device_spec) != "cpu"
    # one group for the process, ended as it exits: the jobs of a sweep, and a run launched
    # inside another (an earlier model of a compatibility run), use the one there is
    if not dist.is_initialized():
        if use_cuda:
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if use_cuda else "gloo")
        atexit.register(_end_process_group)
    return Dist(rank=rank, world_size=world, local_rank=local)


def _end_process_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def resume_command(run_dir: Path, sweep: Optional[Dict[str, Any]]) -> str:
    """The command the user runs to continue: for one run, its overrides in its run dir; for a
    job of a sweep, the sweep itself (``-m``, the sweep's overrides, its folder), which keeps
    the finished jobs and continues the stopped one. A data-parallel run is started again as it
    was (torchrun's command line), so that it continues with as many processes."""
    import shlex

    sweep = sweep or {}
    head, note = relaunch()
    skip = ("trainer.resume=", "hydra.run.dir=", "hydra.sweep.")
    rerun = sweep.get("rerun_of")  # a rerun of a saved config (``--from RUN``)
    if "job_num" in sweep and sweep.get("sweep_dir"):
        keep = [o for o in sweep.get("sweep_overrides") or sweep.get("overrides", [])
                if not o.startswith(skip)]
        return " ".join([head, *(["--from", shlex.quote(rerun)] if rerun else []), "-m",
                         *map(shlex.quote, keep),
                         shlex.quote(f"hydra.sweep.dir={sweep['sweep_dir']}")]) + note
    if rerun:  # its own saved config is the one to continue
        return " ".join([head, "--from", shlex.quote(str(run_dir)), "trainer.resume=auto",
                         shlex.quote(f"hydra.run.dir={run_dir}")]) + note
    keep = [o for o in sweep.get("overrides", []) if not o.startswith(skip)]
    return " ".join([head, *map(shlex.quote, keep), "trainer.resume=auto",
                     shlex.quote(f"hydra.run.dir={run_dir}")]) + note


def _scheduler_signal() -> Optional[int]:
    """The signal a submitit job gets before its preemption or time limit (SIGUSR2, or
    SUBMITIT_PREEMPT_SIGNAL's), which submitit answers by requeueing the job; None elsewhere."""
    import os

    if not os.environ.get("SUBMITIT_EXECUTOR"):
        return None
    name = os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2").upper()
    return getattr(signal, name if name.startswith("SIG") else f"SIG{name}", None)


class _Signals:
    """SIGTERM/SIGINT: before training, stop at once (exit 75); during training, the trainer
    checkpoints at the next batch and exits with 75; during the shutdown (summary, W&B finish),
    and for every signal after the first, nothing: the shutdown always completes. A submitit
    job's preemption signal (``_scheduler_signal``) stops the run the same way, and is then
    handed on to submitit's own handler, which requeues the job: the requeued job continues
    from the checkpoint written at that batch."""

    def __init__(self):
        self.trainer: Optional[Trainer] = None
        self.prev = {}
        self.received: Optional[int] = None
        self.shutting_down = False
        self.hand_on = _scheduler_signal()

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGTERM, signal.SIGINT, self.hand_on):
                if s is not None:
                    self.prev[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        first = self.received is None
        self.received = self.received or signum
        if not first or self.shutting_down:
            log.warning("signal %d received again: finishing the shutdown first", signum)
            return
        if self.trainer is None:
            raise Preempted(f"stopped by signal {signum} before training started")
        self.trainer.request_stop(signum)

    def __exit__(self, *exc):
        for s, h in self.prev.items():
            # after a stop request the process is on its way out: later signals must not turn
            # its exit into a KeyboardInterrupt traceback (or a death by signal)
            signal.signal(s, signal.SIG_IGN if self.received is not None else h)
        handler = self.prev.get(self.hand_on) if self.received == self.hand_on else None
        if callable(handler):  # the checkpoint and the summary are written: submitit requeues
            handler(self.received, None)


def _shared_run_dir(run_dir: Path, sweep: Optional[Dict[str, Any]]) -> tuple:
    """Every rank uses rank 0's run dir, and a sweep job's folder (Hydra gives each process its
    own time stamp, and the other ranks write theirs to a temporary folder)."""
    shared, sweep = broadcast([str(run_dir), sweep])
    return Path(shared), sweep


def run(cfg, run_dir: Path, sweep: Optional[Dict[str, Any]] = None,
        existing: Optional[Path] = None) -> Dict[str, Any]:
    """One job. Nothing in ``run_dir`` is written until the pre-flight (the config's checks,
    ``validate``, before anything reads a key; then data, model, compat needs and resume
    compatibility, ``job.prepare``) has passed; a refused run leaves an existing run dir
    byte-identical and removes one it created (a sweep job keeps it for its failure summary),
    with the parent folders created for it up to ``existing`` (the deepest folder that existed
    before the command started). The checked config enters ``prepare`` alone; what follows
    reads the job, and every write to the run dir goes through its ``RunDir``."""
    # the main process is rank 0, whose run dir every rank shares: known before the config is
    # read (the process group is made from the checked config)
    main = launch_env()[1] == 0
    summary: Dict[str, Any] = {"status": "running", "run_dir": str(run_dir), **(sweep or {})}
    t_start = time.time()
    with _Signals() as sig, RunDir(run_dir, enabled=main, existing=existing) as rd:
        wb = WandbSink.disabled()

        def emit(row):
            if main:
                rd.write_metrics(row)
                wb.log({k: v for k, v in row.items() if k != "step"}, step=row.get("step"))
                log.info(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                  for k, v in row.items()), extra={"epoch_row": True})

        try:  # pre-flight: every check that can refuse the run, before any write
            cfg = validate(cfg)  # first: nothing reads a key before it is checked
            start = RunStart.of(cfg, run_dir, sweep)
            run_dir, facts, sweep = start.run_dir, start.facts, start.sweep
            summary = {"status": "running", **facts}
            job = prepare(cfg, run_dir, start.dist, emit, launch=run)
        except BaseException as exc:
            in_sweep = bool(sweep and "job_num" in sweep)
            rd.refused(keep_dir=in_sweep)
            if isinstance(exc, Preempted):  # while an earlier model trained: this run's command
                exc.args = (f"{str(exc).split(' Resume with: ')[0]} Resume with: "
                            f"{resume_command(run_dir, sweep)}",)
            if in_sweep and rd.created:
                summary.update(status="failed", error=_error_text(exc))
                rd.write_summary(summary)
            raise
        exit_code = 0
        if job.forced:
            summary["resume_forced"] = {k: [a if isinstance(a, (int, float, str, bool, list, type(None)))
                                            else None, b] for k, (a, b) in job.forced.items()}
        try:  # from here on every outcome is recorded: the summary says how the run ended
            rd.begin(job.cfg, summary, job.trainer.state.epoch if job.resumed else None)
            wb = WandbSink.for_run(job.cfg, run_dir, facts, sweep, enabled=main)
            summary["wandb"] = wb.info
            sig.trainer = job.trainer
            summary.update(_train_and_evaluate(job, start.dist, facts))
            summary["status"] = "finished"
            return summary
        except OrthoRunError as exc:
            exit_code = exc.exit_code
            summary["status"] = {TrainingDiverged: "diverged", Preempted: "preempted"}.get(
                type(exc), "failed")
            if isinstance(exc, Preempted):
                summary["resume_command"] = resume_command(run_dir, sweep)
                exc.args = (f"{exc} Resume with: {summary['resume_command']}",)
            summary["error"] = str(exc)
            raise
        except BaseException as exc:
            exit_code = 1
            summary["status"] = "failed"
            summary["error"] = _error_text(exc)
            summary["traceback"] = traceback.format_exc()
            raise
        finally:
            sig.shutting_down = True  # later signals wait for the summary and W&B finish
            for k, v in facts.items():  # facts learned during the run (device, pipeline, sizes)
                summary.setdefault(k, v)
            summary["time/total_s"] = time.time() - t_start
            rd.write_summary(summary)
            wb.summary(summary)
            wb.finish(exit_code)
            job.close()


@dataclass
class RunStart:
    """What a run knows before its pre-flight: the process group, the run dir every rank
    shares, and the facts its summary starts from."""

    dist: Dist
    run_dir: Path
    facts: Dict[str, Any]
    sweep: Optional[Dict[str, Any]]  # the job of a sweep as rank 0 knows it (its folder)

    @classmethod
    def of(cls, cfg, run_dir: Path, sweep: Optional[Dict[str, Any]]) -> "RunStart":
        dist = init_distributed(cfg.trainer.device)
        run_dir, sweep = _shared_run_dir(Path(run_dir), sweep)
        facts: Dict[str, Any] = {
            "method": cfg.method.name, "data": cfg.data.name, "model": cfg.model.name,
            "seed": cfg.seed, "tag": cfg.tag, "run_dir": str(run_dir),
            "reference": cfg.reference, **git_commit(),
            "versions": package_versions(), "world_size": dist.world_size, **(sweep or {}),
        }
        return cls(dist, run_dir, facts, sweep)


def _error_text(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, OrthoRunError) else f"{type(exc).__name__}: {exc}"


def build_job(cfg, run_dir: Path, dist: Dist = Dist(), emit=lambda row: None) -> Job:
    """Plan, then build, exactly as a run does (the bench and tests take jobs so)."""
    return build(plan(cfg, run_dir, dist), launch=run, emit=emit)


def _train_and_evaluate(job: Job, dist, facts) -> Dict[str, Any]:
    cfg = job.cfg
    t = cfg.trainer
    trainer, ds, net, evals, service = job.trainer, job.ds, job.net, job.evals, job.service
    facts.update(pipeline=job.pipeline, device=job.plan.device_name,
                 num_classes=ds.num_classes, train_size=len(ds.train), test_size=len(ds.test))
    if job.plan.data_config:
        facts["model_data_config"] = job.plan.data_config
    if ds.label_names:  # labels that were names: the class id each one was given
        facts["label_names"] = ds.label_names

    # Final analysis on the test split (geometry, retrieval, compatibility) uses the embeddings
    # of the last epoch's evaluation: no second pass of the new model over the evaluation splits.
    need_emb = t.geometry or t.retrieval or (service is not None and cfg.compat.evaluate)
    last, collected = trainer.fit(collect_final=need_emb)
    out: Dict[str, Any] = {"epoch": trainer.state.epoch, "step": trainer.state.step,
                           "time/train_s": trainer.state.train_s}
    out.update({k: v for k, v in last.items() if "/" in k and not k.startswith("train/")})
    out.update({k: v for k, v in last.items() if k.startswith("train/")})

    if need_emb:
        if "test" not in collected:  # resumed after the last epoch: evaluate once here
            res, collected = trainer.evaluate(collect=True)
            out.update(res)
        spaces, labels = collected["test"]
        emb = spaces["new"]
        if t.geometry:
            out.update({f"geometry/{k}": v for k, v in feature_geometry(emb, labels).items()})
        if t.retrieval:
            out.update({f"retrieval/{k}": v for k, v in retrieval_metrics(emb, emb, labels).items()})
        if service is not None and cfg.compat.evaluate:
            out.update(service.evaluate(spaces, labels, evals["test"]))
    # the method's own parameters (head orthogonality, λ-orth's ‖WWᵀ − I‖_F): no data pass, so
    # always reported, also with trainer.geometry=false
    out.update({f"geometry/{k}": v for k, v in net.method.diagnostics().items()})
    if job.regularizer is not None:
        out.update({f"geometry/{k}": v for k, v in job.regularizer.diagnostics().items()})
    if trainer.state.best is not None:
        out["val/best_acc1"] = trainer.state.best
    return out
