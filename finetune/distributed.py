"""Multi-process training with PyTorch's own engine: torchrun starts the processes,
DistributedDataParallel syncs gradients. Without torchrun everything here is a no-op."""

from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from .errors import FinetuneError, PeerStopped, UsageError


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


def recorded_exit_code(failure) -> int | None:
    data = getattr(failure, "error_file_data", None)
    return data.get(RECORD_KEY) if isinstance(data, dict) else None


def recorded_message(failure) -> str:
    try:
        return str(failure.error_file_data["message"]["message"])
    except (AttributeError, KeyError, TypeError):
        return ""


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


@dataclass(frozen=True)
class LaunchOutcome:
    exit_code: int
    message: str | None = None  # for the CLI to print: set only when no rank said why it stopped


def launch(devices: int, argv: list[str]) -> LaunchOutcome:
    """Run torchrun in this process and say how the ranks ended.

    Calling torchrun's own entry point (rather than a subprocess) lets us turn its
    exceptions, whose tracebacks say nothing the ranks have not already said, into an
    exit code: the failed rank's own (2 for usage errors, 130 for Ctrl-C, 1 otherwise),
    or 128 + signal number when a rank or this launcher was killed by a signal.
    """
    import logging

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun_main

    quieten_torchrun_logs(logging)
    try:
        torchrun_main(torchrun_args(devices, argv))
    except ChildFailedError as e:
        return outcome_of_failures(e.failures)
    except SignalException as e:  # the agent's handler for SIGINT/SIGTERM; it has already stopped the ranks
        return outcome_of_signal(int(e.sigval))
    except KeyboardInterrupt:
        return LaunchOutcome(130)
    return LaunchOutcome(0)


def quieten_torchrun_logs(logging) -> None:
    """The ranks print their own one-line errors; the agent's log lines would only repeat them.

    torchrun's modules each set their own logger's level, so the parent's level is not enough.
    """
    for name, logger in list(logging.Logger.manager.loggerDict.items()):
        if name.startswith("torch.distributed") and isinstance(logger, logging.Logger):
            logger.setLevel(logging.CRITICAL)
    logging.getLogger("torch.distributed").setLevel(logging.CRITICAL)


RESUME_HINT = "the run folder keeps its last completed epoch: finetune train --resume RUN_FOLDER continues it."


def outcome_of_signal(signum: int) -> LaunchOutcome:
    if signum == signal.SIGINT:  # Ctrl-C reached every rank too; rank 0 has said where the model is
        return LaunchOutcome(130)
    return LaunchOutcome(128 + signum, f"training was stopped by {signal_name(signum)}; {RESUME_HINT}")


def cause_rank(failures: dict) -> tuple[int, int]:
    """(rank, exit code) of the rank whose end ended the run.

    When one rank fails, the others follow: their collectives break (they exit with
    PeerStopped's code) or torchrun's agent stops them with SIGTERM. So a rank that recorded
    an error of ours comes first, then other exit codes, a death by a signal other than
    SIGTERM, SIGTERM, and last PeerStopped.
    """
    def precedence(item):
        rank, failure = item
        code = exit_code(failure)
        if code == PeerStopped.exit_code:
            kind = 4
        elif recorded_exit_code(failure) is not None:
            kind = 0  # failed with an error of ours, which it printed
        elif code > 0:
            kind = 1  # e.g. a Python traceback
        else:
            kind = 3 if -code == signal.SIGTERM else 2
        return kind, failure.timestamp, rank

    rank, failure = min(failures.items(), key=precedence)
    return rank, exit_code(failure)


def exit_code(failure) -> int:
    """The code the rank meant to exit with (it may have been killed while exiting)."""
    recorded = recorded_exit_code(failure)
    return recorded if recorded is not None else failure.exitcode


def outcome_of_failures(failures: dict) -> LaunchOutcome:
    if not failures:
        return LaunchOutcome(1)
    rank, code = cause_rank(failures)
    if code == PeerStopped.exit_code:  # no rank said why, only that they lost each other (and maybe how)
        how = recorded_message(failures[rank]).split(": ", 1)[-1]
        return LaunchOutcome(1, f"{how or 'the ranks of this run lost contact with each other'}; {RESUME_HINT}")
    if code > 0:  # that rank printed its own error
        return LaunchOutcome(code)
    why = " (the system may have run out of memory)" if -code == signal.SIGKILL else ""
    return LaunchOutcome(128 - code, f"rank {rank} was killed by {signal_name(-code)}{why}, so every rank was stopped; {RESUME_HINT}")


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


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


