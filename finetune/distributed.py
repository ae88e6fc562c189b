"""Multi-process training with PyTorch's own engine: torchrun starts the processes,
DistributedDataParallel syncs gradients. Without torchrun everything here is a no-op."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from .errors import FinetuneError, UsageError


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1

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


SINGLE = Dist()


def from_environment(device_name: str) -> tuple[Dist, str]:
    """Join the process group torchrun set up (if any); returns it and the device to use."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return SINGLE, device_name
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device_name not in ("auto", "cuda", "cpu"):
        raise UsageError(f"--device {device_name}: distributed training runs on CUDA GPUs (one per process: --device cuda) or on the CPU (--device cpu).")
    use_cuda = device_name in ("auto", "cuda") and torch.cuda.is_available()
    if device_name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA GPU is available here; use --device cpu (gloo backend).")
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise UsageError(f"{os.environ.get('LOCAL_WORLD_SIZE', local_rank + 1)} processes on this machine but only "
                             f"{torch.cuda.device_count()} GPU(s): use --devices {torch.cuda.device_count()} (or --nproc-per-node).")
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(minutes=30))
    return Dist(rank, world), (f"cuda:{local_rank}" if use_cuda else "cpu")


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


def torchrun_args(devices: int, argv: list[str]) -> list[str]:
    """torchrun's arguments for `finetune train --devices N ...` on this machine."""
    if devices < 1:
        raise UsageError(f"--devices must be at least 1 (got {devices}).")
    return ["--standalone", f"--nproc-per-node={devices}", "-m", "finetune", "train", *argv]


def launch(devices: int, argv: list[str]) -> int:
    """Run torchrun in this process; returns the exit code of the first failed rank (0 if none).

    Calling torchrun's own entry point (rather than a subprocess) lets us turn its
    ChildFailedError, whose traceback says nothing the ranks have not already said, into
    the rank's exit code: 2 for usage errors, 130 for Ctrl-C, 1 otherwise.
    """
    import logging

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun_main

    # The ranks print their own one-line errors; the agent's log lines would only repeat them.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        torchrun_main(torchrun_args(devices, argv))
    except ChildFailedError as e:
        first = min(e.failures.items())[1] if e.failures else None
        return first.exitcode if first is not None and first.exitcode > 0 else 1
    except KeyboardInterrupt:
        return 130
    return 0


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


