"""Multi-process training with PyTorch's own engine: torchrun starts the processes,
DistributedDataParallel syncs gradients. Without torchrun everything here is a no-op."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from .errors import FinetuneError, UsageError


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, items: list) -> list:
        """This rank's share: every world-th item. No padding, so nothing is counted twice."""
        return items[self.rank::self.world] if self.active else items

    def broadcast(self, obj):
        """rank 0's object, on every rank."""
        if not self.active:
            return obj
        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_gather(self, obj) -> list:
        if not self.active:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def sum(self, *values: float) -> list[float]:
        if not self.active:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64)
        if dist.get_backend() == "nccl":
            t = t.cuda()
        dist.all_reduce(t)
        return t.cpu().tolist()

    def barrier(self) -> None:
        if self.active:
            dist.barrier()


SINGLE = Dist()


def from_environment(device_name: str) -> tuple[Dist, str]:
    """Join the process group torchrun set up (if any); returns it and the device to use."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return SINGLE, device_name
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_name in ("auto", "cuda") and torch.cuda.is_available()
    if device_name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA GPU is available here; use --device cpu (gloo backend).")
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(minutes=30))
    return Dist(rank, world, local_rank), (f"cuda:{local_rank}" if use_cuda else "cpu")


def shutdown(d: Dist) -> None:
    if d.active and dist.is_initialized():
        dist.destroy_process_group()


def share_outcome(d: Dist, compute):
    """Run `compute` on rank 0 and give every rank its result, or raise its error on every rank.

    Work that must happen once (scanning the folder, creating the run folder) goes through
    here, so that a failure on rank 0 stops all ranks with the same clear message instead
    of leaving them waiting.
    """
    outcome = None
    if d.is_main:
        try:
            outcome = ("ok", compute())
        except FinetuneError as e:
            outcome = ("error", e)
    outcome = d.broadcast(outcome)
    if outcome[0] == "error":
        raise outcome[1]
    return outcome[1]


def torchrun_command(devices: int, argv: list[str]) -> list[str]:
    """`finetune train --devices N ...` runs the same training under torchrun on this machine."""
    if devices < 1:
        raise UsageError(f"--devices must be at least 1 (got {devices}).")
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={devices}",
            "-m", "finetune", "train", *argv]


def strip_devices_option(argv: list[str]) -> list[str]:
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == "--devices":
            skip = True
            continue
        if arg.startswith("--devices="):
            continue
        out.append(arg)
    return out


