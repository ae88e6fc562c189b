"""Where a run keeps its feature table: in memory when it fits the budget, else in a file read
block by block, so that memory stays bounded at any number of images.

The file is anonymous (removed as soon as it is made, so it vanishes with the process even
after a crash) and read with plain reads, not mapped: pages read go to the OS file cache,
not to this process's resident memory.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import UsageError

BLOCK_BYTES = 64 * 2**20  # what a block read brings into memory at once


@dataclass
class DiskRows:
    """A [n, views, dim] fp16 table in a file; `views` and `cols` select what reads return."""

    file: object  # an open binary file (tempfile.TemporaryFile)
    n: int
    full_views: int
    full_dim: int
    views: int
    cols: slice
    folder: Path  # where the file is (it has no name): what a failing write names

    @classmethod
    def create(cls, n: int, views: int, dim: int, folder: Path) -> "DiskRows":
        """In `folder`, or the nearest folder above it that exists (the same disk: the file has no
        name, it goes when closed, so no folder is made for it: a run without the cache, `--no-cache`,
        left an empty one), else (not writable) in the system's temporary folder."""
        where = next(p for p in (folder, *folder.parents) if p.is_dir())
        try:
            f = tempfile.TemporaryFile(dir=where)
        except OSError:
            try:
                f, where = tempfile.TemporaryFile(), Path(tempfile.gettempdir())
            except OSError as e:
                raise UsageError(f"{folder}: cannot write the feature table there ({e.strerror}); pass a writable "
                                 "--cache-dir, or a larger --feature-memory-gb to keep it in memory.") from None
        # (Sparse: not posix_fallocate, which where the file system lacks it writes every block first.)
        f.truncate(n * views * dim * 2)
        return cls(f, n, views, dim, views, slice(0, dim), where)

    @contextlib.contextmanager
    def writing(self):
        """A write that fails (a full disk) said in one line naming the folder, with the fixes."""
        try:
            yield
        except OSError as e:
            size = self.n * self.full_views * self.full_dim * 2
            raise UsageError(f"{self.folder}: cannot write the feature table there ({e.strerror}; {size / 1e9:.2f} GB); "
                             "free space there, pass another --cache-dir, or a larger --feature-memory-gb to keep it "
                             "in memory.") from None

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.n, self.views, self.cols.stop - self.cols.start)

    def row_bytes(self) -> int:
        return self.full_views * self.full_dim * 2

    def narrow(self, views: int, cols: slice) -> "DiskRows":
        """The first `views` views and the columns `cols` (start/stop within the full rows)."""
        start = 0 if cols.start is None else cols.start
        stop = self.full_dim if cols.stop is None else cols.stop
        return DiskRows(self.file, self.n, self.full_views, self.full_dim, views, slice(start, stop), self.folder)

    def write(self, i: int, rows: torch.Tensor, view: int = 0) -> None:
        """Item i's rows [views, full_dim] from `view` on (all of them: its full row)."""
        data = rows.to(torch.float16).contiguous().numpy().tobytes()
        with self.writing():
            os.pwrite(self.file.fileno(), data, i * self.row_bytes() + view * self.full_dim * 2)

    def block(self, start: int, stop: int) -> torch.Tensor:
        """Items start..stop, as selected, fp16 [stop - start, views, dim] in memory."""
        count = (stop - start) * self.full_views * self.full_dim
        raw = os.pread(self.file.fileno(), count * 2, start * self.row_bytes())
        table = torch.from_numpy(np.frombuffer(raw, dtype=np.float16).copy()).view(stop - start, self.full_views, self.full_dim)
        return table[:, :self.views, self.cols]

    def block_items(self) -> int:
        return max(1, BLOCK_BYTES // self.row_bytes())

    def blocks(self):
        """(start, stop) of consecutive blocks covering every item."""
        step = self.block_items()
        return [(s, min(s + step, self.n)) for s in range(0, self.n, step)]

    def keep(self, positions: list[int]) -> "DiskRows":
        """Only the items at `positions` (ascending), moved to the front in order."""
        with self.writing():
            for new, old in enumerate(positions):
                if new != old:
                    os.pwrite(self.file.fileno(), os.pread(self.file.fileno(), self.row_bytes(), old * self.row_bytes()),
                              new * self.row_bytes())
        return DiskRows(self.file, len(positions), self.full_views, self.full_dim, self.views, self.cols, self.folder)


Rows = torch.Tensor | DiskRows


def new_rows(n: int, views: int, dim: int, on_disk: bool, folder: Path) -> Rows:
    """A table for n items of [views, dim] fp16: a tensor, or a file in `folder`."""
    return DiskRows.create(n, views, dim, folder) if on_disk else torch.empty(n, views, dim, dtype=torch.float16)


def put(rows: Rows, i: int, value: torch.Tensor) -> None:
    if isinstance(rows, DiskRows):
        rows.write(i, value)
    else:
        rows[i] = value


def put_view(rows: Rows, i: int, view: int, value: torch.Tensor) -> None:
    """Item i's row of one view [dim]."""
    if isinstance(rows, DiskRows):
        rows.write(i, value[None], view)
    else:
        rows[i, view] = value


def keep(rows: Rows, positions: list[int]) -> Rows:
    if isinstance(rows, DiskRows):
        return rows.keep(positions)
    return rows if len(positions) == len(rows) else rows[positions]


def narrow(rows: Rows, views: int | None, cols: slice) -> Rows:
    """The first `views` views (None: the table has no view axis) and columns `cols`."""
    if isinstance(rows, DiskRows):
        return rows.narrow(views if views is not None else rows.views, cols)
    return rows[:, :views, cols] if views is not None else rows[:, cols]


def column_statistics(rows: DiskRows) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and (sample, n - 1) variance of each column over every item and view, read block by block."""
    dim = rows.shape[-1]
    total, sq, count = torch.zeros(dim, dtype=torch.float64), torch.zeros(dim, dtype=torch.float64), 0
    for start, stop in rows.blocks():
        x = rows.block(start, stop).reshape(-1, dim).double()
        total += x.sum(0)
        sq += (x * x).sum(0)
        count += len(x)
    mean = total / count
    var = (sq - count * mean * mean) / max(1, count - 1)
    return mean.float(), var.clamp_min(0).float()


def plain_sample(rows: Rows, limit: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The plain view (view 0) of at most `limit` items, a seeded sample in item order:
    (fp16 [m, dim], their positions)."""
    n = rows.n if isinstance(rows, DiskRows) else len(rows)
    positions = torch.arange(n) if n <= limit else torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:limit].sort().values
    if isinstance(rows, DiskRows):
        return torch.stack([rows.block(i, i + 1)[0, 0] for i in positions.tolist()]) if n else torch.empty(0, rows.shape[-1]), positions
    picked = rows[positions]
    return (picked[:, 0] if picked.dim() == 3 else picked), positions


def norm_statistics(train: Rows) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of each feature over all training rows (views included). The variance has
    a floor of 1% of the average one: a feature (nearly) constant on few training images must
    not blow up on others."""
    if isinstance(train, DiskRows):
        mean, var = column_statistics(train)
    else:
        flat = train.reshape(-1, train.shape[-1]).float()
        mean, var = flat.mean(0), flat.var(0)
    return mean, (var + 0.01 * var.mean() + 1e-12).sqrt()  # (the 1e-12: features all constant)
