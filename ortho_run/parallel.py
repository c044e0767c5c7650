"""What the ranks of a data-parallel run (torchrun, SLURM) do together, for every part that
needs it; in one process each is the value at hand, with no collective.

A rank takes no decision alone that the others must follow (a non-finite loss, a skipped
step, a stop request, a cache entry to train): it is agreed here. An evaluation split is read
in shards, rank r the images r, r + world, ... (``datasets.loaders``); what is computed from
every image (embeddings for retrieval, geometry, compatibility) is put back together here in
the split's order, so that it is what one process computes.
"""

from __future__ import annotations

from typing import Any, Tuple

import torch
from torch import Tensor


def ranks() -> Tuple[int, int]:
    """(rank, world size) of the process group this process is in, (0, 1) without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    return ranks()[0] == 0


def sum_over_ranks(t: Tensor) -> Tensor:
    """``t`` summed over the ranks (a new tensor; ``t`` is left as it is)."""
    if ranks()[1] <= 1:
        return t
    import torch.distributed as dist

    out = t.detach().clone()
    dist.all_reduce(out)
    return out


def max_over_ranks(value: Any, device: torch.device) -> float:
    """The largest of every rank's ``value`` (a number, a bool or a one-element tensor).
    Every rank calls it at the same point of the run, so that all take the same branch."""
    if ranks()[1] <= 1:
        return float(value)
    import torch.distributed as dist

    t = torch.as_tensor(value, device=device).detach().reshape(1).to(torch.float64).clone()
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def any_rank(flag: Any, device: torch.device) -> bool:
    """Whether ``flag`` (a bool or a one-element tensor) holds on any rank (as
    ``max_over_ranks``, a point every rank reaches)."""
    return max_over_ranks(flag, device) > 0


def broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (a picklable value)."""
    if ranks()[1] <= 1:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Every rank's buffers of ``module`` (BatchNorm's running statistics) set to rank 0's: the
    net a checkpoint holds. Each rank's last training step updates its own, from its own batch
    (DDP sets them to rank 0's at the start of each training step only)."""
    if ranks()[1] <= 1:
        return
    import torch.distributed as dist

    for b in module.buffers():
        dist.broadcast(b, src=0)


def barrier() -> None:
    if ranks()[1] > 1:
        import torch.distributed as dist

        dist.barrier()


def gather_split(t: Tensor, n: int) -> Tensor:
    """The rows of a whole evaluation split of ``n`` items from each rank's ``t``, computed
    from its shard (rank r holds items r, r + world, ...), in the split's order."""
    rank, world = ranks()
    if world <= 1:
        return t
    import torch.distributed as dist

    per = -(-n // world)  # the longest shard; a shorter one is padded to it
    if len(t) != len(range(rank, n, world)):
        raise RuntimeError(f"rank {rank} holds {len(t)} rows of a split of {n} items over "
                           f"{world} ranks; its shard has {len(range(rank, n, world))}")
    padded = torch.cat([t, t.new_zeros((per - len(t), *t.shape[1:]))])
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous())
    # row j of rank r is item r + j·world: interleaved, the padding falls at the end
    return torch.stack(parts, 1).flatten(0, 1)[:n]
