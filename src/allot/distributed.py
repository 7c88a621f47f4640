"""Data-parallel profiling: the one place where allot meets `torch.distributed`.

Under `torchrun` (which sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT) every
process runs the same command on the same model and data. Each sweep over the calibration batches
gives batch i (counted from 0 in the order the data yield them) to rank i % world, so the split is
deterministic and a rank may hold no batch at all (more ranks than batches is allowed: its sums
are zeros). Every quantity of the profile is a sum over batches weighted by their sample counts,
divided by N at the end (`allot.profile.hvp`); the sums and N are all-reduced before that division,
so every rank holds the same profile, then scores the same candidates and chooses the same plan.
Random probes are seeded identically on every rank. Only rank 0 writes (artifacts, reports, cache
entries) and shows progress; the other ranks compute and exit 0.

Without a process group (a plain `allot` or Python call) everything here is the identity:
`shard` yields every batch and the reductions return their inputs.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from allot.exceptions import ConfigError

T = TypeVar("T")


def start(device: torch.device) -> torch.device:
    """Join the process group `torchrun` describes in the environment, when WORLD_SIZE is set
    and the group is not started yet (gloo on CPU, nccl on CUDA); returns the device this rank
    computes on: `cuda:LOCAL_RANK` for a CUDA device without an index, else `device`."""
    if "WORLD_SIZE" not in os.environ:
        return device
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(
            f"--device {device}: under torchrun allot runs on cpu (gloo) or cuda (nccl)"
        )
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_available():
        raise ConfigError("this torch has no torch.distributed; run allot without torchrun")
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def stop() -> None:
    """Leave the process group, if one was started."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def active() -> bool:
    """Whether this process is one of several in a started process group."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if active() else 0


def world() -> int:
    """The number of processes (1 without a process group)."""
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Whether this process writes outputs and shows progress: rank 0, or the only process."""
    return rank() == 0


def shard(items: Iterable[T]) -> Iterator[T]:
    """This rank's share of `items`: the i-th item (from 0) when i % world == rank."""
    r, w = rank(), world()
    for i, item in enumerate(items):
        if i % w == r:
            yield item


def shard_size(count: int | None) -> int | None:
    """How many of `count` items `shard` yields on this rank (None stays None)."""
    if count is None:
        return None
    return len(range(rank(), count, world()))


def sum_over_ranks(tensors: Sequence[Tensor], numbers: Sequence[float] = ()) -> list[float]:
    """All-reduce `tensors` in place to their sums over ranks, and return the sums of `numbers`
    (sample counts, a summed loss; reduced in float64). Tensors travel in one buffer per dtype
    and device; with nccl they must be on this rank's CUDA device."""
    if not active():
        return [float(x) for x in numbers]
    scalars = torch.tensor(list(numbers), dtype=torch.float64, device=_reduction_device())
    groups: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
    for tensor in [*tensors, scalars]:
        groups.setdefault((tensor.dtype, tensor.device), []).append(tensor)
    for group in groups.values():
        flat = torch.cat([t.reshape(-1) for t in group])
        dist.all_reduce(flat)
        offset = 0
        for tensor in group:
            tensor.copy_(flat[offset : offset + tensor.numel()].view_as(tensor))
            offset += tensor.numel()
    return scalars.tolist()


def agree(flag: bool) -> bool:
    """True when `flag` is true on every rank (a cache hit, say), so that all ranks take the same
    branch; `flag` itself without a process group."""
    return sum_over_ranks([], [float(bool(flag))])[0] == world()


def _reduction_device() -> torch.device:
    """Where scalars are reduced: this rank's CUDA device under nccl, the CPU under gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
