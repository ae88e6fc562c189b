"""What DATA holds, as train and check read it: class folders in any of the layouts layout.py
knows (scan.py), or one folder of images labelled by a CSV (labels.py)."""

from __future__ import annotations

import time
from pathlib import Path

from .data import DatasetSplit
from .digests import DigestMemo
from .errors import folder_readable
from .labels import scan_labelled
from .layout import find_layout
from .scan import read_split


def scan_dataset(data: Path, val_split: float | None, seed: int, layout: str = "auto", labels: Path | None = None,
                 label_columns: str | None = None, memo: DigestMemo | None = None) -> DatasetSplit:
    """Read an image folder laid out in any of the ways layout.py knows, or labelled by a CSV (labels.py).
    `memo`: the files' hashes remembered from the last run (digests.py), none by default."""
    since = time.time_ns()
    with folder_readable(data):
        if labels is not None:
            split = scan_labelled(data, labels, label_columns, val_split, seed, memo)
        else:
            split = read_split(data, find_layout(data, layout), val_split, seed, memo)
    split.scan_started_ns = since
    return split
