"""Every default and every option rule of the tool lives here; the CLI reads its defaults from
these dataclasses, and library users get the same checks through `checked()`."""

from __future__ import annotations

import math
import numbers
import os
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from .errors import UsageError

DEFAULT_ARCH = "resnet18"
DEFAULT_RUNS_DIR = Path("runs")
MODEL_FILENAME = "model.safetensors"
RESULTS_FILENAME = "results.json"  # written as a run finishes (the last of its files): its presence means finished
MAX_PIXELS = 89_478_485  # Pillow's own decompression-bomb threshold, but as a hard error
HEAD_FEATURES = ("auto", "final", "multi")
FITS = ("auto", "crop", "squash")  # how an image becomes the network's square (data.Preprocessing.fit; auto: recipe.choose_fit)
LONG_IMAGE_RATIO = 2.0  # this many times as long as wide: the centre crop sees half of it or less (not a 3:2 or 16:9 photo)
SQUASH_SHARE = 0.5  # --fit auto squashes where at least this share of the training images are that long
FIT_SAMPLE = 200  # the training images whose sizes --fit auto reads (their headers: milliseconds)
MAX_WORKERS = 8  # image-loading processes at most by default (data.default_workers)
# Without a val folder, val is split off train: this fraction of each class, but (unless
# --val-split is given) at most its share of VAL_CAP images and never under MIN_CAPPED_VAL of a
# class (scan.val_count).
DEFAULT_VAL_FRACTION = 0.2
VAL_CAP = 2_500
MIN_CAPPED_VAL = 25

# The recipe's plan (recipe.py, whose docstring says why; the CLI's help quotes these).
TAIL_FIT = 0.995  # a head fitting fewer of its training images than this underfits: the tail stage follows
TAIL_EPOCHS = 4
TAIL_BUDGET_S = 300.0  # a planned tail stage longer than this (measured throughput) is left out, and the run says so
FINETUNE_EPOCHS = 5
FINETUNE_BUDGET_S = 300.0  # as the tail's: planned fine-tuning longer than this (measured) is left out
MAX_BUDGETED_FINETUNE_EPOCHS = 10  # what a --time-budget plans at most: twice the planned default (none measured beyond 2 on a CPU)
FAST_TRAINING_RATE = 200.0  # training images a second of the whole network from which fine-tuning is planned: a GPU's pace
UNFROZEN_FINETUNE_EPOCHS = FINETUNE_EPOCHS  # what `freeze_backbone=False` means when finetune_epochs is not given
MAX_EXTRA_VIEWS = 3
IMAGES_FOR_NO_VIEWS = 3_000  # above this many training images, the plain view alone
GROW_FROM = 8_000  # training sets larger than this grow in steps while more images pay
FIRST_STEP = 2_000  # 2,000 images' head already shows where a set of easy photos stands (issue 16: 1,200 gave 0.992)


@dataclass
class TrainConfig:
    data: Path = Path(".")
    arch: str = DEFAULT_ARCH
    weights: Path | None = None  # a state dict or a finetune model file; overrides the cache/download
    pretrained: bool = True
    img_size: int | None = None  # None: the architecture's own training size
    fit: str = "auto"  # crop: the shorter side resized, the centre kept; squash: the whole image (pages, receipts); auto: by their sizes
    layout: str = "auto"  # how DATA is read: auto, classes, or train=DIR[,val=DIR][,test=DIR] (layout.py)
    labels: Path | None = None  # a CSV of image paths (in DATA) and labels, instead of class folders (labels.py)
    label_columns: str | None = None  # "PATH,LABEL[,SPLIT]" column names; None: found among the usual names
    val_split: float | None = None  # only used when DATA has no val/ folder; None: 20% up to 2,500 images (scan.val_count)
    seed: int = 0
    device: str = "auto"
    batch_size: int = 32
    # Stage 1: a new head on the frozen backbone, trained on features computed once for
    # `views` augmented views of each training image (view 0 is the plain centre crop).
    epochs: int = 30
    views: int | None = None  # None: from the number of training images (recipe.views_for)
    head_features: str = "auto"  # auto (chosen on val), final, or multi (every stage's features, standardised)
    all_images: bool = False  # False: beyond recipe.GROW_FROM images, grow the training set while more images pay
    lr: float = 1e-3
    weight_decay: float = 1e-4
    label_smoothing: float = 0.1
    patience: int = 0  # stop a stage after this many epochs without a better val accuracy (0: never)
    class_weights: bool = False  # weight the loss by inverse class frequency (imbalanced folders)
    max_images_per_class: int | None = None  # quick trials: use at most this many per class (train, val and test)
    # Then the tail: the backbone's last blocks and the head, trained on activations cached by
    # the feature pass (stages.TailStage). None: planned from the head's fit (recipe.plan_tail).
    tail_epochs: int | None = None
    # Last: unfreeze and fine-tune the whole network end to end. None: planned from the device's
    # measured pace (recipe.plan_finetune: on a GPU, not on a CPU), unless freeze_backbone says
    # (True: 0; False: UNFROZEN_FINETUNE_EPOCHS).
    finetune_epochs: int | None = None
    freeze_backbone: bool | None = None  # None: follow finetune_epochs
    # Seconds the whole run may take (None: no limit): the tail's and fine-tuning's epochs are
    # planned into what the run has left of it, measured on this device (recipe.plan_tail,
    # recipe.plan_finetune); the feature pass and the head are always done.
    time_budget: float | None = None
    backbone_lr_ratio: float = 0.1  # the tail stage and fine-tuning go at lr * ratio (they start from the trained head)
    early_lr_ratio: float = 0.1  # fine-tuning: the blocks before the tail's go at this part of the tail's rate
    # The tail stage and fine-tuning validate and keep an exponential average of their weights over
    # about this many epochs' steps (averaging.py); 0: the weights as trained.
    average_epochs: float = 0.5
    workers: int | None = None  # None: chosen from the machine's cores
    runs_dir: Path = DEFAULT_RUNS_DIR
    name: str | None = None
    max_pixels: int = MAX_PIXELS
    resume: Path | None = None  # a run folder to continue; its config.json replaces the rest
    # The frozen backbone's features are kept on disk (cache.py) for the next run on the same files.
    cache: bool = True
    cache_dir: Path | None = None  # None: $FINETUNE_CACHE_DIR, else the platform's user cache folder
    cache_limit_gb: float = 20.0  # least recently used features go beyond this
    feature_memory_gb: float = 1.0  # a run's feature table beyond this is kept in a file, read in blocks (store.py)

    def typed(self) -> "TrainConfig":
        """This config with the types the library works with, for callers of the Python API: paths
        given as strings become Paths, a --time-budget string its seconds; a value of another type
        (epochs="5") is a UsageError naming it rather than a TypeError deep in a run."""
        paths = paths_as_paths(self, _PATH_FIELDS, optional=("data", "weights", "labels", "resume", "cache_dir"))
        budget = {"time_budget": parse_duration(self.time_budget)} if isinstance(self.time_budget, str) else {}
        cfg = replace(self, **paths, **budget)
        if cfg.data is None and cfg.resume is None:
            raise UsageError("data: give an image folder, e.g. TrainConfig(data='photos').")
        require_names(cfg, _STR_FIELDS, optional=("name", "label_columns"))
        return replace(cfg, **numbers_as_python(cfg, _NUMBER_FIELDS),
                       **flags_as_bools(cfg, _BOOL_FIELDS, optional=("freeze_backbone",)))  # (None: planned in the run)

    def checked(self) -> "TrainConfig":
        """This config with every option checked (UsageError naming the option otherwise) and the
        options that depend on each other settled: finetune_epochs and freeze_backbone agree (both
        None: planned during the run)."""
        self = self.typed()
        _require([
            (self.val_split is None or 0.0 < self.val_split < 1.0, f"--val-split must be between 0 and 1 (got {self.val_split})."),
            (self.epochs >= 1, f"--epochs must be at least 1 (got {self.epochs})."),
            (self.finetune_epochs is None or self.finetune_epochs >= 0,
             f"--finetune-epochs must be 0 or more (got {self.finetune_epochs})."),
            (not (self.freeze_backbone and self.finetune_epochs),
             "--freeze-backbone and --finetune-epochs > 0 contradict each other; pass one of them."),
            (not (self.freeze_backbone is False and self.finetune_epochs == 0),
             "--no-freeze-backbone and --finetune-epochs 0 contradict each other; pass one of them."),
            (self.pretrained or self.weights is None,
             "--no-pretrained and --weights contradict each other (random weights, or those of the file); pass one of them."),
            (self.labels is not None or self.label_columns is None, "--label-columns names the columns of --labels' CSV; pass --labels too."),
            (self.tail_epochs is None or self.tail_epochs >= 0, f"--tail-epochs must be 0 or more (got {self.tail_epochs})."),
            (self.views is None or self.views >= 1, f"--views must be at least 1 (got {self.views})."),
            (self.head_features in HEAD_FEATURES, f"--head-features must be one of {', '.join(HEAD_FEATURES)} (got '{self.head_features}')."),
            (self.fit in FITS, f"--fit must be one of {', '.join(FITS)} (got '{self.fit}')."),
            (self.batch_size >= 1, f"--batch-size must be at least 1 (got {self.batch_size})."),
            (0 < self.lr < math.inf, f"--lr must be a positive number (got {self.lr})."),
            (self.img_size is None or self.img_size >= 32, f"--img-size must be at least 32 (got {self.img_size})."),
            (self.workers is None or self.workers >= 0, f"--workers must be 0 or more (got {self.workers})."),
            (self.max_pixels >= 1, f"--max-pixels must be positive (got {self.max_pixels})."),
            (self.feature_memory_gb >= 0, f"--feature-memory-gb must be 0 or more (got {self.feature_memory_gb})."),
            (0 < self.cache_limit_gb < math.inf, f"--cache-limit-gb must be a positive number (got {self.cache_limit_gb})."),
            (abs(self.seed) < 2**62, f"--seed must be a whole number under 2^62 (got {self.seed})."),  # (torch's take 64 bits)
            (0 <= self.early_lr_ratio < math.inf, f"early_lr_ratio must be 0 or more (got {self.early_lr_ratio})."),
            (0 < self.backbone_lr_ratio < math.inf, f"backbone_lr_ratio must be a positive number (got {self.backbone_lr_ratio})."),
            (0 <= self.weight_decay < math.inf, f"weight_decay must be 0 or more (got {self.weight_decay})."),
            (0 <= self.average_epochs < math.inf, f"average_epochs must be 0 or more (got {self.average_epochs})."),
            (self.time_budget is None or 0 < self.time_budget < math.inf, f"--time-budget must be positive (got {self.time_budget})."),
            (self.patience >= 0, f"--patience must be 0 (off) or more (got {self.patience})."),
            (0.0 <= self.label_smoothing < 1.0, f"--label-smoothing must be in [0, 1) (got {self.label_smoothing})."),
            (self.max_images_per_class is None or self.max_images_per_class >= 1,
             f"--max-images-per-class must be at least 1 (got {self.max_images_per_class})."),
        ])
        finetune_epochs = self.finetune_epochs
        if finetune_epochs is None and self.freeze_backbone is not None:
            finetune_epochs = 0 if self.freeze_backbone else UNFROZEN_FINETUNE_EPOCHS
        return replace(self, finetune_epochs=finetune_epochs,
                       freeze_backbone=None if finetune_epochs is None else finetune_epochs == 0)

    def to_json_dict(self) -> dict:
        d = asdict(self)
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in d.items()}

    @classmethod
    def from_json_dict(cls, d: dict) -> "TrainConfig":
        known = {f: d[f] for f in cls.__dataclass_fields__ if f in d}
        for key in _PATH_FIELDS:
            if known.get(key) is not None:
                known[key] = Path(known[key])
        return cls(**known)


_PATH_FIELDS = ("data", "weights", "labels", "runs_dir", "resume", "cache_dir")
_INTS = ("img_size", "seed", "batch_size", "epochs", "views", "patience", "max_images_per_class", "tail_epochs",
         "finetune_epochs", "workers", "max_pixels")
_FLOATS = ("val_split", "lr", "weight_decay", "label_smoothing", "time_budget", "backbone_lr_ratio", "early_lr_ratio",
           "average_epochs", "cache_limit_gb", "feature_memory_gb")
_NUMBER_FIELDS = {**{k: numbers.Integral for k in _INTS}, **{k: numbers.Real for k in _FLOATS}}
_STR_FIELDS = ("arch", "layout", "device", "head_features", "fit", "name", "label_columns")
_BOOL_FIELDS = ("pretrained", "all_images", "class_weights", "freeze_backbone", "cache")


def paths_as_paths(cfg, fields: tuple[str, ...], optional: tuple[str, ...] = ()) -> dict:
    """The path fields of `cfg` given as strings, as Paths; a value of another type (labels=5), or
    None where `optional` does not allow it, is a UsageError naming its option."""
    for name in fields:
        value = getattr(cfg, name)
        if not isinstance(value, (str, os.PathLike)) and not (value is None and name in optional):
            raise UsageError(f"{'data' if name == 'data' else '--' + name.replace('_', '-')} must be a path (got {value!r}).")
    return {k: Path(v) for k in fields if isinstance(v := getattr(cfg, k), (str, os.PathLike))}


def require_names(cfg, fields: tuple[str, ...], optional: tuple[str, ...] = ()) -> None:
    """Each of `fields` a string (or None, where `optional` allows it): a UsageError naming its option otherwise."""
    for name in fields:
        value = getattr(cfg, name)
        if not isinstance(value, str) and not (value is None and name in optional):
            raise UsageError(f"--{name.replace('_', '-')} must be a name (got {value!r}).")


def numbers_as_python(cfg, fields: dict[str, type]) -> dict:
    """The number fields of `cfg` as Python's int or float (NumPy's numbers too: a sweep over
    np.arange); a value of another type (epochs="5") is a UsageError naming its option."""
    found = {}
    for name, kind in fields.items():
        value = getattr(cfg, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, kind)):
            whole = "a whole number" if kind is numbers.Integral else "a number"
            raise UsageError(f"--{name.replace('_', '-')} must be {whole} (got {value!r}).")
        if value is not None:
            found[name] = int(value) if kind is numbers.Integral else float(value)
    return found


def flags_as_bools(cfg, fields: tuple[str, ...], optional: tuple[str, ...] = ()) -> dict:
    """The yes/no fields of `cfg` as Python's bool (NumPy's too); anything else, a string above all
    ("no" is a true value), or None where `optional` does not allow it, is a UsageError naming its option."""
    found = {}
    for name in fields:
        value = getattr(cfg, name)
        numpy_bool = type(value).__module__ == "numpy" and type(value).__name__ in ("bool", "bool_")
        if value is None and name in optional:
            continue
        if not (isinstance(value, bool) or numpy_bool):
            raise UsageError(f"{name} must be True or False (got {value!r}).")
        found[name] = bool(value)
    return found


@dataclass
class PredictConfig:
    """Settings of predict and evaluate."""

    model: Path | None = None  # a model file or a run folder; None: newest run under runs_dir
    runs_dir: Path = DEFAULT_RUNS_DIR
    top_k: int = 3
    batch_size: int = 64
    device: str = "auto"
    workers: int | None = None
    max_pixels: int = MAX_PIXELS
    tta: bool = False  # average with the horizontally flipped image
    unknown: bool = True  # answer "unknown" (label null) for images unlike every class (calibration.py)
    max_distance: float | None = None  # the unknown rule's threshold; None: the model's own
    min_score: float | None = None  # also unknown when the top (calibrated) probability is below this
    # evaluate: how DATA is read, as for training
    layout: str = "auto"
    labels: Path | None = None
    label_columns: str | None = None

    def checked(self) -> "PredictConfig":
        """This config with every option checked (a UsageError naming the option otherwise); paths
        given as strings become Paths (callers of the Python API)."""
        paths = paths_as_paths(self, ("model", "runs_dir", "labels"), optional=("model", "labels"))
        require_names(self, ("device", "layout", "label_columns"), optional=("label_columns",))
        self = replace(self, **paths, **numbers_as_python(self, _PREDICT_NUMBERS), **flags_as_bools(self, ("tta", "unknown")))
        _require([
            (self.top_k >= 1, f"--top-k must be at least 1 (got {self.top_k})."),
            (self.batch_size >= 1, f"--batch-size must be at least 1 (got {self.batch_size})."),
            (self.workers is None or self.workers >= 0, f"--workers must be 0 or more (got {self.workers})."),
            (self.max_pixels >= 1, f"--max-pixels must be positive (got {self.max_pixels})."),
            (self.min_score is None or 0 <= self.min_score <= 1, f"--min-score must be between 0 and 1 (got {self.min_score})."),
            (self.max_distance is None or self.max_distance > 0, f"--max-distance must be positive (got {self.max_distance})."),
            (self.unknown or (self.max_distance is None and self.min_score is None),
             "--no-unknown answers a class for every image: --max-distance and --min-score would do nothing; pass one or the other."),
            (self.labels is not None or self.label_columns is None, "--label-columns names the columns of --labels' CSV; pass --labels too."),
        ])
        return self


def predict_config(cfg) -> PredictConfig:
    """predict's and evaluate's settings, checked: None for the defaults; anything but a
    PredictConfig (a dict, a TrainConfig) is a UsageError."""
    if cfg is None:
        cfg = PredictConfig()
    if not isinstance(cfg, PredictConfig):
        raise UsageError(f"cfg: give a finetune.PredictConfig, e.g. PredictConfig(top_k=1) (got {type(cfg).__name__}).")
    return cfg.checked()


_PREDICT_NUMBERS = {**{k: numbers.Integral for k in ("top_k", "batch_size", "workers", "max_pixels")},
                    **{k: numbers.Real for k in ("max_distance", "min_score")}}


DURATION_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0}


def parse_duration(text: str, option: str = "--time-budget") -> float:
    """Seconds in "90s", "10m", "1h30m", "1.5h", "2m30" (a last number in the unit after the one
    before it, as a clock reads) or a plain number of seconds."""
    spec = text.strip().lower()
    number = r"\d+(?:\.\d+)?"
    units = re.fullmatch(rf"((?:{number}\s*[hms]\s*)+)({number})?", spec)
    if re.fullmatch(number, spec):
        seconds = float(spec)
    elif units and not (units.group(2) and units.group(1).rstrip().endswith("s")):
        parts = re.findall(rf"({number})\s*([hms])", units.group(1))
        if units.group(2):  # 2m30: 30 s; 1h30: 30 min
            parts.append((units.group(2), {"h": "m", "m": "s"}[parts[-1][1]]))
        seconds = sum(float(n) * DURATION_UNITS[unit] for n, unit in parts)
    elif re.fullmatch(rf"-\s*(?:{number}\s*[hms]?\s*)+", spec):
        seconds = -1.0  # (said below: a duration must be positive)
    else:
        raise UsageError(f"{option} {text!r} is not a duration: write e.g. 90s, 10m or 1h30m.")
    if seconds <= 0:
        raise UsageError(f"{option} must be positive (got {text!r}).")
    return seconds


def _require(checks: list[tuple[bool, str]]) -> None:
    for ok, message in checks:
        if not ok:
            raise UsageError(message)
