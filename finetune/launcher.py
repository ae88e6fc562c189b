"""`finetune train --devices N`: run torchrun in this process and say how its ranks ended.

The ranks themselves are distributed.py's side; here is the parent that starts them,
turns torchrun's exceptions into an exit code, and names the cause when no rank did.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass

from .distributed import RECORD_KEY
from .errors import PeerStopped, UsageError


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


def recorded_exit_code(failure) -> int | None:
    data = getattr(failure, "error_file_data", None)
    return data.get(RECORD_KEY) if isinstance(data, dict) else None


def recorded_message(failure) -> str:
    try:
        return str(failure.error_file_data["message"]["message"])
    except (AttributeError, KeyError, TypeError):
        return ""


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


