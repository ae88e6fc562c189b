"""Multi-process training with PyTorch's own engine, as seen from inside one rank: torchrun
starts the processes, DistributedDataParallel syncs gradients. Without torchrun everything
here is a no-op. (launcher.py is the other side: the process that runs torchrun.)"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from .errors import FinetuneError, UsageError
from .files import atomic_write_text


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    # Joined a process group: under torchrun, even with one process, so that `--devices 1`
    # runs the same code (DDP, collectives, NCCL) as several GPUs do.
    active: bool = False
    one_machine: bool = True  # all ranks on this machine (what `train --devices N` starts)

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

    def gather_in_order(self, indices: list[int], rows: torch.Tensor) -> tuple[list[int], torch.Tensor]:
        """Every rank's rows (rows[k] belongs to indices[k]), on every rank, sorted by index."""
        parts = self.all_gather((indices, rows))
        all_indices = [i for part in parts for i in part[0]]
        order = sorted(range(len(all_indices)), key=all_indices.__getitem__)
        return [all_indices[j] for j in order], torch.cat([part[1] for part in parts])[order]

    def any_of(self, *flags: bool) -> list[bool]:
        """For each flag: whether it is set on any rank (one small all-reduce)."""
        return [v > 0 for v in self._all_reduce([float(f) for f in flags], dist.ReduceOp.MAX)] if self.active else list(flags)

    def sum(self, *values: float) -> list[float]:
        return self._all_reduce(list(values), dist.ReduceOp.SUM) if self.active else list(values)

    @staticmethod
    def _all_reduce(values: list[float], op) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64)
        if dist.get_backend() == "nccl":  # NCCL reduces GPU tensors only
            t = t.cuda()
        dist.all_reduce(t, op=op)
        return t.cpu().tolist()


SINGLE = Dist()


def from_environment(device_name: str) -> tuple[Dist, str]:
    """Join the process group torchrun set up (if any); returns it and the device to use."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    started_by_torchrun = "RANK" in os.environ and (world > 1 or "TORCHELASTIC_RUN_ID" in os.environ)
    if not started_by_torchrun:
        return SINGLE, device_name
    end_with_launcher()
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
    one_machine = int(os.environ.get("LOCAL_WORLD_SIZE", world)) == world
    return Dist(rank, world, active=True, one_machine=one_machine), (f"cuda:{local_rank}" if use_cuda else "cpu")


PR_SET_PDEATHSIG = 1  # prctl(2)


def end_with_launcher() -> None:
    """A rank of `--devices N` stops (SIGTERM) when its launcher dies, even by SIGKILL, which it
    cannot pass on: the ranks trained on to the end otherwise, orphans holding the run's lock.
    (Linux only; the launcher set LAUNCHED_ENV to its process id.)"""
    launcher = os.environ.get(LAUNCHED_ENV, "")
    if not launcher.isdigit() or not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != int(launcher):  # it died before the request was made
        os.kill(os.getpid(), signal.SIGTERM)


def shutdown(d: Dist) -> None:
    if d.active and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # a peer that died first can break the teardown too; its own error is what matters
            pass


# What a rank's collective raises when a peer has gone (crashed, killed, interrupted). Only
# lost connections: an error of the rank's own (NCCL set-up, say) must not pass for one.
LOST_PEER_MARKS = ("connection closed by peer", "connection reset by peer", "broken pipe", "remote process exited")


def is_lost_peer(error: BaseException) -> bool:
    if isinstance(error, FinetuneError):
        return False
    if isinstance(error, dist.DistNetworkError):
        return True
    return isinstance(error, RuntimeError) and any(mark in str(error).lower() for mark in LOST_PEER_MARKS)


# `finetune train --devices N` sets this for its ranks: the launcher prints their errors, once.
LAUNCHED_ENV = "FINETUNE_LAUNCHED"
RECORD_KEY = "finetune"
# Where rank 0 writes its run folder's path for `--devices`'s launcher: ranks stopped by a signal
# (the launcher's SIGTERM, passed on) write nothing more, and the launcher still names the folder.
RUN_FOLDER_NOTE_ENV = "FINETUNE_RUN_FOLDER_NOTE"


def tell_launcher_run_folder(d: Dist, run_dir: Path) -> None:
    note = os.environ.get(RUN_FOLDER_NOTE_ENV)
    if note and d.is_main:
        with contextlib.suppress(OSError):  # (the launcher then gives the general advice)
            atomic_write_text(Path(note), str(run_dir))


def told_by_this_rank(error: FinetuneError) -> tuple[bool, str | None]:
    """Whether this torchrun rank prints `error`, and the rank to name with it (None: none).

    Its error is also left where torchrun and `--devices`'s launcher read it; under the
    launcher only the launcher prints (the one cause, whatever order the ranks end in).
    Otherwise rank 0 tells what all ranks hit alike, and a rank tells an error of its own.
    """
    rank = os.environ.get("RANK")
    if record_rank_error(error) and os.environ.get(LAUNCHED_ENV):
        return False, None
    if error.silent:  # a rank stopped by another's failure, which that one reports
        return False, None
    if rank in (None, "0"):
        return True, None
    return error.rank_specific, rank


def record_rank_error(error: FinetuneError) -> bool:
    """Leave this rank's error where torchrun keeps a failed rank's story (TORCHELASTIC_ERROR_FILE).

    torchrun's own report reads the message from there, and `--devices`'s launcher reads our
    part (rank, exit code, message) to name the one cause whatever order the ranks end in.
    Returns whether it was written.
    """
    return record_rank_end(error.exit_code, str(error), error.rank_specific,
                           torchrun_message=f"{type(error).__name__}: {error}")


def record_rank_end(exit_code: int, message: str, rank_specific: bool = False, torchrun_message: str = "") -> bool:
    """How this rank ended, for the launcher (also a success: torchrun itself reads the file only on failure)."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return False
    record = {"message": {"message": torchrun_message or message,
                          "extraInfo": {"py_callstack": "", "timestamp": str(int(time.time()))}},
              RECORD_KEY: {"rank": int(os.environ.get("RANK", "0")), "exit_code": exit_code, "message": message,
                           "rank_specific": rank_specific}}
    try:  # whole or not at all: torchrun stops the other ranks (SIGTERM) as soon as one fails, and its
        # agent read a file cut short by that as JSON, and failed with a traceback of its own
        atomic_write_text(Path(path), json.dumps(record))
        return True
    except OSError:
        return False


class DeferredInterrupt:
    """Ctrl-C as a flag: set by the first SIGINT, checked by all ranks together at a step's start."""

    def __init__(self) -> None:
        self.requested = False


@contextlib.contextmanager
def interrupts_deferred(d: Dist):
    """Under torchrun, a rank must not stop in the middle of a step: its peers would wait in
    that step's all-reduce (with NCCL, a rank waiting on the GPU cannot even take the signal).
    So the first SIGINT only sets a flag that every rank checks at the same step; a second
    one interrupts at once. Outside torchrun Ctrl-C is left alone."""
    flag = DeferredInterrupt()
    if not d.active:
        yield flag
        return

    def on_sigint(signum, frame):
        if flag.requested:
            raise KeyboardInterrupt
        flag.requested = True

    with signals_to(on_sigint, signal.SIGINT):
        yield flag


@contextlib.contextmanager
def signals_to(handler, *signums: int):
    """These signals go to `handler` within the block. Only the main thread may set handlers;
    elsewhere nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.signal(signum, handler) for signum in signums}
    try:
        yield
    finally:
        for signum, before in previous.items():
            signal.signal(signum, before)


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
