"""Content hashes of the image files a run reads, remembered between runs.

Duplicate detection and the feature cache's row ids both rest on each file's content hash.
Hashing reads every byte: on a second run over a large folder that is most of the reading
left to do (25,000 photos: 1.2 s with the files in memory; a folder larger than memory is
read from disk again). So the hashes are kept in the cache folder, one file per data folder,
with each file's size, modification and change times and inode: a file whose four are
unchanged is not read again, as git and rsync decide. The change time moves whenever the
bytes do, even when a tool puts the modification time back. A file changed less than
RACY_NS before it was hashed is hashed again next time: a second change within the same
timestamp tick would leave its stat as it was (this compares the file system's timestamps with
this machine's clock: a network share whose server clock runs behind by more weakens it).
Not on Windows, where the "change" time is the creation time and a file rewritten with its
modification time put back would keep all four. File systems that report no change time of their
own (sshfs gives the modification time) weaken it the same way.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from .files import atomic_write_text, file_digest

FORMAT = 1
FOLDER = "digests"  # inside the cache folder
_MEMO_NAME = re.compile(r"[0-9a-f]{20}")  # memo_for's names
RACY_NS = 2_000_000_000  # FAT's timestamps tick every 2 s; others far finer
DIGEST_BATCH = 256
UNREADABLE = "unreadable:"


def unreadable(path: Path) -> str:
    """The stand-in hash of an empty or unreadable file: unique, so never a duplicate, and never cached."""
    return f"{UNREADABLE}{path}"


def is_unreadable(digest: str) -> bool:
    return digest.startswith(UNREADABLE)


def stat_facts(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def changed_since(path: Path, since_ns: int) -> bool:
    """Whether the file may have been written since `since_ns` (this machine's clock), before which
    its hash was taken, or cannot be read: that hash no longer vouches for its bytes. By its change
    time, which no tool sets back (a modification time may lie in the future: an archive's); the
    kernel stamps it from a clock that lags, never leads, so a file written before is never taken
    as written since. Files on FAT (2 s ticks) or a share whose server clock runs behind weaken it,
    as the module says. Windows' "change" time is the creation time, which a copy put in its place
    moves (its modification time is the copied file's): the later of the two there."""
    try:
        st = os.stat(path)
    except OSError:
        return True
    return (max(st.st_mtime_ns, st.st_ctime_ns) if os.name == "nt" else st.st_ctime_ns) >= since_ns


def memo_entry(st: os.stat_result, hashed_at_ns: int, digest: str) -> str:
    """One string, not a list of six objects: a million files' memo in memory stays a few hundred MB."""
    return ",".join(map(str, [*stat_facts(st), hashed_at_ns, digest]))


@dataclass
class DigestMemo:
    """The hashes one data folder's files had when last read, kept at `path`."""

    path: Path
    root: str  # the data folder's absolute path and a separator: the keys are relative to it
    known: dict[str, str] = field(default_factory=dict)  # file -> memo_entry
    seen: dict[str, str] = field(default_factory=dict)  # this run's files: what is saved

    @classmethod
    def load(cls, path: Path, root: str) -> "DigestMemo":
        """An unreadable or foreign memo is as good as none: every file is hashed again."""
        try:
            data = json.loads(path.read_text())
            known = data["files"] if data.get("format") == FORMAT and isinstance(data.get("files"), dict) else {}
        except (OSError, ValueError, TypeError, AttributeError, RecursionError, MemoryError):
            known = {}
        return cls(path, root, known)

    def key(self, path: Path) -> str:
        full = os.path.abspath(path)
        return full[len(self.root):] if full.startswith(self.root) else full

    def recall(self, key: str, st: os.stat_result) -> str | None:
        entry = self.known.get(key)
        parts = entry.split(",", 5) if isinstance(entry, str) else []
        if len(parts) != 6 or not parts[5]:
            return None
        try:
            size, mtime, ctime, ino, hashed_at = map(int, parts[:5])
        except ValueError:
            return None
        if [size, mtime, ctime, ino] != stat_facts(st) or max(mtime, ctime) >= hashed_at - RACY_NS:
            return None
        return parts[5]

    def save(self) -> None:
        """Best effort: a cache folder that cannot be written costs the next run speed, not this run."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.path, json.dumps({"format": FORMAT, "files": self.seen}, separators=(",", ":")))
        except OSError:
            pass


def memo_for(cache_root: Path, data: Path) -> DigestMemo | None:
    """The memo of the files under `data` (named by its absolute path) in the cache at `cache_root`;
    None on Windows (the module's docstring says why)."""
    if os.name == "nt":
        return None
    root = os.path.abspath(data)
    name = hashlib.blake2b(os.fsencode(root), digest_size=10).hexdigest()
    return DigestMemo.load(cache_root / FOLDER / f"{name}.json", os.path.join(root, ""))


def memo_files(cache_root: Path) -> list[Path]:
    """The memos this tool wrote (named by memo_for's digest): another file in the folder is left alone."""
    return [p for p in (cache_root / FOLDER).glob("*.json") if _MEMO_NAME.fullmatch(p.stem)]


def memo_leftovers(cache_root: Path) -> list[Path]:
    """Temporary files of memos a stopped process was writing (files.atomic_target's names)."""
    return [p for p in (cache_root / FOLDER).glob(".*.json.*.tmp") if _MEMO_NAME.fullmatch(p.name[1:].split(".")[0])]


def file_digests(paths: list[Path], memo: DigestMemo | None = None, known: dict[Path, str] | None = None) -> dict[Path, str]:
    """Content hash of each file (files.file_digest); with a memo, files unchanged since it was
    written are not read, and the memo is saved with this run's files; `known`: hashes this
    process took a moment ago (evaluate's second reading of a folder), not taken again. Threads:
    reading and hashing release the GIL."""
    if known:
        found = file_digests([p for p in paths if p not in known], memo)
        return {p: known[p] if p in known else found[p] for p in paths}
    started = time.time_ns()

    def digest(path: Path) -> tuple[str, tuple[str, str] | None]:
        try:
            st = os.stat(path)
            if st.st_size == 0:
                return unreadable(path), None  # empty files are all alike, and none is an image
            if memo is None:
                return file_digest(path), None
            key = memo.key(path)
            known = memo.recall(key, st)
            if known is not None:
                return known, (key, memo.known[key])
            found = file_digest(path)
            return found, (key, memo_entry(st, started, found))
        except OSError:
            return unreadable(path), None  # the decode will say what is wrong with it

    # Files a batch per task: a task per file costs more in the pool than a small file's hashing
    # (25,000 photos: 4.9 s -> about 2 s on 2 cores).
    batches = [paths[i:i + DIGEST_BATCH] for i in range(0, len(paths), DIGEST_BATCH)]
    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 1) * 2)) as pool:
        results = [r for batch in pool.map(lambda b: [digest(p) for p in b], batches) for r in batch]
    if memo is not None:
        memo.seen.update(entry for _, entry in results if entry is not None)
        memo.save()
    return {p: d for p, (d, _) in zip(paths, results)}
