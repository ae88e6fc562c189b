"""Writing files safely and reading safetensors: the primitives every other module builds on."""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import os
import tempfile
import time
from datetime import datetime
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes

from .errors import ModelFileError

FORMAT = "finetune-model"
METADATA_KEY = "finetune"


def file_digest(path: Path) -> str:
    """The hash of a file's bytes (blake2b, 16 bytes, hex), read a megabyte at a time."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def iso_time(seconds: float | None = None) -> str:
    """A moment (now by default) as ISO 8601 in local time with its UTC offset: 2026-11-29T05:25:40+00:00."""
    moment = datetime.fromtimestamp(time.time() if seconds is None else seconds).astimezone()
    return moment.isoformat(timespec="seconds")


def name_bytes(text: str) -> bytes:
    """Text holding file names as bytes to hash: a name that is not UTF-8 (a Windows archive's
    é as byte 0xE9) reads as a surrogate, which a plain encode() refuses; its own bytes come back."""
    return text.encode("utf-8", "surrogateescape")


@contextlib.contextmanager
def atomic_target(path: Path):
    """A temporary path beside `path` to write to: when the block ends normally the file is
    fsynced and moved onto `path` (os.replace), otherwise removed. Never a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:  # (a read-only folder: it named a temporary file never made)
        e.filename = str(path)
        raise
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the usual permissions
        os.close(fd)
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) and e.filename is not None and os.fspath(e.filename) == tmp:
            e.filename = str(path)  # (the messages name the file the user knows, not its temporary name)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_target(path) as tmp:
        tmp.write_bytes(data)


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Read once, at import: reading it means setting it for a moment, and a file another thread made
# in that moment would get permissions 0666.
_UMASK = _read_umask()


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, name_bytes(text))  # (UTF-8; a file name that is not is written as its own bytes)


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], meta: dict, key: str = METADATA_KEY) -> None:
    """Tensors (moved to the CPU) and JSON metadata under `key`, written atomically."""
    flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    atomic_write_bytes(path, safetensors_bytes(flat, metadata={key: json.dumps(meta)}))


def looks_like_safetensors(path: Path) -> bool:
    """Whether the file starts as safetensors files do: an 8-byte header length, then its JSON."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
        size = path.stat().st_size
    except OSError:
        return False
    return len(head) == 9 and 2 <= int.from_bytes(head[:8], "little") <= size - 8 and head[8:9] == b"{"


def read_safetensors(path: Path, key: str = METADATA_KEY) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors and the JSON metadata under `key` ({} when absent). Parsing safetensors runs no code."""
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ModelFileError(f"{path}: not a readable safetensors file ({str(e).splitlines()[0] if str(e) else type(e).__name__}); it may be truncated or of another format. Use a model.safetensors written by 'finetune train'.") from None
    try:
        meta = json.loads(raw[key]) if key in raw else {}
    except json.JSONDecodeError:
        raise ModelFileError(f"{path}: its finetune metadata is not valid JSON; the file was damaged or edited.") from None
    return tensors, meta


def write_csv(path: Path, rows: list[dict], fieldnames: list[str]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fieldnames, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def write_json(path: Path, obj: dict) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")
