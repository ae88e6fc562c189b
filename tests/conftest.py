"""Shared fixtures: tiny image folders made with PIL in tmp_path (no network, no real datasets)."""

from __future__ import annotations

import os

# Under pytest-xdist (pyproject's addopts: one process per core) each process gets its share of
# the cores, before torch is imported: 2 processes of 2 threads each on 2 cores ran slower than one.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))

import hashlib
import json
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


def make_train_val(data: Path, n_train: int = 6, n_val: int = 3) -> Path:
    """DATA/train/<class>/ + DATA/val/<class>/, three colour classes."""
    make_class_tree(data / "train", n_train)
    make_class_tree(data / "val", n_val, seed=1000)
    return data


@pytest.fixture(scope="session", autouse=True)
def session_feature_cache(tmp_path_factory):
    """No test writes into the user's feature cache; the session's shared runs get one of their own."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FINETUNE_CACHE_DIR", str(tmp_path_factory.mktemp("feature-cache")))
        yield


@pytest.fixture(scope="session", autouse=True)
def no_planned_finetuning():
    """Runs plan whole-network fine-tuning on no device, as on the CPU these tests are written on:
    on a GPU (benchmarks/gpu_check.py runs the suite there) they would add epochs a test does not
    expect. A test that wants the plan says so (test_recipe.py)."""
    from finetune import training

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(training, "SLOW_DEVICES", ("cpu", "cuda", "mps"))
        yield


@pytest.fixture(autouse=True)
def feature_cache(tmp_path, monkeypatch) -> Path:
    """Each test starts with an empty feature cache of its own."""
    path = tmp_path / "feature-cache"
    monkeypatch.setenv("FINETUNE_CACHE_DIR", str(path))
    return path


@pytest.fixture
def image_folder(tmp_path) -> Path:
    return make_train_val(tmp_path / "data")


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> dict:
    """One training run (through the CLI) shared by the tests that only read it."""
    from typer.testing import CliRunner

    from finetune.cli import app

    root = tmp_path_factory.mktemp("trained")
    data = make_train_val(root / "data")
    before = tree_hashes(data)
    runs = root / "runs"
    result = CliRunner().invoke(app, ["train", str(data), "--runs-dir", str(runs), "--json", *FAST_TRAIN_ARGS])
    assert result.exit_code == 0, result.stderr
    return {"data": data, "runs": runs, "root": root, "result": result, "summary": json.loads(result.stdout), "hashes": before}


@pytest.fixture
def flat_folder(tmp_path) -> Path:
    """DATA/<class>/ (10 each): to be split."""
    return make_class_tree(tmp_path / "flat", 10)


def tree_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


# Small, fast settings for training in tests: offline Lite0 weights, tiny crops.
# (No tail stage unless a test asks for one: the tiny colour folders' multi-layer head often wins, which plans one.)
FAST_TRAIN_ARGS = ["--arch", "efficientnet_lite0", "--img-size", "64", "--epochs", "3", "--views", "2", "--tail-epochs", "0",
                   "--workers", "0", "--batch-size", "8", "--quiet"]
