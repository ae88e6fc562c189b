"""An on-disk cache of the frozen backbone's features, so that a second run on the same
folder (another --lr, --epochs, head...) skips the slow pass, and an interrupted pass
goes on from what it had computed.

A feature row is the features of one image in one view. Its id says what determines it:
the file's content hash and, for augmented views, the view number and the run's seed
(data.view_seed). Everything else that shapes it (arch, weights, preprocessing, decode
limit, device kind and precision, this format's version) names the folder the rows live
in, so a change there can never serve old rows.

Rows are written in chunk files, each complete or absent (written beside, then renamed),
named uniquely per writer: runs sharing a cache never write the same file. Each chunk
holds a checksum of its tensor; a chunk that cannot be read or fails it is deleted and its
rows are computed again. Above the size limit the least recently used chunks go.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from .config import TrainConfig
from .data import Preprocessing, Sample
from .digests import FOLDER as DIGESTS_FOLDER
from .digests import DigestMemo, changed_since, is_unreadable, memo_files, memo_for, memo_leftovers
from .errors import FinetuneError
from .files import atomic_write_text, iso_time, write_safetensors
from .store import Rows, put_view
from .weights import weights_identity

CACHE_FORMAT = 3  # bump when what a feature row means changes (transforms, the stages pooled, decoding: 2 since 16-bit greyscale is scaled by its bit depth, signed values from their lowest; 3 since a picture in a sliver of its depth gets its own range)
ENV_DIR = "FINETUNE_CACHE_DIR"
META_KEY = "finetune-features"
ROWS_PER_CHUNK = 4096  # a chunk is written every this many rows (about 16 MB for Lite0's 2,064 dims)


def default_cache_dir() -> Path:
    """$FINETUNE_CACHE_DIR, else the platform's user cache folder."""
    if os.environ.get(ENV_DIR):
        return Path(os.path.abspath(Path(os.environ[ENV_DIR]).expanduser()))  # (absolute: as results.json says it)
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "finetune"
    if os.name == "nt":
        return Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local") / "finetune" / "Cache"
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    return (Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache") / "finetune"  # (a relative one is ignored, as XDG says)


def cache_root(given: Path | None) -> Path:
    """The cache folder: --cache-dir as given (made absolute: results.json names it), else the default."""
    return Path(os.path.abspath(given)) if given is not None else default_cache_dir()


def cache_for(cfg: TrainConfig, pp: Preprocessing, weights_source: str, device: torch.device,
              precision: torch.dtype | None, tail_input: tuple[int, ...] | None = None,
              files_since_ns: int | None = None) -> "FeatureCache | None":
    """The run's feature cache; None with --no-cache, and for random weights (not worth keeping).
    `tail_input`: the shape of the activation the rows start with (Classifier.rows), if any;
    `files_since_ns`: when the scan that took the images' hashes began (DatasetSplit.scan_started_ns)."""
    if not cfg.cache or not cfg.pretrained:
        return None
    key = feature_key(cfg.arch, weights_source, pp, cfg.max_pixels, device, precision, tail_input)
    return FeatureCache(cache_root(cfg.cache_dir), key, int(cfg.cache_limit_gb * 1e9), files_since_ns)


def digest_memo_for(cfg: TrainConfig) -> DigestMemo | None:
    """The hashes of cfg.data's files remembered in the cache folder (digests.py); None with --no-cache."""
    return memo_for(cache_root(cfg.cache_dir), cfg.data) if cfg.cache else None


def feature_key(arch: str, weights_source: str, pp: Preprocessing, max_pixels: int, device: torch.device,
                precision: torch.dtype | None, tail_input: tuple[int, ...] | None = None) -> dict:
    key = {"format": CACHE_FORMAT, "arch": arch, "weights": weights_identity(weights_source), **pp.to_dict(),
           "max_pixels": max_pixels, "device": device.type, "precision": str(precision or torch.float32).removeprefix("torch.")}
    if tail_input is not None:  # rows that start with the activation entering the tail: another table
        key["tail_input"] = list(tail_input)
    return key


def row_id(sample: Sample, view: int, seed: int) -> str | None:
    """None for a file without a content hash: it cannot be recognised again, so it is not cached."""
    if not sample.digest or is_unreadable(sample.digest):
        return None
    return f"{sample.digest}:0" if view == 0 else f"{sample.digest}:{view}:{seed}"


def checksum(t: torch.Tensor) -> str:
    return hashlib.blake2b(t.contiguous().view(torch.uint8).numpy().tobytes(), digest_size=16).hexdigest()


@dataclass
class CacheUse:
    """What a run got from the cache, for the summary."""

    dir: str
    # Each image (file) counted once a run, in one of the two: a training set grown in steps reads
    # the earlier steps' features back (its val set at each step), and a file with the same bytes
    # as another reads its twin's features.
    hits: int = 0  # images whose every view came from the cache, written there by earlier runs
    computed: int = 0  # the others: a view computed in this run (for the image or a file of the same bytes)
    dropped_chunks: int = 0  # unreadable or failing their checksum: deleted, their rows computed again
    not_written: str | None = None  # why the features computed could not be kept (a read-only or full disk...)

    def to_dict(self) -> dict:
        return {"dir": self.dir, "hits": self.hits, "computed": self.computed, "dropped_chunks": self.dropped_chunks,
                "not_written": self.not_written}


@dataclass
class FeatureCache:
    root: Path
    key: dict
    limit_bytes: int
    # Rows are stored under the hash the scan took of their file's bytes: those of a file written
    # since then (an image replaced while the run decodes it) are not stored, else they would stand
    # for bytes they were not computed from, in every later run. None: not checked.
    files_since_ns: int | None = None
    use: CacheUse = field(init=False)
    _index: dict[str, tuple[Path, int]] | None = field(default=None, init=False)
    _pending_ids: list[str] = field(default_factory=list, init=False)
    _pending: list[torch.Tensor] = field(default_factory=list, init=False)
    _mine: set[str] = field(default_factory=set, init=False)  # row ids this run computed
    _counted: set = field(default_factory=set, init=False)  # the images (keys) counted in `use`

    def __post_init__(self) -> None:
        name = hashlib.blake2b(json.dumps(self.key, sort_keys=True).encode(), digest_size=10).hexdigest()
        self.dir = self.root / "features" / name
        self.use = CacheUse(str(self.dir))

    # --- reading ------------------------------------------------------------------------

    def index(self) -> dict[str, tuple[Path, int]]:
        """row id -> (chunk, row), from the chunks' headers (their tensors are read on use)."""
        if self._index is None:
            self._index = {}
            for chunk in sorted(self.dir.glob("*.safetensors")) if self.dir.is_dir() else []:
                ids = self._chunk_ids(chunk)
                for row, rid in enumerate(ids or []):
                    self._index.setdefault(rid, (chunk, row))
        return self._index

    def _chunk_ids(self, chunk: Path) -> list[str] | None:
        try:
            with safe_open(str(chunk), framework="pt") as f:
                return json.loads(f.metadata()[META_KEY])["rows"]
        except FileNotFoundError:  # evicted by another run meanwhile
            return None
        except Exception:  # truncated, edited, another format: never trusted
            self._drop(chunk)
            return None

    def lookup(self, ids: list[list[str | None]], out: Rows, keys: list) -> dict[int, set[int]]:
        """For each item (a list of view row ids) with any row cached and intact, the views found:
        their rows are written to out[item, view]. The missing views are left to compute, so a
        rerun with more views computes only the new ones. `keys`: each item's image (its path), for `use`."""
        index = self.index()
        by_chunk: dict[Path, list[tuple[int, int, int]]] = {}
        for i, rows in enumerate(ids):
            for v, rid in enumerate(rows):
                if rid is not None and rid in index:
                    chunk, row = index[rid]
                    by_chunk.setdefault(chunk, []).append((i, v, row))
        found: dict[int, set[int]] = {}
        for chunk, wants in by_chunk.items():  # one chunk in memory at a time
            table = self._read_chunk(chunk)
            if table is None:
                continue
            for i, v, row in wants:
                put_view(out, i, v, table[row])
                found.setdefault(i, set()).add(v)
        for i, views in found.items():
            if len(views) == len(ids[i]) and self._first_count(keys[i]):
                if self._mine.isdisjoint(ids[i]):
                    self.use.hits += 1
                else:
                    self.use.computed += 1
        return found

    def _read_chunk(self, chunk: Path) -> torch.Tensor | None:
        try:
            with safe_open(str(chunk), framework="pt") as f:
                table = f.get_tensor("features")
                expected = json.loads(f.metadata()[META_KEY])["checksum"]
        except FileNotFoundError:  # evicted by another run since the index was read
            self._forget(chunk)
            return None
        except Exception:
            self._drop(chunk)
            return None
        if checksum(table) != expected:
            self._drop(chunk)
            return None
        with contextlib.suppress(OSError):  # (evicted since it was read: its rows are in hand all the same)
            os.utime(chunk)  # used now: the last to be evicted
        return table

    def _drop(self, chunk: Path) -> None:
        """A damaged chunk: deleted, and its rows computed again."""
        chunk.unlink(missing_ok=True)
        self.use.dropped_chunks += 1
        self._forget(chunk)

    def _forget(self, chunk: Path) -> None:
        if self._index is not None:
            self._index = {rid: loc for rid, loc in self._index.items() if loc[0] != chunk}

    def _first_count(self, key) -> bool:
        """Whether this image is not yet counted in `use` (it is now)."""
        if key in self._counted:
            return False
        self._counted.add(key)
        return True

    # --- writing ------------------------------------------------------------------------

    def add(self, ids: list[list[str | None]], feats: torch.Tensor, keys: list) -> None:
        """Rows computed now: item k's views feats[k] (fp16), keys[k] its image (for `use`).
        Written every ROWS_PER_CHUNK rows."""
        self.use.computed += sum(map(self._first_count, keys))
        if self.files_since_ns is not None:
            ids = [[None] * len(rows) if changed_since(key, self.files_since_ns) else rows for rows, key in zip(ids, keys)]
        self._mine.update(rid for rows in ids for rid in rows if rid is not None)
        for rows, f in zip(ids, feats):
            for rid, row in zip(rows, f):
                if rid is not None:
                    self._pending_ids.append(rid)
                    self._pending.append(row)
        if len(self._pending_ids) >= ROWS_PER_CHUNK:
            self.flush()

    def flush(self) -> None:
        """Write what is pending as one chunk (also when interrupted: the next run goes on from it)."""
        if not self._pending_ids:
            return
        table = torch.stack(self._pending).to(torch.float16)
        ids, self._pending_ids, self._pending = self._pending_ids, [], []
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            if not (self.dir / "key.json").is_file():
                atomic_write_text(self.dir / "key.json", json.dumps(self.key, indent=2) + "\n")
            name = f"{time.time_ns():x}-{os.getpid()}-{secrets.token_hex(4)}.safetensors"
            write_safetensors(self.dir / name, {"features": table}, {"rows": ids, "checksum": checksum(table)}, key=META_KEY)
            if self._index is not None:  # a later lookup in this run (the next growth step) finds them
                for row, rid in enumerate(ids):
                    self._index.setdefault(rid, (self.dir / name, row))
            evict(self.root, self.limit_bytes)
        except OSError as e:  # a full or read-only disk costs speed next time, never this run (the run says so)
            inside = e.filename is not None and Path(os.fspath(e.filename)).parent == self.dir  # (a chunk: its folder said)
            self.use.not_written = self.use.not_written or f"{self.dir if inside else e.filename or self.dir}: {e.strerror or e}"


# --- the whole cache: size, listing, eviction, clearing --------------------------------------

# What this tool writes in a cache folder, and all that listing, eviction and clearing touch: a
# cache folder may be any folder a user names, holding files of their own.
_SET_NAME = re.compile(r"[0-9a-f]{20}")  # FeatureCache's folder per key
_CHUNK_NAME = re.compile(r"[0-9a-f]+-[0-9]+-[0-9a-f]{8}\.safetensors")  # FeatureCache.flush


def feature_sets(root: Path) -> list[Path]:
    """The feature sets' folders this tool made under `root`, named by a key's digest (one whose
    key.json a stopped run had yet to write included: its chunks are read all the same)."""
    base = root / "features"
    return sorted(p for p in base.iterdir() if _SET_NAME.fullmatch(p.name) and p.is_dir()) if base.is_dir() else []


def chunks_in(folder: Path) -> list[Path]:
    """The chunk files FeatureCache.flush wrote in a feature set's folder."""
    return [p for p in folder.glob("*.safetensors") if _CHUNK_NAME.fullmatch(p.name)]


def chunks(root: Path) -> list[Path]:
    return [p for folder in feature_sets(root) for p in chunks_in(folder)]


LEFTOVER_AGE_S = 3600  # a temporary file older than this is a killed writer's, not one being written


def stale_leftovers(root: Path) -> list[Path]:
    """Temporary files that writers killed mid-write (SIGKILL, a power cut) left in the cache:
    files.atomic_target's names, an hour old or more (a running writer's are seconds old)."""
    cutoff = time.time() - LEFTOVER_AGE_S
    found = [*(p for folder in feature_sets(root) for p in folder.glob(".*.tmp")), *memo_leftovers(root)]
    old = []
    for p in found:
        with contextlib.suppress(FileNotFoundError):
            if p.stat().st_mtime < cutoff:
                old.append(p)
    return old


def evict(root: Path, limit_bytes: int) -> int:
    """Delete killed writers' leftovers (stale_leftovers), then the least recently used chunks (and
    remembered file hashes, rewritten by each run on their folder) until the cache is under 90% of
    its limit; bytes freed beyond the leftovers."""
    for p in stale_leftovers(root):
        with contextlib.suppress(OSError):  # (another user's, in a shared cache: theirs to remove)
            p.unlink(missing_ok=True)
    sized = []
    for p in chunks(root) + memo_files(root):
        try:
            st = p.stat()
        except FileNotFoundError:
            continue
        sized.append((st.st_mtime_ns, st.st_size, p))
    total = sum(s for _, s, _ in sized)
    freed = 0
    if total <= limit_bytes:
        return 0
    for _, size, p in sorted(sized):
        if total - freed <= 0.9 * limit_bytes:
            break
        p.unlink(missing_ok=True)
        freed += size
    return freed


def stats_of(files: list[Path]) -> list[os.stat_result]:
    """The files' stats, those still there (another run may evict a file while they are listed)."""
    found = []
    for f in files:
        with contextlib.suppress(FileNotFoundError):
            found.append(f.stat())
    return found


def describe(root: Path) -> dict:
    """The cache's folder, total size and one entry per feature set (arch, image size, rows...)."""
    if root.exists() and not root.is_dir():  # (it was listed as an empty cache, and "cleared")
        raise FinetuneError(f"{root}: a file, not a cache folder; point --cache-dir or {ENV_DIR} at a folder.")
    entries = []
    for folder in feature_sets(root):
        files = chunks_in(folder)
        try:
            key = json.loads((folder / "key.json").read_text())
        except (OSError, json.JSONDecodeError):
            key = {}
        stats = stats_of(files)
        size = sum(st.st_size for st in stats)
        last = max((st.st_mtime for st in stats), default=None)
        entries.append({"folder": str(folder), "arch": key.get("arch"), "img_size": key.get("img_size"),
                        "weights": key.get("weights"), "device": key.get("device"), "chunks": len(files), "bytes": size,
                        "last_used": iso_time(last) if last else None})
    digests = sum(st.st_size for st in stats_of(memo_files(root)))
    return {"dir": str(root), "bytes": sum(e["bytes"] for e in entries) + digests, "entries": entries,
            "digests_bytes": digests}


def clear(root: Path) -> int:
    """Remove every cached feature and remembered file hash: only what finetune wrote there (its
    feature sets' chunks and keys, its memos, its unfinished temporary files), then the folders
    they leave empty; anything else a user keeps there stays. Bytes freed."""
    freed = describe(root)["bytes"]
    try:
        for folder in feature_sets(root):
            for p in [*chunks_in(folder), *folder.glob(".*.tmp"), folder / "key.json"]:
                p.unlink(missing_ok=True)
            _remove_if_empty(folder)
        for p in [*memo_files(root), *memo_leftovers(root)]:
            p.unlink(missing_ok=True)
    except OSError as e:  # (a cache folder shared read-only, a file another user owns)
        raise FinetuneError(f"{e.filename or root}: {e.strerror or e}; the cache was cleared only in part: make it "
                            f"writable, or remove {root} by hand.") from None
    _remove_if_empty(root / "features")
    _remove_if_empty(root / DIGESTS_FOLDER)
    return freed


def _remove_if_empty(folder: Path) -> None:
    with contextlib.suppress(OSError):  # (not empty, or not there)
        folder.rmdir()
