"""Shared fixtures: tiny image folders made with PIL in tmp_path (no network, no real datasets)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# Each class is a colour the network can tell apart even from random features.
CLASS_COLOURS = {"cat": (220, 40, 40), "dog": (40, 200, 40), "fox": (40, 60, 220)}


def make_image(path: Path, colour, size=(40, 32), seed=0, fmt=None) -> Path:
    rng = np.random.default_rng(seed)
    base = np.array(colour, dtype=np.float64)
    pixels = np.clip(base + rng.normal(0, 25, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format=fmt)
    return path


def make_class_tree(root: Path, n_per_class: int, classes=tuple(CLASS_COLOURS), seed=0) -> Path:
    for c_i, name in enumerate(classes):
        for i in range(n_per_class):
            make_image(root / name / f"{name}_{i}.jpg", CLASS_COLOURS.get(name, (128, 128, 128)), seed=seed + 100 * c_i + i)
    return root


@pytest.fixture
def image_folder(tmp_path) -> Path:
    """DATA/train/<class>/ (6 each) + DATA/val/<class>/ (3 each), three classes."""
    data = tmp_path / "data"
    make_class_tree(data / "train", 6)
    make_class_tree(data / "val", 3, seed=1000)
    return data


@pytest.fixture
def flat_folder(tmp_path) -> Path:
    """DATA/<class>/ (10 each): to be split."""
    return make_class_tree(tmp_path / "flat", 10)


def tree_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


# Small, fast settings for training in tests: offline Lite0 weights, tiny crops.
FAST_TRAIN_ARGS = ["--arch", "efficientnet_lite0", "--img-size", "64", "--epochs", "3", "--views", "2",
                   "--workers", "0", "--batch-size", "8", "--quiet"]


@pytest.fixture
def runs_dir(tmp_path) -> Path:
    return tmp_path / "runs"
