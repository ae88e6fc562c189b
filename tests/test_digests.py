"""The files' content hashes remembered between runs: an unchanged file is not read again, a
changed one always is, and a damaged or missing memo only costs the reading."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest

from finetune import TrainConfig, train
from finetune import digests
from finetune.digests import DigestMemo, file_digests, memo_for

from conftest import make_class_tree, make_train_val


@pytest.fixture
def reads(monkeypatch) -> list[Path]:
    """The files whose bytes were hashed (read), in order."""
    seen: list[Path] = []
    real = digests.file_digest

    def counting(path):
        seen.append(Path(path))
        return real(path)
    monkeypatch.setattr(digests, "file_digest", counting)
    return seen


@pytest.fixture
def long_ago(monkeypatch):
    """As if each file had been hashed long after its last change (the racy window passed)."""
    monkeypatch.setattr(digests, "RACY_NS", -10**12)


def images(tmp_path) -> list[Path]:
    return sorted(make_class_tree(tmp_path / "data", 3).rglob("*.jpg"))


def test_unchanged_files_are_not_read_again(tmp_path, reads, long_ago):
    paths = images(tmp_path)
    first = file_digests(paths, memo_for(tmp_path / "cache", tmp_path / "data"))
    assert len(reads) == len(paths)
    again = file_digests(paths, memo_for(tmp_path / "cache", tmp_path / "data"))
    assert again == first and len(reads) == len(paths)  # nothing more was read
    assert file_digests(paths) == first  # and they are the hashes of the bytes


def test_a_changed_file_is_read_again(tmp_path, reads, long_ago):
    paths = images(tmp_path)
    first = file_digests(paths, memo_for(tmp_path / "cache", tmp_path / "data"))
    paths[0].write_bytes(paths[1].read_bytes() + b"\0")
    again = file_digests(paths, memo_for(tmp_path / "cache", tmp_path / "data"))
    assert reads[len(paths):] == [paths[0]]
    assert again[paths[0]] != first[paths[0]] and again[paths[1]] == first[paths[1]]


def facts(size=10, mtime=1_000, ctime=1_000, ino=7):
    return SimpleNamespace(st_size=size, st_mtime_ns=mtime, st_ctime_ns=ctime, st_ino=ino)


@pytest.mark.parametrize("now, trusted", [
    (facts(), True),
    (facts(ctime=1_001), False),  # rewritten, its modification time put back: the change time still moved
    (facts(size=11), False),
    (facts(mtime=999), False),
    (facts(ino=8), False),  # another file moved into its place
])
def test_only_a_file_with_the_very_same_stat_is_trusted(now, trusted):
    memo = DigestMemo(Path("memo.json"), "/d/", {"a.jpg": digests.memo_entry(facts(), 1_000 + digests.RACY_NS + 1, "abc")})
    assert (memo.recall("a.jpg", now) == "abc") is trusted


def test_a_file_hashed_within_the_racy_window_of_its_change_is_read_again(tmp_path, reads):
    paths = images(tmp_path)  # written just now: a second write in the same timestamp tick would not show
    file_digests(paths, memo_for(tmp_path / "cache", tmp_path / "data"))
    file_digests(paths, memo_for(tmp_path / "cache", tmp_path / "data"))
    assert len(reads) == 2 * len(paths)


@pytest.mark.parametrize("content", ["{not json", '{"format": 99, "files": {}}', '{"format": 1, "files": []}', "[]",
                                     '{"format": 1, "files": {"cat/cat_0.jpg": 3, "cat/cat_1.jpg": "1,2,x,4,5,ab", "cat/cat_2.jpg": "1,2"}}',
                                     "[" * 100_000])
def test_a_damaged_memo_costs_the_reading_only(tmp_path, reads, long_ago, content):
    paths = images(tmp_path)
    expected = file_digests(paths)
    memo = memo_for(tmp_path / "cache", tmp_path / "data")
    memo.path.parent.mkdir(parents=True)
    memo.path.write_text(content)
    assert file_digests(paths, memo_for(tmp_path / "cache", tmp_path / "data")) == expected
    saved = json.loads(memo.path.read_text())
    assert saved["format"] == digests.FORMAT and len(saved["files"]) == len(paths)  # written anew


def test_a_second_training_run_reads_no_file_to_hash_it(tmp_path, reads, long_ago, feature_cache):
    data = make_train_val(tmp_path / "d", n_train=6, n_val=3)
    cfg = TrainConfig(data=data, arch="efficientnet_lite0", img_size=64, epochs=2, views=1, workers=0, batch_size=8,
                      runs_dir=tmp_path / "runs")
    first = train(cfg)
    hashed = len(reads)
    assert hashed == first.num_train + first.num_val and list((feature_cache / "digests").glob("*.json"))
    second = train(replace(cfg, lr=2e-3))
    assert len(reads) == hashed and second.feature_cache["hits"] == second.num_train + second.num_val


def test_a_folder_whose_name_is_not_utf8_has_its_memo(tmp_path, reads, long_ago):
    data = tmp_path / "M\udcfcnchen"  # the byte 0xfc, as Linux hands such a name to Python
    paths = sorted(make_class_tree(data, 2).rglob("*.jpg"))
    file_digests(paths, memo_for(tmp_path / "cache", data))
    file_digests(paths, memo_for(tmp_path / "cache", data))
    assert len(reads) == len(paths)


def test_no_memo_on_windows(tmp_path, monkeypatch):
    # There the "change" time is the creation time: a rewrite with its modification time put back would not show.
    monkeypatch.setattr(digests.os, "name", "nt")
    assert memo_for(tmp_path / "cache", tmp_path / "data") is None


def test_remembered_hashes_count_towards_the_cache_limit(tmp_path, long_ago):
    from finetune.cache import evict

    paths = images(tmp_path)
    memo = memo_for(tmp_path / "cache", tmp_path / "data")
    file_digests(paths, memo)
    size = memo.path.stat().st_size
    assert evict(tmp_path / "cache", limit_bytes=size - 1) == size and not memo.path.exists()
