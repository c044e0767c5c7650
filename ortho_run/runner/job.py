"""A run's job in two steps: ``plan(cfg)`` resolves everything the run needs from the config
and the data once (device, the data set with the input normalisation its backbone asks for,
the pipeline, what the method needs, the chain of earlier models of a compatibility run, the
net spec); ``build(plan)`` makes the models, the net, the loaders and the trainer from it, in
that order. Nothing goes back to change what an earlier step made."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Dict, Optional

import torch

from ortho_run import checkpoint as ckpt
from ortho_run.assemble import Net, NetSpec, build_net
from ortho_run.compat import CompatPlan, CompatService, plan_compat
from ortho_run.datasets import load_dataset
from ortho_run.datasets.base import DataSet
from ortho_run.datasets.loaders import (build_loader, build_loaders, choose_pipeline, init_images,
                                        smallest_train_batch)
from ortho_run.methods import METHODS, Needs
from ortho_run.models import model_data_config
from ortho_run.regularizers import Regularizer, build_regularizer
from ortho_run.runner.env import device_name, pick_device, seed_everything
from ortho_run.runner.trainer import Dist, Trainer
from ortho_run.store import compatibility_methods

log = logging.getLogger("ortho_run")


@dataclass
class Plan:
    cfg: object
    run_dir: Path
    dist: Dist
    device: torch.device
    device_name: str  # what summary.json records: the GPU's name, or the CPU's cores and threads
    ds: DataSet  # split, subset and normalised as the loaders will read it
    pipeline: str  # resident | loader
    smallest_batch: int  # the fewest images a training batch of this rank holds
    channels_last: bool
    needs: Needs  # what the method asks of earlier models
    compat: Optional[CompatPlan]  # a compatibility run's steps and earlier models
    spec: NetSpec  # the net, before what an old model adds to it
    data_config: Optional[dict]  # a pretrained backbone's own input normalisation


def prepare(cfg, run_dir: Path, dist: Dist, emit, launch: Callable) -> "Job":
    """The rest of the pre-flight and the job, from a checked config (``validate``): planned,
    the checkpoint it resumes from checked, then the job built (from that checkpoint's state).
    Raises before anything of the run dir is written."""
    p = plan(cfg, run_dir, dist)
    # a checkpoint that may not be continued is refused before an earlier model trains
    point = ckpt.resume_point(cfg, p.run_dir, p.compat.models if p.compat else None,
                              p.dist.world_size)
    job = build(p, launch=launch, emit=emit, resume=point.state if point else None)
    if point is not None:
        job.resumed, job.forced = True, point.forced
        log.info("resumed from %s at epoch %d batch %d", point.path, job.trainer.state.epoch,
                 job.trainer.state.batch)
    return job


def plan(cfg, run_dir: Path, dist: Dist = Dist()) -> Plan:
    t = cfg.trainer
    device = pick_device(t.device)
    if device.type == "cuda" and dist.world_size > 1:
        device = torch.device("cuda", dist.local_rank)
    name = device_name(device)
    seed_everything(cfg.seed + dist.rank, t.deterministic)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    ds = load_dataset(cfg.data)
    # a pretrained backbone brings its own input normalisation (and size, for file data)
    data_config = model_data_config(cfg.model, ds.channels, ds.image_size)
    if data_config:
        ds = replace(ds, mean=tuple(data_config["mean"]), std=tuple(data_config["std"]),
                     image_size=ds.image_size if ds.is_array else data_config["input_size"][-1])
    pipeline = choose_pipeline(str(cfg.data.pipeline), ds, device)
    smallest = smallest_train_batch(len(ds.train), int(cfg.data.batch_size), dist.rank,
                                    dist.world_size)
    needs = METHODS.get(cfg.method.name).needs(cfg.method)
    if not needs.any and cfg.compat.steps:
        log.warning("compat.steps is set, but method=%s trains alone (no old model): the steps "
                    "are ignored; pick a compatibility method (%s)", cfg.method.name,
                    ", ".join(compatibility_methods()))
    return Plan(cfg=cfg, run_dir=Path(run_dir), dist=dist, device=device, device_name=name,
                ds=ds, pipeline=pipeline, smallest_batch=smallest,
                channels_last=bool(t.channels_last and device.type == "cuda"), needs=needs,
                compat=plan_compat(cfg, ds.source_classes, needs) if needs.any else None,
                spec=NetSpec(ds.channels, ds.image_size, ds.num_classes, cfg.model.embed_dim),
                data_config=data_config)


@dataclass
class Job:
    plan: Plan
    trainer: Trainer
    net: Net
    evals: Dict[str, object]  # evaluation loaders by split name
    service: Optional[CompatService] = None  # when the method declared compatibility needs
    regularizer: Optional[Regularizer] = None
    resumed: bool = False
    #: with trainer.resume=force, the differences from the checkpoint's config it accepted
    forced: Dict[str, tuple] = field(default_factory=dict)

    @property
    def cfg(self):
        return self.plan.cfg

    @property
    def ds(self) -> DataSet:
        return self.plan.ds

    @property
    def device(self) -> torch.device:
        return self.plan.device

    @property
    def pipeline(self) -> str:
        return self.plan.pipeline

    def close(self) -> None:
        """Release what the loaders hold (worker processes) once the run has ended."""
        for loader in (self.trainer.train_loader, *self.evals.values()):
            getattr(loader, "close", lambda: None)()


def build(p: Plan, launch: Callable, emit=lambda row: None, resume: Optional[dict] = None) -> Job:
    """The earlier models a compatibility method needs (trained through ``launch`` or found in
    the cache), the net, the regulariser, the loaders and the trainer of plan ``p``, which
    starts from checkpoint state ``resume`` when given."""
    cfg, ds, device = p.cfg, p.ds, p.device
    service = artifacts = backbone_state = None
    frozen: Dict[str, Callable] = {}
    spec = p.spec
    if p.compat is not None:
        service = CompatService(cfg, p.needs, p.compat, launch=launch, device=device).prepare()
        # the old model sees the new task's data through the same loaders
        artifacts = service.artifacts(ds, lambda split: build_loader(
            ds, split, cfg.data, device, False, cfg.seed, p.pipeline))
        frozen = service.frozen_embeddings()
        spec = spec.with_compat(artifacts.shape(), METHODS.get(cfg.method.name).feature_dim(
            cfg.method, artifacts.old_dim, cfg.model.embed_dim))
        if p.needs.independent_backbone:
            backbone_state = service.independent_backbone()
    net = build_net(cfg, spec, device, p.dist.world_size > 1, artifacts, frozen, backbone_state,
                    smallest_batch=p.smallest_batch)
    regularizer = build_regularizer(cfg.regularizer, net.backbone)  # before the optimisers
    train_loader, evals = build_loaders(
        ds, cfg.data, device, cfg.seed, p.pipeline, channels_last=p.channels_last,
        rank=p.dist.rank, world_size=p.dist.world_size,
        limit_train_batches=cfg.trainer.limit_train_batches)
    images = init_images(ds, net.backbone.data_init_images, cfg.data.split_seed, device,
                         f"model={cfg.model.name}")
    if p.channels_last:
        net = net.to(memory_format=torch.channels_last)
    trainer = Trainer(cfg, net, train_loader, evals, device, p.run_dir, emit, p.dist, spec,
                      regularizer=regularizer, init_images=images, resume=resume,
                      earlier_models=p.compat.models if p.compat else ())
    return Job(p, trainer, net, evals, service, regularizer)
