"""Multi-process training with PyTorch's own engine, as seen from inside one rank: torchrun
starts the processes, DistributedDataParallel syncs gradients. Without torchrun everything
here is a no-op. (launcher.py is the other side: the process that runs torchrun.)"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from .errors import FinetuneError, UsageError


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    # Joined a process group: under torchrun, even with one process, so that `--devices 1`
    # runs the same code (DDP, collectives, NCCL) as several GPUs do.
    active: bool = False

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
    if world <= 1 and "TORCHELASTIC_RUN_ID" not in os.environ:  # not started by torchrun
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
    return Dist(rank, world, active=True), (f"cuda:{local_rank}" if use_cuda else "cpu")


def shutdown(d: Dist) -> None:
    if d.active and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # a peer that died first can break the teardown too; its own error is what matters
            pass


# What gloo and NCCL raise in a rank whose peer has gone (crashed, killed, interrupted).
LOST_PEER_MARKS = ("connection closed by peer", "connection reset by peer", "broken pipe", "gloo", "nccl")


def is_lost_peer(error: BaseException) -> bool:
    if isinstance(error, FinetuneError):
        return False
    if isinstance(error, dist.DistError):
        return True
    return isinstance(error, RuntimeError) and any(mark in str(error).lower() for mark in LOST_PEER_MARKS)


RECORD_KEY = "finetune_exit_code"


def record_for_torchrun(error: FinetuneError) -> None:
    """Leave this rank's error in the file torchrun reads about a failed rank, with our exit code.

    When one rank fails, its peers' collectives break and they stop too; torchrun may see
    one of them end first and then kill this rank while it exits. The record still tells
    the launcher which rank failed, and how (the rank prints the message itself).
    """
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    record = {"message": {"message": f"{type(error).__name__}: {error}",
                          "extraInfo": {"py_callstack": "", "timestamp": str(int(time.time()))}},
              RECORD_KEY: error.exit_code}
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(record))
    except OSError:  # only a better report is lost
        pass


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
