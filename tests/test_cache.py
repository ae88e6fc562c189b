"""The feature cache: a second run on the same images reads their features instead of computing
them, and never reads features that a change (to a file, the arch, the size, the seed) or a
damaged cache file made wrong."""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import shutil
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from finetune import TrainConfig, train
from finetune import cache as cache_module
from finetune.cache import FeatureCache, chunks, evict
from finetune.cli import app
from finetune.errors import TrainingInterrupted
from finetune.progress import Reporter

from conftest import make_image, make_train_val

runner = CliRunner()


@pytest.fixture
def cfg(tmp_path) -> TrainConfig:
    data = make_train_val(tmp_path / "data", n_train=6, n_val=3)
    return TrainConfig(data=data, arch="efficientnet_lite0", img_size=64, epochs=3, views=2, workers=0, batch_size=8,
                       runs_dir=tmp_path / "runs")


def model_tensors(result) -> dict[str, torch.Tensor]:
    return load_file(str(result.model))


def same_model(a, b) -> bool:
    ta, tb = model_tensors(a), model_tensors(b)
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_a_rerun_reads_the_test_splits_features_from_the_cache_and_measures_the_same(cfg, tmp_path):
    from conftest import make_class_tree

    make_class_tree(cfg.data / "test", 3, seed=2000)
    first = train(cfg)
    second = train(replace(cfg, lr=2e-3))
    images = first.num_train + first.num_val + first.num_test
    assert first.num_test == 9 and first.feature_cache["computed"] == images
    assert second.feature_cache == {**first.feature_cache, "hits": images, "computed": 0}
    again = train(cfg)  # the first run's settings: the same model, measured the same on test
    assert again.feature_cache["hits"] == images and same_model(first, again)
    assert again.test_acc == first.test_acc and again.test == first.test


def test_a_second_run_reads_every_feature_and_trains_the_same_model(cfg):
    first = train(cfg)
    second = train(cfg)
    images = first.num_train + first.num_val
    assert first.feature_cache["hits"] == 0 and first.feature_cache["computed"] == images
    assert second.feature_cache["hits"] == images and second.feature_cache["computed"] == 0
    assert same_model(first, second)  # the cached features are the computed ones, bit for bit


def test_each_image_is_counted_once_a_copy_of_another_included(cfg):
    import shutil

    first_cat = sorted((cfg.data / "train" / "cat").glob("*.jpg"))[0]
    shutil.copy(first_cat, cfg.data / "val" / "cat" / "copy_of_a_training_image.jpg")  # its features: its twin's
    first, second = train(cfg), train(cfg)
    images = first.num_train + first.num_val
    assert first.feature_cache["hits"] == 0 and first.feature_cache["computed"] == images
    assert second.feature_cache["hits"] == images and second.feature_cache["computed"] == 0


@pytest.mark.parametrize("memory_gb", [1.0, 0.0], ids=["in memory", "in a file"])
def test_a_rerun_with_more_views_computes_only_the_new_views(cfg, memory_gb):
    cfg = replace(cfg, feature_memory_gb=memory_gb)
    first = train(replace(cfg, views=1))
    more = train(replace(cfg, views=3))
    everything = train(replace(cfg, views=3, cache=False))  # (every view computed in this run)
    n_train, n_val = first.num_train, first.num_val
    assert first.recipe["feature_pass"]["image_views"] == n_train + n_val
    assert more.recipe["feature_pass"]["image_views"] == 2 * n_train  # views 1 and 2: the plain views came from the cache
    assert more.feature_cache["hits"] == n_val and more.feature_cache["computed"] == n_train
    assert everything.recipe["feature_pass"]["image_views"] == 3 * n_train + n_val
    assert [r.val_acc for r in more.history] == [r.val_acc for r in everything.history]
    assert [r.val_loss for r in more.history] == pytest.approx([r.val_loss for r in everything.history], abs=1e-4)
    again = train(replace(cfg, views=3))
    assert again.feature_cache["hits"] == n_train + n_val and same_model(more, again)


def test_a_changed_file_is_computed_again(cfg):
    first = train(cfg)
    changed = next((cfg.data / "train" / "cat").glob("*.jpg"))
    make_image(changed, (10, 10, 10), seed=999)  # new bytes under the same name
    second = train(cfg)
    assert second.feature_cache["computed"] == 1
    assert second.feature_cache["hits"] == first.num_train + first.num_val - 1


def test_what_shapes_the_features_is_part_of_their_key(cfg):
    first = train(cfg)
    for change, hits in [
        ({"img_size": 72}, 0),
        ({"max_pixels": 10**7}, 0),
        ({"arch": "resnet18", "pretrained": False}, None),  # random weights are not cached at all
        ({"seed": 1}, first.num_val),  # the augmented views change with the seed; the plain view of val does not
    ]:
        use = train(replace(cfg, **change)).feature_cache
        assert (use["hits"] if use else None) == hits, change


def test_weights_are_known_by_their_bytes_not_by_where_or_when_they_were_installed(tmp_path, monkeypatch):
    from finetune.weights import weights_identity

    weights = bytes(range(256)) * 100
    first, again = tmp_path / "env1" / "w.pth", tmp_path / "env2" / "w.pth"  # (a new virtual environment, later)
    for path in (first, again):
        path.parent.mkdir()
        path.write_bytes(weights)
    os.utime(again, ns=(1, 1))
    assert weights_identity(str(first)) == weights_identity(str(again))
    again.write_bytes(weights[:-1] + b"\x00")  # one byte changed, same size
    os.utime(again, ns=(os.stat(first).st_atime_ns, os.stat(first).st_mtime_ns))  # and the same time
    assert weights_identity(str(first)) != weights_identity(str(again))
    # A download is known by the file it leaves in torchvision's hub cache, as the next run finds it.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    url = "https://download.example/models/w.pth"
    assert weights_identity(url) == url  # (not downloaded: nothing to hash)
    hub = tmp_path / "torch" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    shutil.copy(first, hub / "w.pth")
    assert weights_identity(url) == weights_identity(str(first)) == weights_identity(str(hub / "w.pth"))


@pytest.mark.parametrize("memory_gb", [None, 0])  # 0: the feature table goes to a file (it left an empty cache/tmp)
def test_no_cache_writes_nothing(cfg, feature_cache, memory_gb):
    result = train(replace(cfg, cache=False, **({} if memory_gb is None else {"feature_memory_gb": memory_gb})))
    assert result.feature_cache is None and result.best_val_acc == 1.0 and not feature_cache.exists()


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_a_damaged_cache_file_is_deleted_and_its_features_computed_again(cfg, feature_cache, damage):
    first = train(cfg)
    damaged = chunks(feature_cache)  # the train images' and the val images'
    for chunk in damaged:
        data = bytearray(chunk.read_bytes())
        if damage == "truncate":
            data = data[: len(data) // 2]
        else:  # the file still parses; only its checksum can tell
            data[-10] ^= 0xFF
        chunk.write_bytes(bytes(data))
    second = train(cfg)
    assert second.feature_cache["dropped_chunks"] == len(damaged) == 2 and second.feature_cache["hits"] == 0
    assert same_model(first, second)
    assert not any(c.exists() for c in damaged) and len(chunks(feature_cache)) == 2  # replaced by good ones


class StopAfter(Reporter):
    """Ctrl-C in the middle of the feature pass."""

    def __init__(self, images: int):
        self.left = images

    def advance(self, steps=1, **fields):
        if fields:  # a computed batch (the cached ones are advanced without figures)
            self.left -= steps
            if self.left <= 0:
                raise KeyboardInterrupt


def test_an_interrupted_feature_pass_goes_on_from_what_it_had_computed(cfg, monkeypatch):
    monkeypatch.setattr(cache_module, "ROWS_PER_CHUNK", 4)
    with pytest.raises(TrainingInterrupted):
        train(cfg, StopAfter(10))
    result = train(cfg)
    assert result.feature_cache["hits"] >= 8 and result.feature_cache["computed"] > 0
    assert result.feature_cache["hits"] + result.feature_cache["computed"] == result.num_train + result.num_val


def write_rows(root: str, writer: int, rounds: int) -> None:
    """One of two processes writing the same rows into one cache at once."""
    cache = FeatureCache(Path(root), {"k": 1}, 10**9)
    for r in range(rounds):
        ids = [[f"img{i}:0"] for i in range(r * 8, r * 8 + 8)]
        feats = torch.tensor([[[float(i)] * 4] for i in range(r * 8, r * 8 + 8)], dtype=torch.float16)
        cache.add(ids, feats, [f"img{i}.jpg" for i in range(r * 8, r * 8 + 8)])
        cache.flush()


def test_concurrent_writers_leave_a_consistent_cache(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=write_rows, args=(str(tmp_path), w, 6)) for w in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0]
    reader = FeatureCache(tmp_path, {"k": 1}, 10**9)
    out = torch.zeros(48, 1, 4, dtype=torch.float16)
    found = reader.lookup([[f"img{i}:0"] for i in range(48)], out, [f"img{i}.jpg" for i in range(48)])
    assert found == {i: {0} for i in range(48)} and reader.use.dropped_chunks == 0
    assert torch.equal(out, torch.arange(48, dtype=torch.float16).view(48, 1, 1).expand(48, 1, 4))
    assert not list(tmp_path.rglob(".*.tmp"))  # no half-written file left behind


def test_rows_of_a_file_written_since_it_was_hashed_are_not_stored(tmp_path):
    """An image replaced while a run decoded it: its rows were of the new bytes, stored under the old bytes' hash."""
    import time

    before = time.time_ns() - 10**9  # (a second before: file times come from a clock that lags by a tick)
    image = tmp_path / "a.jpg"
    image.write_bytes(b"the bytes the scan hashed")
    after = time.time_ns()
    kept, replaced = (FeatureCache(tmp_path / "cache", {"k": 1}, 10**9, since) for since in (after, before))
    for cache in (kept, replaced):
        cache.add([["h:0"]], torch.ones(1, 1, 4, dtype=torch.float16), [image])
        cache.flush()
    reader = FeatureCache(tmp_path / "cache", {"k": 1}, 10**9)
    assert reader.lookup([["h:0"]], torch.zeros(1, 1, 4, dtype=torch.float16), [image]) == {0: {0}}
    assert len(list((tmp_path / "cache").rglob("*.safetensors"))) == 1  # (the replaced file's row: not written)
    assert replaced.use.computed == 1  # (computed all the same: the run used it)


def test_eviction_removes_the_least_recently_used_first(tmp_path):
    folder = tmp_path / "features" / "0123456789abcdef0123"  # (a feature set's folder: a key's digest, its key.json)
    folder.mkdir(parents=True)
    (folder / "key.json").write_text("{}")
    files = []
    for i in range(4):
        f = folder / f"{i:x}-4242-0000000{i}.safetensors"
        f.write_bytes(b"\0" * 1000)
        os.utime(f, ns=(i * 10**9, i * 10**9))  # 0 is the oldest
        files.append(f)
    theirs = folder / "notes.safetensors"  # a user's file, oldest of all: not the cache's to remove
    theirs.write_bytes(b"\0" * 1000)
    os.utime(theirs, ns=(0, 0))
    assert evict(tmp_path, 2500) == 2000
    assert [f.exists() for f in files] == [False, False, True, True] and theirs.exists()


def test_clearing_the_cache_removes_only_what_finetune_wrote(cfg, feature_cache):
    # A cache folder may be any folder a user names (--cache-dir, FINETUNE_CACHE_DIR), with files of their own.
    theirs = [feature_cache / "features" / "embeddings" / "train.safetensors", feature_cache / "features" / "x.npy",
              feature_cache / "digests" / "SHA256SUMS.json", feature_cache / "notes.txt"]
    for f in theirs:
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(b"theirs")
    train(cfg)
    keyless = feature_cache / "features" / "fedcba9876543210fedc" / "1a2b-42-0badcafe.safetensors"  # (a run stopped before its key.json)
    keyless.parent.mkdir()
    keyless.write_bytes(b"ours")
    leftover = feature_cache / "digests" / ".0123456789abcdef0123.json.x1y2.tmp"  # (a memo a stopped run was writing)
    leftover.write_bytes(b"ours")
    ours = [*chunks(feature_cache), leftover]
    assert keyless in ours and len(json.loads(runner.invoke(app, ["cache", "--json"]).stdout)["entries"]) == 2  # theirs not listed
    cleared = runner.invoke(app, ["cache", "--clear"])
    assert cleared.exit_code == 0, cleared.stderr
    assert all(f.read_bytes() == b"theirs" for f in theirs)
    assert not any(f.exists() for f in ours) and [p.name for p in (feature_cache / "digests").iterdir()] == ["SHA256SUMS.json"]
    assert sorted(p.name for p in (feature_cache / "features").iterdir()) == ["embeddings", "x.npy"]


def test_a_cache_that_cannot_be_cleared_or_loses_files_while_listed_is_no_traceback(feature_cache, monkeypatch):
    key = feature_cache / "features" / "0123456789abcdef0123" / "key.json"
    key.parent.mkdir(parents=True)
    key.write_text('{"arch": "efficientnet_lite0", "img_size": 64}')
    chunk = key.parent / "1a2b-42-0badcafe.safetensors"
    chunk.write_bytes(b"ours")
    real_stat = Path.stat

    def evicted_while_listed(self, **kw):  # (another run evicts it between the listing and the stat)
        if self == chunk:
            raise FileNotFoundError(2, "No such file or directory", str(self))
        return real_stat(self, **kw)

    with monkeypatch.context() as m:
        m.setattr(Path, "stat", evicted_while_listed)
        listed = runner.invoke(app, ["cache", "--json"])
    assert listed.exit_code == 0 and json.loads(listed.stdout)["entries"][0]["bytes"] == 0
    real_unlink = Path.unlink

    def read_only(self, missing_ok=False):
        if self == chunk:
            raise PermissionError(13, "Permission denied", str(self))
        return real_unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", read_only)
    cleared = runner.invoke(app, ["cache", "--clear"])
    assert cleared.exit_code == 1 and cleared.stdout == "" and "Traceback" not in cleared.stderr
    assert " ".join(cleared.stderr.split()) == (f"error: {chunk}: Permission denied; the cache was cleared only in part: "
                                                f"make it writable, or remove {feature_cache} by hand.")


def test_the_cache_folder_is_absolute_and_a_file_there_is_refused(tmp_path, monkeypatch):
    from finetune.cache import default_cache_dir

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FINETUNE_CACHE_DIR", "rel")  # (results.json named it relative to where train ran)
    assert default_cache_dir() == tmp_path / "rel"
    monkeypatch.delenv("FINETUNE_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", "relcache")  # (relative: ignored, as the XDG spec says; it made ./relcache)
    assert default_cache_dir() == Path.home() / ".cache" / "finetune"
    (tmp_path / "afile").write_text("x")
    monkeypatch.setenv("FINETUNE_CACHE_DIR", str(tmp_path / "afile"))
    for args in (["cache"], ["cache", "--clear"]):  # (listed as an empty cache, and "cleared")
        refused = runner.invoke(app, args)
        assert refused.exit_code == 1 and refused.stdout == "" and "a file, not a cache folder" in refused.stderr


def test_cache_command_shows_and_clears(cfg, feature_cache):
    train(cfg)
    shown = runner.invoke(app, ["cache", "--json"])
    assert shown.exit_code == 0, shown.stderr
    summary = json.loads(shown.stdout)
    assert summary["dir"] == str(feature_cache) and summary["bytes"] > summary["digests_bytes"] > 0
    assert summary["entries"][0]["arch"] == "efficientnet_lite0" and summary["entries"][0]["img_size"] == 64
    from datetime import datetime, timedelta, timezone

    assert summary["entries"][0]["last_used"][-6] in "+-" and summary["entries"][0]["last_used"][-3] == ":"  # (+00:00)
    used = datetime.fromisoformat(summary["entries"][0]["last_used"])  # (ISO 8601 with its UTC offset)
    assert used.tzinfo is not None and abs(datetime.now(timezone.utc) - used) < timedelta(minutes=10)
    table = runner.invoke(app, ["cache"])
    assert str(feature_cache) in table.stdout.replace("\n", "") and table.stderr == ""
    assert used.strftime("%Y-%m-%d %H:%M") in table.stdout  # (the table: to the minute)
    cleared = runner.invoke(app, ["cache", "--clear"])
    assert cleared.exit_code == 0 and "cleared" in cleared.stdout
    assert not (feature_cache / "features").exists() and not (feature_cache / "digests").exists()
    assert json.loads(runner.invoke(app, ["cache", "--json"]).stdout)["bytes"] == 0


def test_train_summary_names_the_cache(cfg):
    train(cfg)
    result = runner.invoke(app, ["train", str(cfg.data), "--arch", "efficientnet_lite0", "--img-size", "64", "--epochs", "3",
                                 "--views", "2", "--workers", "0", "--runs-dir", str(cfg.runs_dir), "--json"])
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["feature_cache"]["hits"] == 27
    assert "images from the cache" in result.stderr


def test_features_kept_in_a_file_train_the_same_head_as_in_memory(cfg):
    in_memory = train(replace(cfg, cache=False, head_features="final"))
    in_file = train(replace(cfg, cache=False, head_features="final", feature_memory_gb=0))
    assert same_model(in_memory, in_file)  # one block: the very batches, read from the file
    auto_memory, auto_file = train(replace(cfg, cache=False)), train(replace(cfg, cache=False, feature_memory_gb=0))
    a, b = model_tensors(auto_memory), model_tensors(auto_file)  # the multi-layer norm: summed in float64 from the file
    assert auto_memory.recipe["head"] == auto_file.recipe["head"]
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-3) for k in a)


def test_a_table_of_many_blocks_streams_and_still_learns(cfg, monkeypatch):
    from finetune import store

    monkeypatch.setattr(store, "BLOCK_BYTES", 3 * 2 * 2064 * 2)  # three images (two views each) per block
    result = train(replace(cfg, feature_memory_gb=0, epochs=6))
    assert result.best_val_acc == 1.0  # the colour classes are easy; a broken stream would not be
    again = train(replace(cfg, feature_memory_gb=0, epochs=6))  # from the cache, into the file
    assert again.feature_cache["hits"] == again.num_train + again.num_val and same_model(result, again)


def test_an_unusable_cache_folder_costs_speed_not_the_run(cfg, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    result = train(replace(cfg, cache_dir=blocker / "cache", feature_memory_gb=0))  # nothing can be written there
    assert result.best_val_acc == 1.0 and result.feature_cache["hits"] == 0
    assert blocker.read_text() == "not a folder"


def test_a_cache_that_cannot_be_written_is_said_once_and_the_run_goes_on(cfg, tmp_path, monkeypatch):
    # (a cache folder that is a file, on a read-only or full disk: the run loses nothing but the next run's speed)
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    monkeypatch.setenv("FINETUNE_CACHE_DIR", str(blocked))
    result = runner.invoke(app, ["train", str(cfg.data), "--arch", "efficientnet_lite0", "--img-size", "64", "--epochs", "2",
                                 "--views", "1", "--tail-epochs", "0", "--workers", "0", "--runs-dir", str(tmp_path / "runs"), "--json"])
    assert result.exit_code == 0, result.stderr
    cache = json.loads(result.stdout)["feature_cache"]
    assert cache["hits"] == 0 and cache["not_written"].endswith("Not a directory")
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: feature cache not written")]
    assert len(warnings) == 1 and "set --cache-dir to a writable folder, or --no-cache" in warnings[0]


def test_a_full_disk_under_the_feature_table_is_said_naming_its_folder(tmp_path, monkeypatch):
    """A trial: 'the output: cannot be written (No space left on device)', naming nothing: the table's file has no name."""
    import errno

    from finetune import store
    from finetune.errors import UsageError

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    table = store.DiskRows.create(4, 1, 8, tmp_path / "cache" / "tmp")  # (the folder not made: its nearest one used)
    monkeypatch.setattr(store.os, "pwrite", full)
    with pytest.raises(UsageError, match=rf"^{re.escape(str(tmp_path))}: cannot write the feature table there \(No space "
                                         r"left on device; 0.00 GB\); free space there, pass another --cache-dir"):
        store.put(table, 0, torch.ones(1, 8))


def test_a_cache_folder_that_cannot_be_written_is_named_not_a_temporary_file(tmp_path, monkeypatch):
    """A trial: the warning named '.../.18ec79...safetensors.u5frnidx.tmp: Read-only file system', a file never made."""
    import errno
    import tempfile

    def read_only(prefix, suffix, dir):
        raise OSError(errno.EROFS, "Read-only file system", os.path.join(dir, f"{prefix}u5frnidx{suffix}"))

    cache = FeatureCache(tmp_path, {"k": 1}, 10**9)
    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    cache.add([["h:0"]], torch.ones(1, 1, 4, dtype=torch.float16), [tmp_path / "a.jpg"])
    cache.flush()
    assert cache.use.not_written == f"{cache.dir}: Read-only file system"


def test_a_file_that_cannot_be_written_atomically_is_named_not_its_temporary_file(tmp_path, monkeypatch):
    import errno
    import tempfile

    from finetune.files import atomic_write_text

    def read_only(prefix, suffix, dir):
        raise OSError(errno.EROFS, "Read-only file system", os.path.join(dir, f"{prefix}u5frnidx{suffix}"))

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    with pytest.raises(OSError) as raised:
        atomic_write_text(tmp_path / "results.json", "{}")
    assert raised.value.filename == str(tmp_path / "results.json")  # (it named '.results.json.u5frnidx.tmp')


def test_leftovers_of_killed_writers_go_and_a_running_writers_stay(tmp_path):
    """A trial: SIGKILL mid-write left '.<chunk>.safetensors.XXXX.tmp' files that nothing ever removed."""
    folder = tmp_path / "features" / "0123456789abcdef0123"
    folder.mkdir(parents=True)
    stale, fresh = folder / ".1a-42-0badf00d.safetensors.u5frnidx.tmp", folder / ".1b-43-0badf00d.safetensors.k2j3h4g5.tmp"
    for f in (stale, fresh):
        f.write_bytes(b"\0" * 100)
    os.utime(stale, (time.time() - 2 * 3600,) * 2)
    theirs = tmp_path / "features" / "notes.tmp"  # (not in a feature set's folder: not the cache's)
    theirs.write_text("x")
    os.utime(theirs, (0, 0))
    evict(tmp_path, 10**9)
    assert not stale.exists() and fresh.exists() and theirs.exists()
