"""The training loop: AMP, the method's own optimisers, schedules, eval, checkpoints.

The loop never knows which method it runs: it calls ``method.loss`` and logs every part it
returns, steps the main optimiser plus ``method.extra_optimizers``, and saves whatever state
those hold. Loss parts are summed on the device and read once per epoch (plus one small
non-finite check every ``trainer.nonfinite_check_every`` steps), so there is no host sync per
step.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
from omegaconf import OmegaConf
from torch import nn

from ortho_run.errors import Preempted, TrainingDiverged
from ortho_run.runner import checkpoint as ckpt
from ortho_run.runner.env import rng_state, set_rng_state
from ortho_run.runner.evaluate import evaluate
from ortho_run.runner.optim import build_optimizer, build_scheduler
from ortho_run.runner.sinks import Progress

log = logging.getLogger("ortho_run")


class Net(nn.Module):
    """backbone → features → method head. One module, so DDP and checkpoints see it whole."""

    def __init__(self, backbone: nn.Module, method: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.method = method

    def forward(self, x):
        feats = self.backbone(x)
        if self.method.uses_inputs:
            return feats, self.method(feats, inputs=x)
        return feats, self.method(feats)


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


class Trainer:
    def __init__(self, cfg, net: Net, train_loader, eval_loaders: Dict[str, object],
                 device: torch.device, run_dir: Path, emit: Callable[[dict], None],
                 dist: Dist = Dist(), shape: Optional[dict] = None):
        #: what rebuilds the net without the data set (channels, image_size, num_classes, dims)
        self.shape = dict(shape or {})
        # plain dataclasses: the hot loop reads these every step (OmegaConf lookups are slow)
        self.cfg, self.tcfg = cfg, OmegaConf.to_object(cfg.trainer)
        self.net, self.device, self.run_dir = net, device, run_dir
        self.train_loader, self.eval_loaders = train_loader, eval_loaders
        self.emit, self.dist = emit, dist
        self.ckpt_dir = run_dir / "checkpoints"
        self.stop_signal: Optional[int] = None
        method = net.method
        if method.freezes_backbone:
            net.backbone.requires_grad_(False)
        groups = []
        bb = [p for p in net.backbone.parameters() if p.requires_grad]
        if bb:
            groups.append({"params": bb})
        groups += method.param_groups(cfg.optim)
        self.optimizers: List[torch.optim.Optimizer] = []
        if groups:
            self.optimizers.append(build_optimizer(groups, cfg.optim, device))
        self.optimizers += method.extra_optimizers(cfg.optim)
        if not self.optimizers:
            raise TrainingDiverged("nothing to train: the method froze every parameter")
        spe = max(1, len(train_loader))
        optim_cfg = OmegaConf.to_object(cfg.optim)
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
        self.loss_fn = method.loss
        if self.tcfg.compile:
            mode = str(self.tcfg.compile_mode)
            self.train_net = torch.compile(self.train_net, mode=mode)
            self.loss_fn = torch.compile(method.loss, mode=mode)
        self.state = TrainState()
        #: keep the last evaluation's embeddings (geometry, retrieval, compat need them)
        self.collect_final = False
        self.collected: Dict[str, tuple] = {}

    # --- helpers ----------------------------------------------------------------------
    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def request_stop(self, signum: int) -> None:
        self.stop_signal = signum

    def state_dict(self) -> dict:
        s = self.state
        return {
            "fingerprint": ckpt.fingerprint(self.cfg),
            "shape": self.shape,
            "net": self.net.state_dict(),
            "optimizers": [o.state_dict() for o in self.optimizers],
            "schedulers": [sc.state_dict() for sc in self.schedulers],
            "epoch": s.epoch, "batch": s.batch, "step": s.step, "sums": dict(s.sums),
            "best": s.best, "history": list(s.history), "rng": rng_state(),
        }

    def load_state_dict(self, st: dict) -> None:
        try:
            self.net.load_state_dict(st["net"])
            for o, sd in zip(self.optimizers, st["optimizers"], strict=True):
                o.load_state_dict(sd)
            for sc, sd in zip(self.schedulers, st["schedulers"], strict=True):
                sc.load_state_dict(sd)
        except (RuntimeError, KeyError, ValueError) as exc:
            from ortho_run.errors import CheckpointError

            raise CheckpointError(f"checkpoint does not fit this model/method/optimiser: "
                                  f"{str(exc).splitlines()[0]}") from None
        self.state = TrainState(epoch=st["epoch"], batch=st["batch"], step=st["step"],
                                sums=dict(st["sums"]), best=st["best"],
                                history=list(st["history"]))
        set_rng_state(st["rng"])

    def save(self, name: str = "last.pt") -> None:
        if self.dist.is_main:
            ckpt.save(self.ckpt_dir / name, self.state_dict())

    # --- the loop ---------------------------------------------------------------------
    def fit(self) -> dict:
        t = self.tcfg
        while self.state.epoch < t.max_epochs:
            epoch = self.state.epoch
            row = self._train_epoch(epoch)
            self.state.epoch, self.state.batch, self.state.sums = epoch + 1, 0, {}
            last = self.state.epoch == t.max_epochs
            if last or (t.eval_every > 0 and self.state.epoch % t.eval_every == 0):
                row.update(self.evaluate_all(collect=last and self.collect_final))
                self._maybe_best(row)
            self.state.history.append(row)
            self.emit(row)
            if last or (t.checkpoint_every > 0 and self.state.epoch % t.checkpoint_every == 0):
                self.save()
            if self.stop_signal is not None:
                self._preempt()
        return self.state.history[-1] if self.state.history else {}

    def _preempt(self):
        self.save()
        raise Preempted(f"stopped by signal {self.stop_signal} at epoch {self.state.epoch}, "
                        f"batch {self.state.batch}; {self.ckpt_dir / 'last.pt'} is complete. "
                        f"Run the same command with trainer.resume=auto (same run dir) to continue.")

    def _maybe_best(self, row: dict) -> None:
        key = "val/acc1"
        if key in row and (self.state.best is None or row[key] > self.state.best):
            self.state.best = row[key]
            self.save("best.pt")

    def _train_epoch(self, epoch: int) -> dict:
        t, net = self.tcfg, self.train_net
        self.net.train()
        if self.net.method.freezes_backbone:
            self.net.backbone.eval()
        loader = self.train_loader
        loader.set_epoch(epoch)
        dev = self.device
        names: Optional[List[str]] = None  # loss part names, fixed by the first batch
        acc: Optional[torch.Tensor] = None  # [n_images, Σ part·batch, ...] on the device
        if self.state.sums:
            names = [k for k in self.state.sums if k != "_n"]
            acc = torch.tensor([self.state.sums["_n"]] + [self.state.sums[k] for k in names],
                               device=dev, dtype=torch.float64)
        check = max(1, t.nonfinite_check_every)
        window = torch.zeros(check, device=dev)  # recent losses, scanned at each check
        skip_bad = str(t.on_nonfinite) == "skip"
        skipped = 0
        start_batch = self.state.batch
        bar = Progress(str(t.progress) if self.dist.is_main else "off", len(loader),
                       f"epoch {epoch + 1}/{t.max_epochs}")
        t0 = time.perf_counter()
        n_imgs = 0
        for i, (x, y) in enumerate(loader):
            if i < start_batch:  # resuming mid-epoch: the loader replays the same batches
                continue
            with self.autocast():
                feats, out = net(x)
                parts = self.loss_fn(out, feats, y)
            loss = parts["loss"]
            for o in self.optimizers:
                o.zero_grad(set_to_none=True)
            if skip_bad and not bool(torch.isfinite(loss.detach())):  # opt-in: a sync per step
                skipped += 1
                self.state.batch = i + 1
                continue
            loss.backward()
            if t.grad_clip:
                torch.nn.utils.clip_grad_norm_(self.params, t.grad_clip)
            for o in self.optimizers:
                o.step()
            for sc in self.schedulers:
                sc.step()
            self.state.step += 1
            self.state.batch = i + 1
            bs = len(y)
            n_imgs += bs
            if names is None:
                names = list(parts)
                acc = torch.zeros(len(names) + 1, device=dev, dtype=torch.float64)
            with torch.no_grad():
                acc[0] += bs
                acc[1:].add_(torch.stack(list(parts.values())).detach(), alpha=bs)  # fp64 sums
                window[(self.state.step - 1) % check] = loss
            if t.nonfinite_check_every > 0 and self.state.step % check == 0:
                self._check_finite(window, names, acc)
            if t.log_every_steps > 0 and self.state.step % t.log_every_steps == 0 and self.dist.is_main:
                self.emit({"epoch": epoch + (i + 1) / len(loader), "step": self.state.step,
                           **{f"train/{k}_step": float(v) for k, v in parts.items()},
                           "lr": self.optimizers[0].param_groups[0]["lr"]})
            bar.update()
            if self.stop_signal is not None:
                if acc is not None:
                    vals = acc.tolist()
                    self.state.sums = {"_n": vals[0], **dict(zip(names, vals[1:]))}
                bar.close()
                self._preempt()
        bar.close()
        names = names or []
        if acc is None:
            acc = torch.zeros(1, device=dev, dtype=torch.float64)
        last = (self.state.step - 1) % check + 1 if self.state.step else 0
        self._check_finite(window[:last], names, acc)
        tot = acc.clone()
        self.dist.all_reduce(tot)
        tot = tot.tolist()
        dt = time.perf_counter() - t0
        n = max(tot[0], 1.0)
        row = {"epoch": epoch + 1, "step": self.state.step}
        row.update({f"train/{k}": v / n for k, v in zip(names, tot[1:])})
        row["lr"] = self.optimizers[0].param_groups[0]["lr"]
        row["time/epoch_s"] = dt
        row["time/train_img_per_s"] = n_imgs * self.dist.world_size / max(dt, 1e-9)
        if skipped:
            row["train/skipped_steps"] = skipped
        return row

    def _check_finite(self, window, names, acc) -> None:
        """One host read of the recent losses; names the first bad step and the loss parts."""
        finite = torch.isfinite(window)
        if bool(finite.all()):
            return
        first = int((~finite).nonzero()[0, 0])
        step = self.state.step - (len(window) - first) + 1
        vals = acc.tolist()
        parts = {k: v / max(vals[0], 1.0) for k, v in zip(names, vals[1:])}
        bad = [k for k, v in parts.items() if v != v or v in (float("inf"), float("-inf"))]
        raise TrainingDiverged(
            f"non-finite loss at step {step} (epoch {self.state.epoch + 1}); non-finite parts: "
            f"{', '.join(bad) or 'loss'}; epoch means so far: "
            + ", ".join(f"{k}={v:.4g}" for k, v in parts.items())
            + f". The last good checkpoint ({self.ckpt_dir / 'last.pt'}) is kept. Lower optim.lr, "
              f"set trainer.grad_clip, or trainer.on_nonfinite=skip to skip such steps.")

    def evaluate_all(self, collect: bool = False) -> dict:
        row = {}
        self.collected = {}
        for name, loader in self.eval_loaders.items():
            res = evaluate(self.net, loader, self.autocast, collect=collect,
                           reduce=self.dist.all_reduce if self.dist.world_size > 1 else None,
                           tta_flip=self.tcfg.tta_flip)
            if collect:
                self.collected[name] = (res.pop("embeddings"), res.pop("labels"))
            for k, v in res.items():
                if k != "n":
                    row[f"{name}/{k}"] = v
        return row
