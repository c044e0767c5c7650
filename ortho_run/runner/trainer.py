"""The training loop: AMP, the method's own optimisers, schedules, eval, checkpoints.

The loop never knows which method it runs: it calls ``method.loss`` and logs every part it
returns, steps every optimiser the role-tagged parameter groups asked for (the configured one
and any a method names, e.g. GCR's Riemannian step), and saves whatever state those hold. Loss parts are summed on the device and read once per epoch (plus one small
non-finite check every ``trainer.nonfinite_check_every`` steps), so there is no host sync per
step.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from omegaconf import OmegaConf

from ortho_run import checkpoint as ckpt
from ortho_run.assemble import Net, NetSpec
from ortho_run.errors import CheckpointError, Preempted, TrainingDiverged, first_line
from ortho_run.optim import (build_optimizers, build_scheduler, optimizer_kind, restore_optimizer,
                             schedule_at)
from ortho_run.parallel import any_rank, broadcast_buffers, max_over_ranks
from ortho_run.runner.env import rng_state, set_rng_state
from ortho_run.runner.evaluate import evaluate
from ortho_run.runner.guards import STOP_AGREE_EVERY, NonFiniteGuard, StopRequest
from ortho_run.runner.sinks import RunProgress

log = logging.getLogger("ortho_run")


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce(self, t: torch.Tensor) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.all_reduce(t)


@dataclass
class TrainState:
    epoch: int = 0  # the epoch in progress (== completed epochs at an epoch boundary)
    batch: int = 0  # batches done inside ``epoch`` (non-zero only for a mid-epoch checkpoint)
    step: int = 0  # optimiser steps so far
    sums: Dict[str, float] = field(default_factory=dict)  # partial epoch sums (mid-epoch)
    best: Optional[float] = None
    history: List[dict] = field(default_factory=list)
    #: seconds of the timed regions so far: a backbone's data initialisation, the training
    #: epochs and the final evaluation (airbench's definition; per-epoch evaluations excluded)
    train_s: float = 0.0


class RegionTimer:
    """Adds the duration of ``with timer.region():`` blocks to a total: CUDA events on a GPU
    (one synchronisation at the end of each region), the wall clock elsewhere."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    @contextlib.contextmanager
    def region(self, state: "TrainState"):
        if self.cuda:
            start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
            start.record()
            yield
            end.record()
            end.synchronize()
            state.train_s += start.elapsed_time(end) / 1000.0
        else:
            t0 = time.perf_counter()
            yield
            state.train_s += time.perf_counter() - t0


#: per evaluation split: ({space name: embeddings}, labels)
Collected = Dict[str, Tuple[Dict[str, torch.Tensor], torch.Tensor]]


class Trainer:
    """The loop's policy: steps, epochs, evaluation, checkpoints. Public: ``step``,
    ``train_epoch``, ``evaluate``, ``fit``, ``save``/``state_dict``/``load_state_dict``."""

    def __init__(self, cfg, net: Net, train_loader, eval_loaders: Dict[str, object],
                 device: torch.device, run_dir: Path, emit: Callable[[dict], None],
                 dist: Dist = Dist(), spec: Optional[NetSpec] = None, regularizer=None,
                 init_images: Optional[torch.Tensor] = None, resume: Optional[dict] = None,
                 earlier_models: Sequence[str] = ()):
        #: what rebuilds the net without the data set or an old model (the checkpoint's "shape")
        self.spec = spec
        #: the earlier models a compatibility run trains against (``CompatPlan.models``)
        self.earlier_models = list(earlier_models)
        # plain dataclasses: the hot loop reads these every step (OmegaConf lookups are slow)
        self.cfg, self.tcfg = cfg, OmegaConf.to_object(cfg.trainer)
        self.config = ckpt.run_config(cfg)
        self.net, self.device, self.run_dir = net, device, run_dir
        self.train_loader, self.eval_loaders = train_loader, eval_loaders
        self.emit, self.dist = emit, dist
        self.ckpt_dir = run_dir / "checkpoints"
        self.stop = StopRequest()
        optim_cfg = OmegaConf.to_object(cfg.optim)
        groups = net.backbone.param_groups() + net.method.param_groups()
        self.optimizers = build_optimizers(groups, optim_cfg, device)
        if not self.optimizers:
            raise TrainingDiverged("nothing to train: every parameter is frozen")
        self.frozen_backbone = not any(p.requires_grad for p in net.backbone.parameters())
        spe = max(1, len(train_loader))
        self.schedulers = [build_scheduler(o, optim_cfg, spe, self.tcfg.max_epochs)
                           for o in self.optimizers]
        self.params = [p for p in net.parameters() if p.requires_grad]
        prec = str(self.tcfg.precision)
        self.amp_dtype = None
        if prec == "bf16" or (prec == "auto" and device.type == "cuda"):
            self.amp_dtype = torch.bfloat16
        self.train_net = net
        if dist.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.train_net = DDP(net, device_ids=[device.index] if device.type == "cuda" else None)
        self.loss_fn = net.method.loss
        #: an orthogonality regulariser of the backbone adds ``weight × penalty`` as part "reg"
        self.regularizer = regularizer if regularizer is not None and regularizer.adds_loss \
            else None
        self.reg_weight = self.regularizer.weight_at(0) if self.regularizer is not None else 0.0
        self.penalty_fn = self.regularizer.penalty if self.regularizer is not None else None
        if self.tcfg.compile:
            mode = str(self.tcfg.compile_mode)
            self.train_net = torch.compile(self.train_net, mode=mode)
            self.loss_fn = torch.compile(net.method.loss, mode=mode)
            if self.penalty_fn is not None:
                self.penalty_fn = torch.compile(self.penalty_fn, mode=mode)
            for o in self.optimizers:  # optimisers whose step compiles (the orthogonalised)
                if hasattr(o, "compile_step"):
                    o.compile_step(mode)
        self.skip_bad = str(self.tcfg.on_nonfinite) == "skip"
        self.guard = NonFiniteGuard(self.tcfg.nonfinite_check_every, device,
                                    self.ckpt_dir / "last.pt")
        self.state = TrainState()
        self.progress: Optional[RunProgress] = None  # the run's bar, while fit() runs
        self.sum_loss = str(self.tcfg.loss_reduction) == "sum"
        #: normalised training images a backbone initialises itself from (airbench's whitening)
        self.init_images = init_images
        self.timer = RegionTimer(device)
        if resume is not None:  # a checkpoint's state (``state_dict``): continue from it
            self.load_state_dict(resume)

    # --- helpers ----------------------------------------------------------------------
    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def request_stop(self, signum: int) -> None:
        self.stop.request(signum)

    def state_dict(self) -> dict:
        s = self.state
        return {
            "config": self.config,  # compared on resume
            "fingerprint": ckpt.fingerprint(self.cfg),
            "shape": self.spec.to_dict() if self.spec is not None else {},
            "earlier_models": self.earlier_models,  # compared on resume
            "world_size": self.dist.world_size,  # compared on resume
            "net": self.net.state_dict(),
            "optimizers": [o.state_dict() for o in self.optimizers],
            "optimizer_kinds": [optimizer_kind(o) for o in self.optimizers],
            "schedulers": [sc.state_dict() for sc in self.schedulers],
            "epoch": s.epoch, "batch": s.batch, "step": s.step, "sums": dict(s.sums),
            "best": s.best, "history": list(s.history), "rng": rng_state(),
            "train_s": s.train_s,
        }

    def load_state_dict(self, st: dict) -> None:
        """Continue from checkpoint state ``st``: the net's weights, the optimisers' state, the
        counters and the random state come from it; every hyperparameter (the groups' lrs,
        momenta, weight decays, the schedules' base lrs) comes from this run's config, the
        schedules are put at the checkpoint's step. State of another optimiser is refused."""
        try:
            self.net.load_state_dict(st["net"])
            mine = [optimizer_kind(o) for o in self.optimizers]
            saved = st.get("optimizer_kinds")  # absent in checkpoints of earlier versions
            if len(st["optimizers"]) != len(mine) or (saved is not None and saved != mine):
                theirs = ", ".join(saved) if saved else f"{len(st['optimizers'])} optimisers"
                raise ValueError(f"its optimisers are {theirs}, this run's are {', '.join(mine)}")
            for o, sd in zip(self.optimizers, st["optimizers"]):
                restore_optimizer(o, sd)
        except (RuntimeError, KeyError, ValueError) as exc:
            raise CheckpointError(
                f"checkpoint does not fit this model/method/optimiser: "
                f"{first_line(exc, empty=repr(exc))}. Resume it with the "
                f"config it was saved with, or start over with trainer.resume=none") from None
        if st["batch"] > len(self.train_loader):
            raise CheckpointError(
                f"the checkpoint was written at batch {st['batch']} of epoch {st['epoch'] + 1}, "
                f"but this run's epoch has {len(self.train_loader)} batches: resume it with the "
                f"data config it was saved with, or start over with trainer.resume=none")
        self.state = TrainState(epoch=st["epoch"], batch=st["batch"], step=st["step"],
                                sums=dict(st["sums"]), best=st["best"],
                                history=list(st["history"]), train_s=st.get("train_s", 0.0))
        for sc in self.schedulers:
            schedule_at(sc, self.state.step)
        set_rng_state(st["rng"])

    def save(self, name: str = "last.pt") -> None:
        if self.dist.is_main:
            ckpt.save(self.ckpt_dir / name, self.state_dict())

    # --- one step ---------------------------------------------------------------------
    def step(self, x: torch.Tensor, y: torch.Tensor) -> Optional[Dict[str, torch.Tensor]]:
        """Forward, loss, backward and every optimiser's step (plus the schedules) on one
        batch. Returns the loss parts, or None when a non-finite loss was skipped
        (``trainer.on_nonfinite=skip``, which costs a host sync per step)."""
        with self.autocast():
            batch, out = self.train_net(x, y)
            parts = self.loss_fn(out, batch)
        if self.regularizer is not None:  # in full precision, outside autocast
            if self.reg_weight:
                reg = self.penalty_fn()
                parts = dict(parts, loss=parts["loss"] + self.reg_weight * reg, reg=reg)
            else:  # a weight stepped down to 0: the penalty is still logged, not trained
                with torch.no_grad():
                    parts = dict(parts, reg=self.penalty_fn())
        loss = parts["loss"]
        for o in self.optimizers:
            o.zero_grad(set_to_none=True)
        # with several ranks, a step is skipped on every rank or on none (their gradients are
        # averaged): a non-finite loss on one skips it on all
        if self.skip_bad and any_rank(~torch.isfinite(loss.detach()), self.device):
            return None
        if self.sum_loss:  # the batch's summed loss; the logged parts stay per-example means
            loss = loss * len(y)
        loss.backward()
        if self.tcfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.params, self.tcfg.grad_clip)
        for o in self.optimizers:
            o.step()
        for sc in self.schedulers:
            sc.step()
        self.state.step += 1
        return parts

    # --- one epoch --------------------------------------------------------------------
    def train_epoch(self, limit: Optional[int] = None) -> dict:
        """Train epoch ``state.epoch`` (from ``state.batch`` when resuming mid-epoch), at most
        ``limit`` batches of it, and return its metrics row. The epoch counter advances."""
        t, st, dev = self.tcfg, self.state, self.device
        epoch = st.epoch
        self.net.train()
        if self.frozen_backbone:  # nothing of it trains: its BN statistics stay put too
            self.net.backbone.eval()
        loader = self.train_loader
        loader.set_epoch(epoch)
        if self.regularizer is not None:  # the penalty's weight of this epoch
            self.reg_weight = self.regularizer.weight_at(epoch)
        names: Optional[List[str]] = None  # loss part names, fixed by the first batch
        acc: Optional[torch.Tensor] = None  # [n_images, Σ part·batch, ...] on the device
        if st.sums:
            names = [k for k in st.sums if k != "_n"]
            acc = torch.tensor([st.sums["_n"]] + [st.sums[k] for k in names], device=dev,
                               dtype=torch.float64)
        skipped = 0
        start = st.batch
        n_batches = len(loader) if limit is None else min(len(loader), start + limit)
        bar = self.progress
        if bar is not None:
            bar.epoch(epoch)
        t0 = time.perf_counter()
        n_imgs = 0
        for i, (x, y) in enumerate(loader):
            if i < start:  # resuming mid-epoch: the loader replays the same batches
                continue
            if i >= n_batches:
                break
            parts = self.step(x, y)
            st.batch = i + 1
            if parts is None:
                skipped += 1
                continue
            bs = len(y)
            n_imgs += bs
            if names is None:
                names = list(parts)
                acc = torch.zeros(len(names) + 1, device=dev, dtype=torch.float64)
            with torch.no_grad():
                acc[0] += bs
                acc[1:].add_(torch.stack(list(parts.values())).detach(), alpha=bs)  # fp64 sums
            self.guard.record(st.step, parts["loss"])
            if self.guard.due(st.step):
                self.guard.check(st.step, epoch, names, acc)
                if bar is not None and bar.on:  # a host read only when a bar shows it
                    n_seen, loss_sum = acc[:2].tolist()
                    bar.loss(loss_sum / max(n_seen, 1.0))
            if t.log_every_steps > 0 and st.step % t.log_every_steps == 0 and self.dist.is_main:
                self.emit({"epoch": epoch + (i + 1) / len(loader), "step": st.step,
                           **{f"train/{k}_step": float(v.detach()) for k, v in parts.items()},
                           "lr": self.optimizers[0].param_groups[0]["lr"]})
            if bar is not None:
                bar.update()
            if self._stop_here(st.step):
                self._check_finite(epoch, names or [], acc)
                if acc is not None:
                    vals = acc.tolist()
                    st.sums = {"_n": vals[0], **dict(zip(names, vals[1:]))}
                self._preempt()
        names = names or []
        self._check_finite(epoch, names, acc)
        tot = acc.clone() if acc is not None else torch.zeros(1, device=dev, dtype=torch.float64)
        self.dist.all_reduce(tot)
        tot = tot.tolist()
        dt = time.perf_counter() - t0
        n = max(tot[0], 1.0)
        row = {"epoch": epoch + 1, "step": st.step}
        row.update({f"train/{k}": v / n for k, v in zip(names, tot[1:])})
        row["lr"] = self.optimizers[0].param_groups[0]["lr"]
        if self.regularizer is not None:
            row["reg_weight"] = self.reg_weight
        row["time/epoch_s"] = dt
        row["time/train_img_per_s"] = n_imgs * self.dist.world_size / max(dt, 1e-9)
        if skipped:
            row["train/skipped_steps"] = skipped
        if bar is not None and names:
            bar.loss(row["train/loss"])
        st.epoch, st.batch, st.sums = epoch + 1, 0, {}
        return row

    def _check_finite(self, epoch: int, names: List[str], acc: Optional[torch.Tensor]) -> None:
        """Before a checkpoint may be written: the losses since the last check, then the
        weights (a finite loss's update can still overflow them)."""
        if self.guard.enabled:
            self.guard.check(self.state.step, epoch, names, acc, partial=True)
            self.guard.check_weights(self.net, self.state.step, epoch)

    # --- evaluation -------------------------------------------------------------------
    def evaluate(self, collect: bool = False) -> Tuple[dict, Collected]:
        """Loss and accuracy on every evaluation split; with ``collect`` also every named
        embedding space of the method and the labels (for geometry, retrieval, compat)."""
        row: dict = {}
        collected: Collected = {}
        broadcast_buffers(self.net)  # with several ranks, each evaluates the net rank 0 saves
        for name, loader in self.eval_loaders.items():
            res = evaluate(self.net, loader, self.autocast, collect=collect,
                           reduce=self.dist.all_reduce if self.dist.world_size > 1 else None,
                           tta_flip=self.tcfg.tta_flip,
                           tta_translate=self.tcfg.tta_translate)
            if collect:
                collected[name] = (res.pop("embeddings"), res.pop("labels"))
            for k, v in res.items():
                if k != "n":
                    row[f"{name}/{k}"] = v
        return row, collected

    # --- the run ----------------------------------------------------------------------
    def fit(self, collect_final: bool = False) -> Tuple[dict, Collected]:
        """Train to ``trainer.max_epochs`` with evaluation and checkpoints; returns the last
        epoch's row and, with ``collect_final``, its evaluation's embeddings."""
        t = self.tcfg
        collected: Collected = {}
        self.progress = RunProgress(str(t.progress) if self.dist.is_main else "off",
                                    t.max_epochs, len(self.train_loader), self.state.epoch,
                                    self.state.batch)
        try:
            return self._fit(collect_final, collected)
        finally:
            self.progress.close()
            self.progress = None

    def warm_up(self, steps: int) -> None:
        """Train ``steps`` steps, then put the net, the optimisers' state, the schedules, the
        random state and the counters back as they were: compilation (and CUDA-graph capture)
        happens here, outside the timed run, which then trains exactly as without it. The
        optimisers' state tensors are zeroed in place (their addresses stay; zero momentum is
        the state every optimiser here starts from)."""
        net_state = {k: v.detach().clone() for k, v in self.net.state_dict().items()}
        sched = [sc.state_dict() for sc in self.schedulers]
        rng, st = rng_state(), self.state
        done = 0
        while done < steps:
            self.train_loader.set_epoch(0)
            for x, y in self.train_loader:
                self.step(x, y)
                done += 1
                if done >= steps:
                    break
        self.net.load_state_dict(net_state)
        for o in self.optimizers:
            for p_state in o.state.values():
                for k, v in p_state.items():
                    if isinstance(v, torch.Tensor):
                        v.zero_()
                    elif isinstance(v, (int, float)) and not isinstance(v, bool):
                        p_state[k] = type(v)(0)
        for sc, sd in zip(self.schedulers, sched):
            sc.load_state_dict(sd)
        for o, sc in zip(self.optimizers, self.schedulers):
            for g, lr in zip(o.param_groups, sc.get_last_lr()):
                g["lr"] = lr
        self.guard.window.zero_()
        set_rng_state(rng)
        self.state = st
        self.state.step = 0

    def _fit(self, collect_final: bool, collected: Collected) -> Tuple[dict, Collected]:
        t = self.tcfg
        fresh = self.state.step == 0 and self.state.epoch == 0
        if fresh and t.warmup_steps:
            self.warm_up(t.warmup_steps)
        if fresh and self.init_images is not None:
            with self.timer.region(self.state):
                self.net.backbone.init_from_data(self.init_images)
        while self.state.epoch < t.max_epochs:
            with self.timer.region(self.state):
                row = self.train_epoch()
            last = self.state.epoch == t.max_epochs
            if last or (t.eval_every > 0 and self.state.epoch % t.eval_every == 0):
                with self.timer.region(self.state) if last else contextlib.nullcontext():
                    res, got = self.evaluate(collect=last and collect_final)
                if self.guard.enabled:  # before the epoch's checkpoint: its net is a good one
                    self.guard.check_outputs(res, self.state.step, self.state.epoch - 1)
                row.update(res)
                collected.update(got)
                self._maybe_best(row)
            self.state.history.append(row)
            self.emit(row)
            if last or (t.checkpoint_every > 0 and self.state.epoch % t.checkpoint_every == 0):
                self.save()
            if self._stop_here():
                self._preempt()
        return (self.state.history[-1] if self.state.history else {}), collected

    def _stop_here(self, step: Optional[int] = None) -> bool:
        """Whether the run stops after this step (``step``) or at this epoch's end (None). In
        one process, as soon as a stop is requested; with several ranks, where they agree on it,
        so that all stop after the same step: every ``trainer.nonfinite_check_every`` steps
        (``STOP_AGREE_EVERY`` with that check off) and at each epoch's end."""
        if self.dist.world_size <= 1:
            return self.stop.requested
        every = self.guard.every if self.guard.enabled else STOP_AGREE_EVERY
        if step is not None and step % every:
            return False
        signum = int(max_over_ranks(self.stop.signal or 0, self.device))
        if signum:  # a rank that got no signal stops for the one that did
            self.stop.request(signum)
        return bool(signum)

    def _preempt(self):
        self.save()
        raise Preempted(f"stopped by signal {self.stop.signal} at epoch {self.state.epoch}, "
                        f"batch {self.state.batch}; {self.ckpt_dir / 'last.pt'} is complete.")

    def _maybe_best(self, row: dict) -> None:
        key = "val/acc1"
        if key in row and (self.state.best is None or row[key] > self.state.best):
            self.state.best = row[key]
            self.save("best.pt")
