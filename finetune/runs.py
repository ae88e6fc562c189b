"""Run folders: where they are made, the newest one, and the files a training run writes there."""

from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import replace
from pathlib import Path

from .checkpoint import save_model
from .config import MODEL_FILENAME, RESULTS_FILENAME, TrainConfig
from .errors import FinetuneError, UsageError
from .files import write_csv, write_json
from .records import EpochRecord, TrainResult
from .resume import STATE_FILENAME, ResumeState
from .tracking import BestEpoch


SUSPECT_COLUMNS = ["path", "given", "suggested", "probability", "why"]  # suspects.csv (run_report.training_suspects' rows)


def create_run_dir(runs_dir: Path, name: str | None) -> Path:
    """runs/<name>, runs/<name>2, ... : a new folder each time, never an earlier run's."""
    base = name or "train"
    if Path(base).name != base or base in (".", "..") or not base.strip():
        raise UsageError(f"--name '{base}': a run name is one folder name (no '/', '..' or absolute path); use --runs-dir to choose where runs go.")
    if runs_dir.exists() and not runs_dir.is_dir():
        raise UsageError(f"--runs-dir {runs_dir}: a file, not a folder. Pass a folder (it is made if missing).")
    if runs_dir.is_symlink() and not runs_dir.exists():  # (mkdir said "File exists")
        raise UsageError(f"--runs-dir {runs_dir}: a link to {os.readlink(runs_dir)}, which does not exist. Make that "
                         "folder, or pass another --runs-dir.")
    try:
        runs_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--runs-dir {runs_dir}: cannot create it ({e.strerror or e}). Pass a writable folder.") from None
    for n in range(1, 100_000):
        candidate = runs_dir / (base if n == 1 else f"{base}{n}")
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue
        except OSError as e:
            raise UsageError(f"--runs-dir {runs_dir}: cannot create a run folder there ({e.strerror or e}). Pass a writable folder.") from None
    raise UsageError(f"{runs_dir}: too many runs named '{base}'; pass another --name.")


def new_run_dir(cfg: TrainConfig) -> Path:
    """A new run folder holding the run's config.json; its path absolute (as spelt, links kept), so
    that results.json's paths hold wherever they are read from."""
    run_dir = Path(os.path.abspath(create_run_dir(cfg.runs_dir, cfg.name)))
    # Absolute paths, so that --resume works from any working directory.
    absolute = replace(cfg, data=cfg.data.resolve(), runs_dir=cfg.runs_dir.resolve(),
                       weights=cfg.weights.resolve() if cfg.weights else None, labels=cfg.labels.resolve() if cfg.labels else None)
    try:
        write_json(run_dir / "config.json", {k: v for k, v in absolute.to_json_dict().items() if k != "resume"})
    except OSError as e:
        with contextlib.suppress(OSError):
            run_dir.rmdir()  # (empty: the config was not written)
        raise cannot_write(e, run_dir) from None
    return run_dir


def being_trained(run_dir: Path) -> bool:
    """Whether a process holds the run's training_lock now (a peek: a shared lock taken and let go)."""
    try:
        import fcntl
    except ImportError:
        return False
    try:
        with open(run_dir / "config.json", "rb") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
    except BlockingIOError:
        return True
    except OSError:
        return False
    return False


@contextlib.contextmanager
def training_lock(run_dir: Path):
    """Held while this process trains the run in `run_dir`: a second process resuming it (a
    run still training, or two resumes at once) is refused rather than writing the same files.
    An OS lock on the run's config.json (never rewritten), gone with the process however it ends;
    where the OS has none (Windows), no lock."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    try:
        f = open(run_dir / "config.json", "rb")
    except OSError:  # (config_for_resume has checked it is there: one that cannot be opened is told elsewhere)
        yield
        return
    with f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # (held: a new run's folder is its own, so this is a resume)
            raise UsageError(f"--resume {run_dir}: another process is training this run now; let it finish, or stop it "
                             f"(Ctrl-C) and resume then.") from None
        except OSError:  # (a file system without locks, as some network ones are: the run goes on unlocked)
            pass
        yield


def refuse_output_inside_input(output: Path, data: Path, named: str = "--runs-dir") -> None:
    """`named`: how the user gave `output` (an option, or an environment variable as NAME=)."""
    out, inp = output.resolve(), data.resolve()
    if out == inp or inp in out.parents:
        given = f"{named}{output}" if named.endswith("=") else f"{named} {output}"
        raise UsageError(f"{given} is inside the data folder {data}; outputs never go into your data. "
                         f"{'Set' if named.endswith('=') else 'Pass'} {named.rstrip('=')} outside it.")


def _writes(method):
    """Under torchrun only rank 0 writes the run folder: on the other ranks this does nothing
    (and returns None), so the training code calls it without asking which rank it is. A file
    that cannot be written (a full disk, a folder made read-only) ends the run in one line."""
    @functools.wraps(method)
    def on_the_writing_rank(self, *args, **kwargs):
        if not self.writes:
            return None
        try:
            return method(self, *args, **kwargs)
        except OSError as e:
            raise cannot_write(e, self.path, self.state_path.is_file()) from None
    return on_the_writing_rank


def cannot_write(error: OSError, run_dir: Path, resumable: bool = False) -> FinetuneError:
    then = (f"then 'finetune train --resume {run_dir}' goes on from its last epoch" if resumable
            else "then start the run again")
    return FinetuneError(f"{error.filename or run_dir}: cannot be written ({error.strerror or error}); make room or make "
                         f"{run_dir} writable, {then}.")


class RunFolder:
    """The files of one training run, each written atomically."""

    def __init__(self, path: Path, writes: bool = True):
        self.path, self.writes = path, writes
        self.model_path = path / MODEL_FILENAME
        self.state_path = path / STATE_FILENAME
        self.saved_epoch: int | None = None  # the epoch whose model is in the model file

    @_writes
    def save_model(self, best: BestEpoch, metadata: dict, extra: dict | None = None, force: bool = False) -> Path | None:
        """The model file of the kept epoch (plus `extra` tensors), written only when that epoch changed
        or when `force`d."""
        if best.state is None:
            return None
        if self.saved_epoch != best.epoch or force:
            save_model(self.model_path, {**best.state, **(extra or {})}, metadata)
            self.saved_epoch = best.epoch
        return self.model_path

    @_writes
    def save_state(self, state: ResumeState, history: list[EpochRecord]) -> None:
        state.save(self.state_path)
        self.write_metrics(history)

    @_writes
    def write_metrics(self, history: list[EpochRecord]) -> None:
        write_csv(self.path / "metrics.csv", [r.to_csv_row() for r in history], list(EpochRecord.CSV_FIELDS))

    @_writes
    def write_skipped(self, skipped: list[dict]) -> None:
        write_csv(self.path / "skipped.csv", skipped, ["path", "reason"])

    @_writes
    def write_plots(self, history: list[EpochRecord], val, classes: list[str]) -> list[Path]:
        """curves.png (loss/accuracy per epoch), and of the kept epoch on val (`val`: a report.Measured):
        confusion_matrix.png and reliability.png."""
        from .metrics import calibration, confusion_matrix
        from .plots import confusion_figure, curves_figure, reliability_figure, save_png

        paths = [save_png(curves_figure(history), self.path / "curves.png")]
        if val is not None and val.labels:
            cm = confusion_matrix(val.labels, val.probs.argmax(1).tolist(), len(classes))
            paths.append(save_png(confusion_figure(cm, classes, "validation, kept epoch"), self.path / "confusion_matrix.png"))
            paths.append(save_png(reliability_figure(calibration(val.probs, val.labels), "validation"), self.path / "reliability.png"))
        return paths

    @_writes
    def write_suspects(self, suspects: list[dict] | None, note: str) -> dict:
        """suspects.csv (path, given, suggested, probability, why), when the run could look for them."""
        if suspects is None:
            return {"count": None, "file": None, "note": note}
        path = self.path / "suspects.csv"
        write_csv(path, suspects, SUSPECT_COLUMNS)
        claimed = sum(1 for s in suspects if s["suggested"])
        return {"count": len(suspects), "another_class": claimed, "unlike_others": len(suspects) - claimed,
                "file": str(path), "note": note}

    @_writes
    def write_report(self, content, max_pixels: int) -> dict:
        """report.html (report.py), from a report.ReportContent."""
        from .report import write_report

        return write_report(self.path / "report.html", content, max_pixels)

    @_writes
    def remove_if_nothing_kept(self) -> bool:
        """Remove the run folder where it holds only what a run writes at its start (no model, no
        state): an interrupted or failed start would otherwise leave one more folder each time.
        Whether it went (a folder that cannot be changed stays, and the error that ended the run is told)."""
        if self.model_path.exists() or self.state_path.exists():
            return False
        try:
            for name in ("config.json", "metrics.csv", "skipped.csv"):
                (self.path / name).unlink(missing_ok=True)
            self.path.rmdir()
        except OSError:  # (something else is in it, or a read-only disk: left as it is)
            return False
        return True

    def way_on(self, devices: str = "", may_remove: bool = True, name_model: bool = False) -> str:
        """How to go on with a stopped run, by what its folder holds: its state (resume), its model
        only (named where `name_model`), or nothing kept (the folder removed where `may_remove`: not
        one given to --resume)."""
        if self.state_path.is_file():
            return f"continue with: finetune train --resume {self.path}{devices}"
        if self.model_path.is_file():  # (stopped while the chosen head's epochs were being recorded)
            where = f"its model is in {self.model_path}; " if name_model else ""
            return f"{where}its training state was not saved yet, so it cannot be resumed; start it again to train further."
        removed = " (its run folder removed)" if may_remove and self.remove_if_nothing_kept() else ""
        return f"it stopped before it kept an epoch to resume from{removed}; start it again to continue."

    @_writes
    def discard_state(self) -> None:
        """No resuming this run (it diverged: resumed, it would again)."""
        self.state_path.unlink(missing_ok=True)

    @_writes
    def finish(self, result: TrainResult) -> None:
        """results.json, then the training state goes: nothing is left to resume."""
        write_json(self.path / RESULTS_FILENAME, result.to_json_dict())  # first: with it, --resume says "finished"
        self.state_path.unlink(missing_ok=True)
        for name in (MODEL_FILENAME, STATE_FILENAME):  # (files.atomic_target's, of a training killed mid-write; not an
            for leftover in self.path.glob(f".{name}.*.tmp"):  # export's, which may be writing beside them now)
                leftover.unlink(missing_ok=True)
