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

    def epoch(self, row: dict) -> None:
        """One finished epoch's metrics (a row of metrics.csv)."""

    def info(self, message: str) -> None:
        """Something the user may want to know (which model, which device, what was skipped)."""

    def warn(self, message: str) -> None:
        """Something that went wrong but did not stop the work."""
