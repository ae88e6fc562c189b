"""The records of labelled images, preprocessing, transforms, datasets and loaders."""

from __future__ import annotations

import hashlib
import os
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from .config import MAX_WORKERS
from .cpus import usable_cores, workers_within_cores
from .digests import is_unreadable
from .files import name_bytes
from .images import ImageDecodeError, load_rgb


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int
    digest: str = ""  # content hash (scan.py), which seeds the image's augmented views


def samples_digest(samples: list[Sample], root: Path) -> str:
    """A digest of these images' paths (relative to `root`) and labels, in any order."""
    lines = sorted(f"{os.path.relpath(os.path.abspath(s.path), root)}\t{s.label}" for s in samples)
    return hashlib.blake2b(name_bytes("\n".join(lines)), digest_size=10).hexdigest()



def held_out_content_digest(split: "DatasetSplit") -> str:
    """A digest of the val images' contents (scan.py's hashes) and labels: what tells a copy of the
    training folder elsewhere from another folder whose files have the same names."""
    # (a file that could not be read is named by its path in its stand-in digest: as one here, wherever the folder is)
    lines = sorted(f"{'unreadable' if is_unreadable(s.digest) else s.digest}\t{s.label}" for s in split.val)
    return hashlib.blake2b("\n".join(lines).encode(), digest_size=10).hexdigest()


def held_out_digest(split: "DatasetSplit", data: Path) -> str:
    """The digest of a split's val images as the scan found them (the files that then fail to
    decode included): training keeps it in the model file, evaluate compares a scan of its own."""
    # (relative to DATA as it was spelt, as the samples' paths are: a link's name gives the same digest)
    return samples_digest(split.val, Path(os.path.abspath(data)))


@dataclass
class DatasetSplit:
    """The labelled images training uses, as scan.py read them."""

    classes: list[str]
    train: list[Sample]
    val: list[Sample]  # chooses the head, the stage kept
    layout: str  # "split folders" or "class folders" (layout.py)
    skipped: list[dict] = field(default_factory=list)  # {"path", "reason"}
    test: list[Sample] = field(default_factory=list)  # measured once, on the saved model; never used to choose
    leakage: list[dict] = field(default_factory=list)  # val/test files with the same bytes as another split's
    notes: list[str] = field(default_factory=list)  # what was seen and not used
    read_as: str = ""  # one line: how the folder was read
    scan_started_ns: int | None = None  # when the scan began: the samples' hashes hold for files unchanged since


@dataclass(frozen=True)
class Preprocessing:
    """What an image goes through before the network; saved in every model file."""

    img_size: int
    resize: int  # shorter side before the centre crop
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    fit: str = "crop"  # crop: the shorter side to `resize`, the centre crop; squash: the whole image to a square

    def to_dict(self) -> dict:
        return {"img_size": self.img_size, "resize": self.resize, "mean": list(self.mean), "std": list(self.std),
                "fit": self.fit}

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocessing":
        # (files from before `fit` crop)
        return cls(int(d["img_size"]), int(d["resize"]), tuple(d["mean"]), tuple(d["std"]), str(d.get("fit", "crop")))



# --- transforms -------------------------------------------------------------------------
# Images leave the loaders as uint8 CHW tensors; scaling and mean/std happen inside the
# model (models.Classifier), so predict, training and exported graphs share one definition.

# torchvision is imported where a transform is built: importing it costs ~1.7 s of a CPU (it
# pulls in torch._dynamo), which a run that reads every feature from the cache never needs.

def eval_transform(pp: Preprocessing) -> Callable[[Image.Image], torch.Tensor]:
    from torchvision.transforms import v2

    if pp.fit == "squash":  # (pages, receipts, strips: the whole image, its aspect given up)
        return v2.Compose([v2.PILToTensor(), v2.Resize((pp.img_size, pp.img_size), antialias=True)])
    return v2.Compose([
        v2.PILToTensor(),
        v2.Resize(pp.resize, antialias=True),
        v2.CenterCrop(pp.img_size),
    ])


def squashed(pp: Preprocessing) -> list:
    """The step that makes the whole image a square first, where `pp.fit` says so (the augmented
    views then crop from the square, as from a photo)."""
    from torchvision.transforms import v2

    return [v2.Resize((pp.resize, pp.resize), antialias=True)] if pp.fit == "squash" else []


def train_transform(pp: Preprocessing, light: bool = False) -> Callable[[Image.Image], torch.Tensor]:
    """Augmentation. `light`: for data whose plain view trains the better head (X-rays, scans),
    where strong crops and colour changes make an image something it is not."""
    from torchvision.transforms import v2

    if light:
        return v2.Compose([
            v2.PILToTensor(),
            *squashed(pp),
            v2.RandomResizedCrop(pp.img_size, scale=(0.8, 1.0), ratio=(0.9, 1.1), antialias=True),
            v2.RandomHorizontalFlip(),
        ])
    return v2.Compose([
        v2.PILToTensor(),
        *squashed(pp),
        v2.RandomResizedCrop(pp.img_size, scale=(0.35, 1.0), antialias=True),
        v2.RandomHorizontalFlip(),
        v2.RandomRotation(10),
        v2.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2),  # no hue: it costs 5x the rest on CPU
    ])


class ImageFileDataset(Dataset):
    """Item i: (i, uint8 tensor [views, 3, S, S]) or (i, reason) when the file cannot be decoded.

    View 0 is the deterministic eval view; views 1.. are augmented. Each file is decoded
    once per item, at a reduced JPEG scale when that still covers the resize.
    """

    def __init__(self, paths: list[Path], pp: Preprocessing, max_pixels: int, views: int = 1, augment_all: bool = False,
                 seeds: list[int] | None = None, light: bool = False):
        self.paths = paths
        self.pp = pp
        self.max_pixels = max_pixels
        self.views = views
        self.augment_all = augment_all
        # With seeds, image i's augmented views are always the same (whatever the batch, the
        # worker or the run), so its features can be reused; without, each draw is new.
        self.seeds = seeds
        self.eval_tf = eval_transform(pp)
        self.train_tf = train_transform(pp, light)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            img = load_rgb(self.paths[i], self.max_pixels, min_side=self.pp.resize)
        except ImageDecodeError as e:
            return i, str(e)
        img = _shrink(img, self.pp.resize)
        tfs = [self.train_tf if (self.augment_all or v > 0) else self.eval_tf for v in range(self.views)]
        if self.seeds is None:
            return i, torch.stack([tf(img) for tf in tfs])
        with torch.random.fork_rng(devices=[]):  # the caller's random stream goes on as if untouched
            torch.manual_seed(self.seeds[i])
            return i, torch.stack([tf(img) for tf in tfs])


def view_seed(seed: int, sample: Sample) -> int:
    """The seed of an image's augmented views: from its content (its path when not hashed) and the run's seed."""
    key = name_bytes(f"{seed}:{sample.digest or sample.path}")
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") & (2**63 - 1)


def _shrink(img: Image.Image, shorter: int) -> Image.Image:
    """Resize once so the shorter side is `shorter`: every later crop works on a small image."""
    w, h = img.size
    if min(w, h) <= shorter:
        return img
    scale = shorter / min(w, h)
    return img.resize((max(shorter, round(w * scale)), max(shorter, round(h * scale))), Image.BILINEAR, reducing_gap=2.0)


def collate_skipping_failures(batch):
    """-> (indices of decoded items, stacked tensor or None, [(index, reason)] of failures)."""
    ok = [(i, x) for i, x in batch if not isinstance(x, str)]
    failed = [(i, x) for i, x in batch if isinstance(x, str)]
    if not ok:
        return [], None, failed
    return [i for i, _ in ok], torch.stack([x for _, x in ok]), failed


def default_workers() -> int:
    """Leave a core for the main process, which does the maths.

    Under torchrun the machine's cores are shared by its ranks (LOCAL_WORLD_SIZE of them):
    8 ranks on 16 cores each get one worker, not seven.
    """
    ranks_here = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, min(MAX_WORKERS, usable_cores() // ranks_here - 1))


def make_loader(dataset: Dataset, batch_size: int, workers: int | None, shuffle: bool = False, pin_memory: bool = False,
                seed: int = 0, sampler=None) -> DataLoader:
    workers = default_workers() if workers is None else workers_within_cores(workers)
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, sampler=sampler, num_workers=workers,
        collate_fn=collate_skipping_failures, pin_memory=pin_memory, generator=generator,
        persistent_workers=False, prefetch_factor=4 if workers > 0 else None,
        worker_init_fn=leave_ctrl_c_to_the_main_process if workers > 0 else None,
        multiprocessing_context=start_method_unfixed() if workers > 0 else None,
    )


def start_method_unfixed():
    """The start method the process would use, named rather than taken as the default: taking the
    default fixes it for the process, and a library's caller could no longer choose one
    (multiprocessing.set_start_method: "context has already been set")."""
    import multiprocessing

    return multiprocessing.get_context(multiprocessing.get_start_method(allow_none=True)
                                       or multiprocessing.get_all_start_methods()[0])


def leave_ctrl_c_to_the_main_process(_worker_id: int) -> None:
    """Loader workers ignore SIGINT: the main process takes Ctrl-C (under torchrun, as a flag
    checked between steps) and ends them; a worker killed by it would be an error of its own.
    (Not SIGTERM: it is how torch ends its workers, and a worker ignoring it hung the exit.)"""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
