"""How the library reports progress without printing: the caller passes a Reporter."""

from __future__ import annotations


class Reporter:
    """Receives progress events. This base class ignores them (library use, --quiet)."""

    def start(self, description: str, total: int | None) -> None:
        """A new stage with `total` steps (None: unknown)."""

    def advance(self, steps: int = 1, **fields: float | str) -> None:
        """`steps` more done; `fields` are live figures such as loss or images/s."""

    def finish(self) -> None:
        """The current stage is done."""

    def epoch(self, record) -> None:
        """One finished epoch's metrics: an EpochRecord (`record.to_csv_row()` is its row of metrics.csv)."""

    def info(self, message: str) -> None:
        """Something the user may want to know (which model, which device, what was skipped)."""

    def warn(self, message: str) -> None:
        """Something that went wrong but did not stop the work."""


def reporter_or_quiet(reporter) -> Reporter:
    """The caller's reporter (a Reporter, or any object with its methods), or one that ignores
    everything; anything else is a UsageError now rather than an AttributeError mid-run."""
    if reporter is None:
        return Reporter()
    wanted = [name for name in vars(Reporter) if not name.startswith("_")]
    lacking = [name for name in wanted if not callable(getattr(reporter, name, None))]
    if lacking:
        from .errors import UsageError

        raise UsageError(f"reporter: give a finetune.Reporter (a subclass, overriding what it wants to hear); got "
                         f"{type(reporter).__name__}, which has no {', '.join(lacking)}.")
    return reporter
