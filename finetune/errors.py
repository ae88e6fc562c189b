"""One exception family for everything the library refuses; the CLI turns these into one line + exit code."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path


class FinetuneError(Exception):
    """A problem the user can fix: the message names the file and the fix."""

    exit_code = 1
    # Under torchrun most errors happen alike on every rank and rank 0 tells them; these
    # two say otherwise: one rank's own problem, or a rank stopped by another's failure.
    rank_specific = False
    silent = False


class UsageError(FinetuneError):
    """Bad arguments (the CLI exits 2, as for any usage error)."""

    exit_code = 2


class DataError(FinetuneError):
    """The image folder cannot be used as given."""


class WeightsError(FinetuneError):
    """Pretrained weights cannot be found or do not fit the architecture."""


class ModelFileError(FinetuneError):
    """A model file is missing, truncated, foreign or inconsistent (a bad --model: exit 2)."""

    exit_code = 2


class TrainingInterrupted(FinetuneError):
    """Training stopped early (Ctrl-C); the last good files are still on disk."""

    exit_code = 130


class TrainingDiverged(FinetuneError):
    """The loss stopped being a number (a learning rate far too high): what such an epoch would
    keep is no model. The files of the epochs before it stay on disk."""


class GpuOutOfMemory(FinetuneError):
    """One GPU may run out while the others do not."""

    rank_specific = True


class PeerStopped(FinetuneError):
    """Under torchrun: another rank failed or was stopped, which broke this rank's collective.

    That rank says why (or torchrun's launcher does), so this one exits quietly with a code
    of its own that the launcher can tell apart from the real cause.
    """

    exit_code = 75
    silent = True


@contextmanager
def folder_readable(folder: Path | str):
    """A folder or file under `folder` that may not be read ends in a DataError naming it (train,
    check and evaluate read DATA within this; it was a traceback)."""
    try:
        yield
    except PermissionError as e:
        raise DataError(f"{e.filename or folder}: permission denied; make it readable or pass another folder.") from None
