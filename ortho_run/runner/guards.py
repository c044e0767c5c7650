"""The trainer's guards: the non-finite loss window and the stop request (preemption).

Both avoid a host sync per step: losses are written into a small device tensor and read once
every ``every`` steps; a signal only sets a flag that the loop reads between batches. The
weights are checked where a checkpoint may follow (an epoch's end, a stop): a finite loss can
still take an update to a non-finite weight, and no checkpoint, evaluation or summary is made
of such a net.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, List, Optional

import torch

from ortho_run.checkpoint import describe_names, nonfinite_tensors
from ortho_run.errors import TrainingDiverged
from ortho_run.parallel import ranks, sum_over_ranks

#: with several ranks and the non-finite check off, every how many steps they agree on a stop
STOP_AGREE_EVERY = 50


class NonFiniteGuard:
    """Recent losses on the device; ``check`` reads them once and names the first bad step."""

    def __init__(self, every: int, device: torch.device, checkpoint: Path):
        self.enabled = every > 0
        self.every = max(1, every)
        self.window = torch.zeros(self.every, device=device)
        self.checkpoint = checkpoint

    def record(self, step: int, loss: torch.Tensor) -> None:
        """``step``: the number of optimiser steps including this one."""
        self.window[(step - 1) % self.every] = loss.detach()

    def due(self, step: int) -> bool:
        return self.enabled and step % self.every == 0

    def check_weights(self, net: torch.nn.Module, step: int, epoch: int) -> None:
        """Raise TrainingDiverged if a weight or buffer of ``net`` is not finite (one sync)."""
        bad = nonfinite_tensors(net.state_dict())
        if not bad:
            return
        raise TrainingDiverged(
            f"non-finite weights after step {step} (epoch {epoch + 1}): {describe_names(bad)}; "
            f"the losses checked were finite, an update or the running statistics were not"
            + self._kept() + ". Lower optim.lr or the weight decay, or set trainer.grad_clip.")

    def check_outputs(self, res: Dict[str, float], step: int, epoch: int) -> None:
        """Raise TrainingDiverged if a loss of evaluation result ``res`` (``<split>/loss``) is
        not finite: the net's outputs overflow although its weights are finite."""
        bad = {k: v for k, v in res.items() if k.endswith("/loss") and not math.isfinite(v)}
        if not bad:
            return
        raise TrainingDiverged(
            f"non-finite evaluation loss after step {step} (epoch {epoch + 1}): "
            + ", ".join(f"{k}={v}" for k, v in bad.items())
            + "; the weights are finite, the net's outputs overflow" + self._kept()
            + ". Lower optim.lr or the weight decay, or set trainer.grad_clip.")

    def _kept(self) -> str:
        return (f". The last good checkpoint ({self.checkpoint}) is kept" if self.checkpoint.is_file()
                else ". No checkpoint was written before it")

    def check(self, step: int, epoch: int, names: List[str], acc: Optional[torch.Tensor],
              partial: bool = False) -> None:
        """Raise TrainingDiverged if a recorded loss is not finite. ``partial``: only the
        losses recorded since the last full window (the end of an epoch). With several ranks,
        the losses of every rank (each rank calls it at the same step): all stop together, at
        the first bad step of any, and ``acc``'s sums are those of every rank."""
        n = ((step - 1) % self.every + 1 if step else 0) if partial else self.every
        window = self.window[:n]
        finite = torch.isfinite(window)
        if ranks()[1] > 1:  # one collective: how many ranks saw each step's loss bad, the sums
            k = len(window)
            both = sum_over_ranks(torch.cat([(~finite).to(torch.float64),
                                             *([acc] if acc is not None else [])]))
            finite, acc = both[:k] == 0, (both[k:] if acc is not None else None)
        if bool(finite.all()):
            return
        first = int((~finite).nonzero()[0, 0])
        bad_step = step - (len(window) - first) + 1
        vals = acc.tolist() if acc is not None else [0.0]
        parts: Dict[str, float] = {k: v / max(vals[0], 1.0) for k, v in zip(names, vals[1:])}
        bad = [k for k, v in parts.items() if v != v or v in (float("inf"), float("-inf"))]
        raise TrainingDiverged(
            f"non-finite loss at step {bad_step} (epoch {epoch + 1}); non-finite parts: "
            f"{', '.join(bad) or 'loss'}; epoch means so far: "
            + ", ".join(f"{k}={v:.4g}" for k, v in parts.items())
            + self._kept()
            + ". Lower optim.lr, set trainer.grad_clip, or trainer.on_nonfinite=skip to skip such "
              "steps.")


class StopRequest:
    """Set by a signal handler; the loop checkpoints and stops at the next batch boundary."""

    def __init__(self):
        self.signal: Optional[int] = None

    def request(self, signum: int) -> None:
        if self.signal is None:
            self.signal = signum

    @property
    def requested(self) -> bool:
        return self.signal is not None
