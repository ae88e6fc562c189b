"""`finetune check DATA`: read a folder exactly as `train` would, decode every image, and say
what train would see and whether it would run, without training or writing anything."""

from __future__ import annotations

import statistics
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from torch.utils.data import DataLoader, Dataset

from .config import LONG_IMAGE_RATIO, MAX_WORKERS, TrainConfig
from .cpus import usable_cores, workers_within_cores
from .data import DatasetSplit, leave_ctrl_c_to_the_main_process
from .errors import DataError
from .images import ImageDecodeError, ImageFacts, aspect_ratio, inspect_image, squashes
from .models import get_arch
from .progress import Reporter
from .reading import scan_dataset
from .scan import count_per_class, is_imbalanced, missing_val_note, require_images_in_every_class


@dataclass
class FolderCheck:
    data: str
    ok: bool  # train would run
    problem: str | None = None  # why train would refuse, when it would
    read_as: str = ""
    layout: str = ""
    notes: list[str] = field(default_factory=list)
    classes: list[str] = field(default_factory=list)
    counts: dict[str, dict[str, int]] = field(default_factory=dict)  # split -> class -> usable images
    imbalance: float | None = None  # largest / smallest class in train
    imbalanced: bool = False
    skipped: list[dict] = field(default_factory=list)  # {path, reason}: what train would not use
    leakage: list[dict] = field(default_factory=list)  # val/test files with the same bytes as another split's
    images: dict = field(default_factory=dict)  # sizes and colour of the usable images
    seconds: float = 0.0

    def to_json_dict(self) -> dict:
        return asdict(self)


class _Facts(Dataset):
    def __init__(self, paths: list[Path], max_pixels: int, min_side: int):
        self.paths, self.max_pixels, self.min_side = paths, max_pixels, min_side

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, ImageFacts | str]:
        try:
            return i, inspect_image(self.paths[i], self.max_pixels, self.min_side)
        except ImageDecodeError as e:
            return i, str(e)


def check_folder(cfg: TrainConfig, reporter: Reporter | None = None) -> FolderCheck:
    """What `finetune train` with these settings would read in `cfg.data` (layout, classes,
    counts, skipped files, duplicates, image sizes), and whether it would run."""
    reporter = reporter or Reporter()
    started = time.perf_counter()
    try:
        cfg = cfg.checked()
        get_arch(cfg.arch).check_size(cfg.img_size)  # (as train refuses a size the arch cannot take)
        split = scan_dataset(cfg.data, cfg.val_split, cfg.seed, cfg.layout, cfg.labels, cfg.label_columns)
    except DataError as e:
        return FolderCheck(str(cfg.data), ok=False, problem=str(e), seconds=round(time.perf_counter() - started, 2))
    facts, failures = decode_all(split, cfg, reporter)
    bad = {f["path"] for f in failures}
    usable = lambda samples: [s for s in samples if str(s.path) not in bad]  # noqa: E731
    clean = replace(split, train=usable(split.train), val=usable(split.val), test=usable(split.test),
                    skipped=[*split.skipped, *failures])
    problem = None
    try:
        require_images_in_every_class(clean)
    except DataError as e:
        problem = str(e)
    counts = count_per_class(clean.train, len(clean.classes))
    missing = missing_val_note(clean) if problem is None else None
    no_weights = weights_note(cfg)
    return FolderCheck(
        str(cfg.data), ok=problem is None, problem=problem, read_as=clean.read_as, layout=clean.layout,
        notes=[*clean.notes, *([missing] if missing else []), *([no_weights] if no_weights else [])],
        classes=clean.classes, counts=split_counts(clean), imbalance=round(max(counts) / min(counts), 2) if min(counts) else None,
        imbalanced=is_imbalanced(counts), skipped=clean.skipped, leakage=clean.leakage,
        images=describe_images([facts[str(s.path)] for s in clean.train + clean.val + clean.test if str(s.path) in facts],
                               input_size(cfg)),
        seconds=round(time.perf_counter() - started, 2),
    )


def input_size(cfg: TrainConfig) -> int:
    """The network's input in pixels, as train would use it."""
    return get_arch(cfg.arch).preprocessing(cfg.img_size).img_size


def weights_note(cfg: TrainConfig) -> str | None:
    """Where train would find no pretrained weights without a network (the default arch's come
    from torchvision's hub cache or a download): said before a run stops on it."""
    from .weights import OFFLINE_ARCH, hub_checkpoint_dir, offline_weights, url_filename

    spec = get_arch(cfg.arch)
    if not cfg.pretrained or spec.pretrained_loader is not None:  # (timm's: found by their own hub)
        return None
    if cfg.weights is not None:
        return None if cfg.weights.exists() else f"--weights {cfg.weights}: no such file or folder; train would stop on it"
    if offline_weights(spec) is not None or not spec.weight_urls:
        return None
    name = url_filename(spec.weight_urls[0])
    return (f"no {spec.name} weights on this machine ({name} is not in {hub_checkpoint_dir()}): train downloads them when "
            f"online; offline, put the file there, pass --weights FILE, or use {OFFLINE_ARCH}")


def decode_all(split: DatasetSplit, cfg: TrainConfig, reporter: Reporter) -> tuple[dict[str, ImageFacts], list[dict]]:
    """Every image decoded as the training's feature pass decodes it, in several processes."""
    paths = [s.path for s in split.train + split.val + split.test]
    min_side = get_arch(cfg.arch).preprocessing(cfg.img_size).resize  # (the shorter side before the crop)
    # The main process only collects here, so every core decodes (training leaves one for the maths).
    workers = workers_within_cores(cfg.workers) if cfg.workers is not None else min(MAX_WORKERS, usable_cores())
    loader = DataLoader(_Facts(paths, cfg.max_pixels, min_side), batch_size=64, num_workers=workers, collate_fn=list,
                        worker_init_fn=leave_ctrl_c_to_the_main_process if workers > 0 else None)
    facts: dict[str, ImageFacts] = {}
    failures: list[dict] = []
    reporter.start("Decoding", len(paths))
    for batch in loader:
        for i, outcome in batch:
            if isinstance(outcome, str):
                failures.append({"path": str(paths[i]), "reason": outcome})
            else:
                facts[str(paths[i])] = outcome
        reporter.advance(len(batch))
    reporter.finish()
    return facts, failures


def split_counts(split: DatasetSplit) -> dict[str, dict[str, int]]:
    parts = {"train": split.train, "val": split.val, "test": split.test}
    return {name: dict(zip(split.classes, count_per_class(samples, len(split.classes))))
            for name, samples in parts.items() if samples or name != "test"}


ENLARGED = 4  # said where the input is this many times the median image's shorter side or more


def describe_images(facts: list[ImageFacts], input_size: int | None = None) -> dict:
    """Sizes and colour in a few words: "71% are 224x224", "all grayscale"; how much the network's
    input (`input_size`) enlarges small images."""
    if not facts:
        return {"count": 0, "summary": []}
    sizes = Counter(f"{f.width}x{f.height}" for f in facts)
    top, n = sizes.most_common(1)[0]
    by_area = sorted(facts, key=lambda f: f.width * f.height)
    median = by_area[len(by_area) // 2]
    if n / len(facts) >= 0.5:
        size_line = "all are " + top if n == len(facts) else f"{n / len(facts):.0%} are {top}"
    else:
        size_line = (f"sizes vary: smallest {by_area[0].width}x{by_area[0].height}, median {median.width}x{median.height}, "
                     f"largest {by_area[-1].width}x{by_area[-1].height}")
    gray = sum(f.grayscale for f in facts) / len(facts)
    colour_line = "all grayscale" if gray == 1 else "all colour" if gray == 0 else f"{gray:.0%} grayscale, {1 - gray:.0%} colour"
    crop_line = cropped_away(facts)
    short = statistics.median(min(f.width, f.height) for f in facts)
    enlarged_line = None
    if input_size and input_size >= ENLARGED * short:  # (a trial: 32x32 images at 288 px, no word of it)
        enlarged_line = (f"the {input_size} px input enlarges the median image about {input_size / short:.0f} times (its "
                         f"shorter side {short:g} px): no detail is added, only time; a smaller --img-size costs less")
    modes = Counter(f.mode for f in facts)
    return {
        "count": len(facts), "most_common_size": top, "most_common_share": round(n / len(facts), 4),
        "median_size": f"{median.width}x{median.height}", "median_short_side": short,
        "grayscale_share": round(gray, 4), "modes": dict(modes.most_common()),
        "summary": [size_line, colour_line, *filter(None, [crop_line, enlarged_line])],
    }


LONG_SHARE = 0.25  # said where at least this share of the images are that long


def cropped_away(facts: list[ImageFacts]) -> str | None:
    """What the square centre crop leaves of long images (pages, receipts, panoramas): their ends,
    where a page's header and footer are, are never seen (a trial: classes told apart there, at chance)."""
    ratios = [aspect_ratio(f.width, f.height) for f in facts]
    long = [r for r in ratios if r >= LONG_IMAGE_RATIO]
    if len(long) < LONG_SHARE * len(facts):  # (a panorama among photos: no matter)
        return None
    share = len(long) / len(facts)
    if squashes(ratios):
        return (f"{share:.0%} are at least {LONG_IMAGE_RATIO:g} times as long as wide: train takes each whole, squashed to "
                f"a square (--fit auto; --fit crop would see about {1 / statistics.median(long):.0%} of their length)")
    return (f"{share:.0%} are at least {LONG_IMAGE_RATIO:g} times as long as wide: the square centre crop sees about "
            f"{1 / statistics.median(long):.0%} of their length (what lies near their ends is never seen; --fit squash "
            f"trains on the whole image)")

