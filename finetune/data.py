"""Folder scan, train/val split, transforms and loaders."""

from __future__ import annotations

import os
import random
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from .errors import DataError
from .images import ImageDecodeError, is_candidate_image, load_rgb

VAL_FOLDER_NAMES = ("val", "valid", "validation")
SPLIT_FOLDER_NAMES = ("test", *VAL_FOLDER_NAMES)  # held-out folders: never classes
IGNORED_NAMES = frozenset({"__MACOSX", "__pycache__", "Thumbs.db", "desktop.ini"})
IMBALANCE_RATIO = 3.0  # largest class / smallest class at which training warns


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int


@dataclass
class DatasetSplit:
    classes: list[str]
    train: list[Sample]
    val: list[Sample]
    layout: str  # "train/val folders" or "split from one folder"
    skipped: list[dict] = field(default_factory=list)  # {"path", "reason"}


@dataclass(frozen=True)
class Preprocessing:
    """What an image goes through before the network; saved in every model file."""

    img_size: int
    resize: int  # shorter side before the centre crop
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def to_dict(self) -> dict:
        return {"img_size": self.img_size, "resize": self.resize, "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocessing":
        return cls(int(d["img_size"]), int(d["resize"]), tuple(d["mean"]), tuple(d["std"]))


def is_hidden(name: str) -> bool:
    return name.startswith(".") or name in IGNORED_NAMES


def class_folders(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if p.is_dir() and not is_hidden(p.name)), key=lambda p: p.name)


def walk_files(folder: Path) -> tuple[list[Path], list[Path]]:
    """(image candidates, other files) below `folder`, sorted, hidden entries skipped.

    Symlinked folders are followed once each (by real path), so a link loop cannot hang us.
    """
    images: list[Path] = []
    others: list[Path] = []
    seen: set[str] = set()
    for root, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if not is_hidden(d))
        for name in sorted(files):
            if is_hidden(name):
                continue
            path = Path(root) / name
            (images if is_candidate_image(path) else others).append(path)
    return images, others


def scan_class_tree(folder: Path, classes: list[str], skipped: list[dict]) -> list[Sample]:
    """The images under folder/<class>/, labelled by their index in `classes` (a missing folder
    gives none); other files go to `skipped`."""
    samples = []
    for label, name in enumerate(classes):
        images, others = walk_files(folder / name)
        skipped.extend({"path": str(p), "reason": "not an image file"} for p in others)
        samples.extend(Sample(p, label) for p in images)
    return samples


def find_val_folder(data: Path, names: tuple[str, ...] = VAL_FOLDER_NAMES) -> Path | None:
    for name in names:
        if (data / name).is_dir():
            return data / name
    return None


def scan_dataset(data: Path, val_split: float, seed: int) -> DatasetSplit:
    """Read an ImageFolder tree: DATA/train + DATA/val, or DATA/<class>/ split by `val_split`."""
    if not data.exists():
        raise DataError(f"{data}: no such folder. Give a folder of class folders (DATA/<class>/*.jpg) or DATA/train + DATA/val.")
    if not data.is_dir():
        raise DataError(f"{data}: is a file, not a folder. Give a folder of class folders (DATA/<class>/*.jpg).")
    try:
        return _scan(data, val_split, seed)
    except PermissionError as e:
        raise DataError(f"{e.filename or data}: permission denied; make it readable or pass another folder.") from None


def _scan(data: Path, val_split: float, seed: int) -> DatasetSplit:
    skipped: list[dict] = []
    train_root = data / "train" if (data / "train").is_dir() else data
    val_root = find_val_folder(data) if train_root != data else None
    classes = [p.name for p in class_folders(train_root)]
    split_names = [c for c in classes if c in SPLIT_FOLDER_NAMES]
    if train_root == data and split_names:
        raise DataError(f"{data / split_names[0]}: a '{split_names[0]}' folder next to class folders, but no {data / 'train'} folder. "
                        f"Put the class folders into {data / 'train'}, or rename '{split_names[0]}' if it really is a class.")
    if len(classes) < 2:
        found = f"only '{classes[0]}'" if classes else "none"
        raise DataError(f"{train_root}: need at least 2 class folders (e.g. {train_root}/cats/, {train_root}/dogs/), found {found}.")
    train = scan_class_tree(train_root, classes, skipped)
    _require_every_class(train, classes, train_root)
    if val_root is not None:
        val_classes = [p.name for p in class_folders(val_root)]
        if val_classes != classes:
            missing = sorted(set(classes) - set(val_classes))
            extra = sorted(set(val_classes) - set(classes))
            detail = "; ".join(x for x in (f"missing in val: {', '.join(missing)}" if missing else "",
                                           f"not in train: {', '.join(extra)}" if extra else "") if x)
            raise DataError(f"{val_root}: val class folders differ from {train_root} ({detail}). Make both hold the same class folders.")
        val = scan_class_tree(val_root, classes, skipped)
        return DatasetSplit(classes, train, val, "train/val folders", skipped)
    train, val = stratified_split(train, len(classes), val_split, seed)
    if not val:
        raise DataError(f"{data}: too few images to hold any out for validation; add images or a {data}/val folder.")
    return DatasetSplit(classes, train, val, f"split from one folder (val {val_split:.0%}, seed {seed})", skipped)


def _require_every_class(samples: list[Sample], classes: list[str], root: Path) -> None:
    counts = count_per_class(samples, len(classes))
    empty = [classes[i] for i, n in enumerate(counts) if n == 0]
    if empty:
        raise DataError(f"{root / empty[0]}: class folder has no images. Add images to it or remove the folder.")


def require_images_in_every_class(split: DatasetSplit) -> None:
    """After the bad files are dropped: every class still has training images, and val has some."""
    counts = count_per_class(split.train, len(split.classes))
    for name, n in zip(split.classes, counts):
        if n == 0:
            raise DataError(f"class '{name}' has no readable training images left after skipping bad files; add good images to it.")
    if not split.val:
        raise DataError("no readable validation images left after skipping bad files; add images to the val folder.")


def is_imbalanced(counts: list[int]) -> bool:
    return min(counts) > 0 and max(counts) / min(counts) >= IMBALANCE_RATIO


def limit_per_class(samples: list[Sample], limit: int | None, seed: int) -> list[Sample]:
    """At most `limit` samples of each class, a seeded random choice (quick trials)."""
    if limit is None:
        return samples
    rng = random.Random(seed)
    by_class: dict[int, list[Sample]] = {}
    for s in samples:
        by_class.setdefault(s.label, []).append(s)
    kept = [s for members in by_class.values() for s in (rng.sample(members, limit) if len(members) > limit else members)]
    return sorted(kept, key=lambda s: str(s.path))


def count_per_class(samples: list[Sample], num_classes: int) -> list[int]:
    counts = [0] * num_classes
    for s in samples:
        counts[s.label] += 1
    return counts


def stratified_split(samples: list[Sample], num_classes: int, val_fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Hold out `val_fraction` of each class, the same files for the same seed on every machine."""
    rng = random.Random(seed)
    train, val = [], []
    for label in range(num_classes):
        members = sorted((s for s in samples if s.label == label), key=lambda s: str(s.path))
        rng.shuffle(members)
        n_val = round(len(members) * val_fraction)
        if len(members) >= 2:
            n_val = min(max(n_val, 1), len(members) - 1)  # keep at least one image on each side
        else:
            n_val = 0
        val.extend(members[:n_val])
        train.extend(members[n_val:])
    return sorted(train, key=lambda s: str(s.path)), sorted(val, key=lambda s: str(s.path))


# --- transforms -------------------------------------------------------------------------
# Images leave the loaders as uint8 CHW tensors; scaling and mean/std happen inside the
# model (models.Classifier), so predict, training and exported graphs share one definition.

def eval_transform(pp: Preprocessing) -> Callable[[Image.Image], torch.Tensor]:
    return v2.Compose([
        v2.PILToTensor(),
        v2.Resize(pp.resize, antialias=True),
        v2.CenterCrop(pp.img_size),
    ])


def train_transform(pp: Preprocessing) -> Callable[[Image.Image], torch.Tensor]:
    return v2.Compose([
        v2.PILToTensor(),
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

    def __init__(self, paths: list[Path], pp: Preprocessing, max_pixels: int, views: int = 1, augment_all: bool = False):
        self.paths = paths
        self.pp = pp
        self.max_pixels = max_pixels
        self.views = views
        self.augment_all = augment_all
        self.eval_tf = eval_transform(pp)
        self.train_tf = train_transform(pp)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            img = load_rgb(self.paths[i], self.max_pixels, min_side=self.pp.resize)
        except ImageDecodeError as e:
            return i, str(e)
        img = _shrink(img, self.pp.resize)
        tfs = [self.train_tf if (self.augment_all or v > 0) else self.eval_tf for v in range(self.views)]
        return i, torch.stack([tf(img) for tf in tfs])


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
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    ranks_here = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, min(8, cores // ranks_here - 1))


def make_loader(dataset: Dataset, batch_size: int, workers: int | None, shuffle: bool = False, pin_memory: bool = False,
                seed: int = 0, sampler=None) -> DataLoader:
    workers = default_workers() if workers is None else workers
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, sampler=sampler, num_workers=workers,
        collate_fn=collate_skipping_failures, pin_memory=pin_memory, generator=generator,
        persistent_workers=False, prefetch_factor=4 if workers > 0 else None,
        worker_init_fn=leave_ctrl_c_to_the_main_process if workers > 0 else None,
    )


def leave_ctrl_c_to_the_main_process(_worker_id: int) -> None:
    """Loader workers ignore SIGINT: the main process takes Ctrl-C (under torchrun, as a flag
    checked between steps) and ends them; a worker killed by it would be an error of its own."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
