"""`finetune train --devices N`: run torchrun in this process and say how its ranks ended.

The ranks themselves are distributed.py's side. Here is the parent that starts them and,
when they stop early, names the one cause in one line: the ranks under this launcher
print no errors themselves (distributed.record_rank_error leaves them in torchrun's error
files, which are read here), because the order in which ranks end is a race.
"""

from __future__ import annotations

import json
import os
import signal
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .distributed import LAUNCHED_ENV, RECORD_KEY, RUN_FOLDER_NOTE_ENV
from .errors import PeerStopped
from .runs import RunFolder

RESUME_HINT = "a run folder with a completed epoch can be continued with finetune train --resume RUN_FOLDER."


@dataclass(frozen=True)
class LaunchOutcome:
    exit_code: int
    message: str | None = None  # for the CLI to print as the one error line
    rank: int | None = None  # the rank the message is about, when only that rank had the problem


@dataclass(frozen=True)
class RankRecord:
    """What a rank left in its torchrun error file about the error it stopped with."""

    rank: int
    exit_code: int
    message: str
    rank_specific: bool = False


def torchrun_args(devices: int, argv: list[str], log_dir: str | None = None) -> list[str]:
    """torchrun's arguments for `finetune train --devices N ...` on this machine."""
    logs = ["--log-dir", log_dir] if log_dir else []
    return ["--standalone", f"--nproc-per-node={devices}", *logs, "-m", "finetune", "train", *argv]


def launch(devices: int, argv: list[str], resume: Path | None = None) -> LaunchOutcome:
    """Run torchrun in this process; returns the exit code and the line to print, if any.

    Calling torchrun's own entry point (rather than a subprocess) lets us turn its
    exceptions, whose tracebacks say nothing useful here, into that outcome.
    """
    import logging

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun_main

    quieten_torchrun_logs(logging)
    failures, signum, agent_error = {}, None, None
    with tempfile.TemporaryDirectory(prefix="finetune-torchrun-") as logs:
        note = Path(logs) / "run-folder"
        os.environ[LAUNCHED_ENV] = str(os.getpid())  # the ranks inherit it (and know their launcher by it)
        os.environ[RUN_FOLDER_NOTE_ENV] = str(note)
        try:
            torchrun_main(torchrun_args(devices, argv, logs))
        except ChildFailedError as e:
            failures = e.failures
        except SignalException as e:  # the agent's handler for SIGINT/SIGTERM; it has already stopped the ranks
            signum = int(e.sigval)
        except KeyboardInterrupt:
            signum = signal.SIGINT
        except Exception as e:  # torchrun's agent failed itself: what the ranks recorded may still say why
            agent_error = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"
        finally:
            os.environ.pop(LAUNCHED_ENV, None)
            os.environ.pop(RUN_FOLDER_NOTE_ENV, None)
        records = read_records(Path(logs))
        run_dir = read_run_folder(note)
    outcome = decide_outcome(records, {rank: f.exitcode for rank, f in failures.items()}, signum)
    if agent_error is not None and outcome.exit_code == 0 and 0 not in records:  # (rank 0 did not finish the run)
        outcome = LaunchOutcome(1, f"torchrun failed while running the ranks ({agent_error}); {RESUME_HINT}")
    resumed = Path(os.path.abspath(resume)) if resume is not None else None  # (as the ranks name it)
    return with_run_folder(outcome, run_dir or resumed, devices, resumed=resumed is not None)


def read_run_folder(note: Path) -> Path | None:
    try:
        return Path(note.read_text())
    except OSError:  # (the ranks stopped before rank 0 made it)
        return None


def with_run_folder(outcome: LaunchOutcome, run_dir: Path | None, devices: int, resumed: bool) -> LaunchOutcome:
    """The general advice (RESUME_HINT) made the run's own: the ranks' ends that wrote nothing of
    their own (killed by a signal, lost peers) leave it. A new run's folder that holds nothing to
    resume from is removed, as a one-process run's is."""
    if not outcome.message or not outcome.message.endswith(RESUME_HINT):
        return outcome
    if run_dir is None:
        return LaunchOutcome(outcome.exit_code, outcome.message[:-len(RESUME_HINT)] + "it stopped before its run folder "
                             "was made; start it again.", outcome.rank)
    folder = RunFolder(run_dir)
    hint = folder.way_on(f" --devices {devices}", may_remove=not resumed, name_model=True)  # (as a one-process run says it)
    return LaunchOutcome(outcome.exit_code, outcome.message[:-len(RESUME_HINT)] + hint, outcome.rank)


def quieten_torchrun_logs(logging) -> None:
    """The agent's log lines would only repeat, as tracebacks, what the one error line says.

    torchrun's modules each set their own logger's level, so the parent's level is not enough.
    """
    for name, logger in list(logging.Logger.manager.loggerDict.items()):
        if name.startswith("torch.distributed") and isinstance(logger, logging.Logger):
            logger.setLevel(logging.CRITICAL)
    logging.getLogger("torch.distributed").setLevel(logging.CRITICAL)


def read_records(logs: Path) -> dict[int, RankRecord]:
    records = {}
    for path in logs.rglob("error.json"):
        try:
            ours = json.loads(path.read_text())[RECORD_KEY]
            record = RankRecord(int(ours["rank"]), int(ours["exit_code"]), str(ours["message"]), bool(ours.get("rank_specific")))
        except (OSError, ValueError, KeyError, TypeError):  # not one of ours (torchrun's own, say)
            continue
        records[record.rank] = record
    return records


def decide_outcome(records: dict[int, RankRecord], exit_codes: dict[int, int], signum: int | None) -> LaunchOutcome:
    """The one cause of the run's end, from what the ranks recorded and how they exited.

    When one rank fails, the others follow: their collectives break (PeerStopped) or
    torchrun stops them with SIGTERM. So an error of a rank's own comes first (the lowest
    rank's, when several had it: rank 0 knows where the model is), then how the launcher
    itself was stopped, then a rank's death by a signal, then a lost peer.
    """
    if 0 in records and records[0].exit_code == 0:  # rank 0 finished the run (a late Ctrl-C did not stop it)
        return LaunchOutcome(0)
    own = [r for r in records.values() if r.exit_code not in (0, PeerStopped.exit_code)]
    if own:
        first = min(own, key=lambda r: r.rank)
        return LaunchOutcome(first.exit_code, first.message, first.rank if first.rank_specific else None)
    if signum is not None:
        what = "training interrupted" if signum == signal.SIGINT else f"training was stopped by {signal_name(signum)}"
        return LaunchOutcome(130 if signum == signal.SIGINT else 128 + signum, f"{what}; {RESUME_HINT}")
    unexplained = {rank: code for rank, code in exit_codes.items() if code != 0 and code != PeerStopped.exit_code}
    if unexplained:
        rank, code = min(unexplained.items(), key=lambda item: (death_order(item[1]), item[0]))
        if code > 0:  # an exit of its own, which it may have printed why (a traceback) or not
            return LaunchOutcome(code, f"rank {rank} stopped with exit code {code} (its output above may say why), so "
                                       f"every rank was stopped; {RESUME_HINT}")
        why = " (the system may have run out of memory)" if -code == signal.SIGKILL else ""
        return LaunchOutcome(128 - code, f"rank {rank} was killed by {signal_name(-code)}{why}, so every rank was stopped; {RESUME_HINT}")
    lost = [r for r in records.values() if r.exit_code == PeerStopped.exit_code]
    if lost:  # every rank only lost the others
        first = min(lost, key=lambda r: r.rank)
        return LaunchOutcome(1, f"{first.message}; {RESUME_HINT}")
    if exit_codes:
        return LaunchOutcome(1, f"the ranks of this run lost contact with each other; {RESUME_HINT}")
    return LaunchOutcome(0)


def death_order(code: int) -> int:
    """A kill by a signal other than SIGTERM first (SIGTERM is how torchrun stops the bystanders), then exit codes."""
    if code < 0:
        return 2 if -code == signal.SIGTERM else 0
    return 1


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


