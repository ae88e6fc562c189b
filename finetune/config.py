"""Every default of the tool lives here; the CLI reads its option defaults from these dataclasses."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

DEFAULT_ARCH = "resnet18"
DEFAULT_RUNS_DIR = Path("runs")
MODEL_FILENAME = "model.safetensors"


@dataclass
class TrainConfig:
    data: Path = Path(".")
    arch: str = DEFAULT_ARCH
    weights: Path | None = None  # a state dict or a finetune model file; overrides the cache/download
    pretrained: bool = True
    img_size: int | None = None  # None: the architecture's own training size
    val_split: float = 0.2  # only used when DATA has no val/ folder
    seed: int = 0
    device: str = "auto"
    batch_size: int = 32
    # Stage 1: a new head on the frozen backbone, trained on features computed once for
    # `views` augmented views of each training image (view 0 is the plain centre crop).
    epochs: int = 30
    views: int = 4
    lr: float = 1e-3
    weight_decay: float = 1e-4
    label_smoothing: float = 0.1
    patience: int = 0  # stop a stage after this many epochs without a better val accuracy (0: never)
    class_weights: bool = False  # weight the loss by inverse class frequency (imbalanced folders)
    max_images_per_class: int | None = None  # quick trials: use at most this many per class (train and val)
    # Stage 2 (off by default): unfreeze and fine-tune the whole network end to end.
    finetune_epochs: int = 0
    backbone_lr_ratio: float = 0.1  # backbone lr = lr * ratio in stage 2
    workers: int | None = None  # None: chosen from the machine's cores
    runs_dir: Path = DEFAULT_RUNS_DIR
    name: str | None = None
    max_pixels: int = 89_478_485  # Pillow's own decompression-bomb threshold, but as a hard error
    resume: Path | None = None  # a run folder to continue; its config.json replaces the rest

    def to_json_dict(self) -> dict:
        d = asdict(self)
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in d.items()}

    @classmethod
    def from_json_dict(cls, d: dict) -> "TrainConfig":
        known = {f: d[f] for f in cls.__dataclass_fields__ if f in d}
        for key in ("data", "weights", "runs_dir", "resume"):
            if known.get(key) is not None:
                known[key] = Path(known[key])
        return cls(**known)


@dataclass
class PredictConfig:
    inputs: list[str] = field(default_factory=list)
    model: Path | None = None  # a model file or a run folder; None: newest run under runs_dir
    runs_dir: Path = DEFAULT_RUNS_DIR
    top_k: int = 3
    batch_size: int = 64
    device: str = "auto"
    workers: int | None = None
    max_pixels: int = 89_478_485
    tta: bool = False  # average with the horizontally flipped image
