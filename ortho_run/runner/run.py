"""One run: compose data → backbone → method → trainer, write the run dir contract.

    <run_dir>/resolved_config.yaml  metrics.jsonl  summary.json  checkpoints/last.pt  wandb/

``run(cfg, run_dir)`` is what the CLI calls for each job; tests call it in-process too.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional

import torch
from omegaconf import OmegaConf

from ortho_run.config import validate_ranges
from ortho_run.datasets import load_dataset
from ortho_run.datasets.loaders import build_loader, choose_pipeline
from ortho_run.errors import OrthoRunError, Preempted, TrainingDiverged
from ortho_run.io import atomic_path, atomic_write_json
from ortho_run.methods import METHODS
from ortho_run.models import build_backbone
from ortho_run.runner import checkpoint as ckpt
from ortho_run.runner.build import build_method
from ortho_run.runner.env import (device_name, git_commit, package_versions, pick_device,
                                  seed_everything)
from ortho_run.runner.evaluate import feature_geometry
from ortho_run.runner.retrieval import retrieval_metrics
from ortho_run.runner.sinks import MetricsFile, WandbSink
from ortho_run.runner.trainer import Dist, Net, Trainer

log = logging.getLogger("ortho_run")


def init_distributed(device_spec: str) -> Dist:
    """torchrun / submitit set RANK, WORLD_SIZE, LOCAL_RANK (and MASTER_ADDR/PORT)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as dist

    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and str(device_spec) != "cpu"
    if not dist.is_initialized():
        if use_cuda:
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return Dist(rank=rank, world_size=world, local_rank=local)


def run_name(cfg) -> str:
    return cfg.logger.name or f"{cfg.method.name}_{cfg.data.name}_s{cfg.seed}"


class _Signals:
    """SIGTERM/SIGINT → the trainer checkpoints at the next batch and exits with code 75."""

    def __init__(self):
        self.trainer: Optional[Trainer] = None
        self.prev = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGTERM, signal.SIGINT):
                self.prev[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.trainer is None:
            raise Preempted(f"stopped by signal {signum} before training started")
        self.trainer.request_stop(signum)

    def __exit__(self, *exc):
        for s, h in self.prev.items():
            signal.signal(s, h)


def _shared_run_dir(run_dir: Path, dist: Dist) -> Path:
    """Every rank uses rank 0's run dir (Hydra gives each process its own time stamp)."""
    if dist.world_size == 1:
        return run_dir
    import torch.distributed as tdist

    box = [str(run_dir)]
    tdist.broadcast_object_list(box, src=0)
    return Path(box[0])


def run(cfg, run_dir: Path, sweep: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    validate_ranges(cfg)  # before anything is written
    dist = init_distributed(cfg.trainer.device)
    run_dir = _shared_run_dir(Path(run_dir), dist)
    main = dist.is_main
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(run_dir / "resolved_config.yaml") as tmp:
            tmp.write_text(OmegaConf.to_yaml(cfg, resolve=True))
    container = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    facts: Dict[str, Any] = {
        "method": cfg.method.name, "data": cfg.data.name, "model": cfg.model.name,
        "seed": cfg.seed, "tag": cfg.tag, "run_dir": str(run_dir), **git_commit(),
        "versions": package_versions(), "world_size": dist.world_size,
    }
    if sweep:
        facts.update(sweep)
    metrics = MetricsFile(run_dir / "metrics.jsonl")
    wb = WandbSink(cfg.logger, run_dir, container, run_name(cfg),
                   cfg.logger.group or (sweep or {}).get("sweep"), enabled=main)
    summary: Dict[str, Any] = {"status": "running", **facts}
    t_start = time.time()

    def emit(row):
        if main:
            metrics.write(row)
            wb.log({k: v for k, v in row.items() if k != "step"}, step=row.get("step"))
            log.info(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                              for k, v in row.items()))

    exit_code = 0
    try:
        with _Signals() as sig:
            summary.update(_train_and_evaluate(cfg, run_dir, dist, emit, sig, metrics, facts))
        summary["status"] = "finished"
        return summary
    except OrthoRunError as exc:
        exit_code = exc.exit_code
        summary["status"] = {TrainingDiverged: "diverged", Preempted: "preempted"}.get(
            type(exc), "failed")
        summary["error"] = str(exc)
        raise
    except BaseException as exc:
        exit_code = 1
        summary["status"] = "failed"
        summary["error"] = f"{type(exc).__name__}: {exc}"
        summary["traceback"] = traceback.format_exc()
        raise
    finally:
        for k, v in facts.items():  # facts learned during the run (device, pipeline, sizes)
            summary.setdefault(k, v)
        summary["time/total_s"] = time.time() - t_start
        if main:
            try:
                atomic_write_json(summary, run_dir / "summary.json")
            except OSError as exc:
                log.error("could not write %s: %s", run_dir / "summary.json", exc)
            wb.summary({k: v for k, v in summary.items() if isinstance(v, (int, float, str))})
        wb.finish(exit_code)
        if dist.world_size > 1:
            import torch.distributed as tdist

            if tdist.is_initialized():
                tdist.destroy_process_group()


@dataclass
class Job:
    trainer: Trainer
    ds: object
    net: Net
    evals: Dict[str, object]
    device: torch.device
    pipeline: str
    old_model: object = None


def build_job(cfg, run_dir: Path, dist: Dist = Dist(), emit=lambda row: None) -> Job:
    """Data → loaders → backbone → method → trainer, exactly as a run builds them."""
    t = cfg.trainer
    device = pick_device(t.device)
    if device.type == "cuda" and dist.world_size > 1:
        device = torch.device("cuda", dist.local_rank)
    seed_everything(cfg.seed + dist.rank, t.deterministic)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    ds = load_dataset(cfg.data)
    pipeline = choose_pipeline(str(cfg.data.pipeline), ds, device)
    channels_last = bool(t.channels_last and device.type == "cuda")
    loader_kw = dict(pipeline=pipeline, channels_last=channels_last, rank=dist.rank,
                     world_size=dist.world_size)
    train_loader = build_loader(ds, ds.train, cfg.data, device, True, cfg.seed,
                                limit_batches=t.limit_train_batches, **loader_kw)
    evals = {"test": build_loader(ds, ds.test, cfg.data, device, False, cfg.seed, **loader_kw)}
    if ds.val is not None:
        evals["val"] = build_loader(ds, ds.val, cfg.data, device, False, cfg.seed, **loader_kw)

    old_model = None
    method_cls = METHODS.get(cfg.method.name)
    model_cfg = cfg.model
    if method_cls.needs_old_model:
        from ortho_run.runner.compat import provide_old_model

        old_model = provide_old_model(cfg, ds, device, train_fn=run)
        dim = method_cls.feature_dim_for(cfg.method, old_model)
        if dim is not None and dim != model_cfg.embed_dim:
            model_cfg = OmegaConf.merge(model_cfg, {"embed_dim": dim})
    torch.manual_seed(cfg.seed)  # model init does not depend on the data set's RNG use
    backbone = build_backbone(model_cfg, ds.channels, ds.image_size)
    method = build_method(cfg, ds, backbone.feature_dim, device, dist, old_model)
    method.init_backbone(backbone)
    net = Net(backbone, method).to(device)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    shape = {"channels": ds.channels, "image_size": ds.image_size,
              "num_classes": ds.num_classes, "embed_dim": model_cfg.embed_dim}
    trainer = Trainer(cfg, net, train_loader, evals, device, run_dir, emit, dist, shape)
    return Job(trainer, ds, net, evals, device, pipeline, old_model)


def _train_and_evaluate(cfg, run_dir, dist, emit, sig, metrics, facts) -> Dict[str, Any]:
    t = cfg.trainer
    job = build_job(cfg, run_dir, dist, emit)
    trainer, ds, net, evals, old_model = job.trainer, job.ds, job.net, job.evals, job.old_model
    resume = ckpt.resolve_resume(t.resume, run_dir)
    if resume is not None:
        trainer.load_state_dict(ckpt.load(resume, cfg))
        log.info("resumed from %s at epoch %d batch %d", resume, trainer.state.epoch,
                 trainer.state.batch)
        if dist.is_main:
            metrics.truncate_after(trainer.state.epoch)
    sig.trainer = trainer
    facts.update(pipeline=job.pipeline, device=device_name(job.device),
                 num_classes=ds.num_classes, train_size=len(ds.train), test_size=len(ds.test))

    # Final analysis on the test split (geometry, retrieval, compatibility) uses the embeddings
    # of the last epoch's evaluation: no second pass over the evaluation splits.
    need_emb = t.geometry or t.retrieval or old_model is not None
    trainer.collect_final = need_emb
    last = trainer.fit()
    out: Dict[str, Any] = {"epoch": trainer.state.epoch, "step": trainer.state.step}
    out.update({k: v for k, v in last.items() if "/" in k and not k.startswith("train/")})
    out.update({k: v for k, v in last.items() if k.startswith("train/")})

    if need_emb:
        if "test" not in trainer.collected:  # resumed after the last epoch: evaluate once here
            out.update(trainer.evaluate_all(collect=True))
        emb, labels = trainer.collected["test"]
        if t.geometry:
            out.update({f"geometry/{k}": v for k, v in feature_geometry(emb, labels).items()})
        if t.retrieval:
            out.update({f"retrieval/{k}": v for k, v in retrieval_metrics(emb, emb, labels).items()})
        if old_model is not None and cfg.compat.evaluate:
            from ortho_run.runner.compat import compat_matrix

            out.update(compat_matrix(trainer, old_model, evals["test"]))
    # the method's own parameters (head orthogonality, λ-orth's ‖WWᵀ − I‖_F): no data pass, so
    # always reported, also with trainer.geometry=false
    out.update({f"geometry/{k}": v for k, v in net.method.diagnostics().items()})
    if trainer.state.best is not None:
        out["val/best_acc1"] = trainer.state.best
    return out
