"""Records that cross modules: stage names, one epoch's figures, what train and evaluate return.

Numbers are kept as computed; they are rounded only where they are shown or written as text
(metrics.csv, the CLI), so that a record read back from a resume state equals the one written.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from enum import StrEnum
from pathlib import Path


class Stage(StrEnum):
    HEAD = "head"  # a new head on cached features of the frozen backbone
    TAIL = "tail"  # the backbone's last blocks and the head, on activations cached by the feature pass
    FINETUNE = "finetune"  # the whole network, end to end on freshly augmented images


@dataclass(frozen=True)
class HeadChoice:
    """What the head reads (recipe.py chooses it on val)."""

    views: int  # feature rows per training image (1: the plain view only)
    multi_layer: bool  # every stage's pooled features, standardised; else the final features as they are

    def describe(self) -> str:
        what = "every stage's features (standardised)" if self.multi_layer else "the final features"
        return f"{what}, {'the plain view' if self.views == 1 else f'{self.views} views'} of each training image"

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class EpochRecord:
    """One finished epoch: a row of metrics.csv and of the run's history."""

    epoch: int  # counted over the whole run, across stages
    stage: Stage
    train_loss: float
    train_acc: float
    val_loss: float
    val_acc: float
    lr: float  # of the head's parameter group, at the epoch's end
    seconds: float
    images_per_s: float

    CSV_FIELDS = ("epoch", "stage", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds", "images_per_s")

    def to_csv_row(self) -> dict:
        r4 = lambda x: round(x, 4)  # noqa: E731
        return {"epoch": self.epoch, "stage": self.stage.value, "train_loss": r4(self.train_loss),
                "train_acc": r4(self.train_acc), "val_loss": r4(self.val_loss), "val_acc": r4(self.val_acc),
                "lr": f"{self.lr:.3g}", "seconds": round(self.seconds, 3), "images_per_s": round(self.images_per_s, 1)}

    def to_dict(self) -> dict:
        return {**asdict(self), "stage": self.stage.value}

    @classmethod
    def from_dict(cls, d: dict) -> "EpochRecord":
        """Also reads the rows of states written before records were typed (rounded, lr as text)."""
        return cls(int(d["epoch"]), Stage(d["stage"]), float(d["train_loss"]), float(d["train_acc"]),
                   float(d["val_loss"]), float(d["val_acc"]), float(d["lr"]), float(d["seconds"]), float(d["images_per_s"]))


@dataclass
class TrainResult:
    run_dir: Path
    model: Path
    best_val_acc: float
    best_epoch: int
    epochs: int
    classes: list[str]
    num_train: int
    num_val: int
    skipped: list[dict]
    device: str
    seconds: float
    arch: str
    img_size: int
    weights: str
    layout: str
    class_counts: dict[str, int] = field(default_factory=dict)
    imbalanced: bool = False
    stopped_early: bool = False
    plots: list[str] = field(default_factory=list)
    history: list[EpochRecord] = field(default_factory=list)
    read_as: str = ""  # how the folder was read (scan.describe_reading)
    num_test: int = 0
    test_acc: float | None = None  # the saved model on the test split, when DATA has one
    test: dict | None = None  # EvaluationReport.summary() of that measurement
    leakage: list[dict] = field(default_factory=list)  # val/test files with the same bytes as another split's
    near_copies: list[dict] | None = None  # val/test images whose features are a training image's, near enough; None: not compared
    likeness: dict | None = None  # median likeness to the nearest training image: of training images, of val's, of test's
    recipe: dict = field(default_factory=dict)  # the head chosen and the candidates' val figures (recipe.py)
    feature_cache: dict | None = None  # cache.CacheUse.to_dict(): where the features were kept, how many were reused
    val: dict | None = None  # the kept epoch on val: accuracy, per-class figures, confusion matrix, calibration
    suspects: dict | None = None  # suspected label errors in train: how many, the CSV listing them (or why none)
    report: dict | None = None  # report.html: path, bytes, seconds to write
    calibration: dict | None = None  # the temperature and ECE before/after on val (and test)
    unknown: dict | None = None  # the unknown rule stored in the model: threshold, share of val flagged

    def __repr__(self) -> str:  # (the dataclass's printed every epoch and dict: thousands of characters)
        return (f"TrainResult(run_dir={str(self.run_dir)!r}, best_val_acc={self.best_val_acc}, test_acc={self.test_acc}, "
                f"epochs={self.epochs}, classes={self.classes!r})")

    def to_json_dict(self) -> dict:
        """The `--json` object and results.json (the history is in metrics.csv)."""
        d = {k: getattr(self, k) for k in ("best_val_acc", "best_epoch", "epochs", "classes", "num_train", "num_val",
                                            "num_test", "test_acc", "test", "skipped", "device", "seconds", "arch",
                                            "img_size", "weights", "layout", "read_as", "class_counts", "imbalanced",
                                            "leakage", "near_copies", "likeness", "recipe", "feature_cache", "val", "calibration", "unknown", "suspects", "report",
                                            "stopped_early", "plots")}
        return {"run_dir": str(self.run_dir), "model": str(self.model), **d}


@dataclass
class EvaluationReport:
    """A model measured on labelled images (`finetune evaluate`)."""

    model: str
    data: str  # the folder the images came from (DATA/test, DATA/val or DATA)
    accuracy: float
    num_images: int
    classes: list[str]
    per_class: dict[str, dict]  # class -> precision, recall, f1, support
    confusion_matrix: list[list[int]]  # rows: true class, columns: predicted
    most_confused: list[dict]  # {true, predicted, count}, most frequent first
    top_losses: list[dict]  # {path, true, predicted, score, loss}, worst first
    balanced_accuracy: float | None = None  # each class's recall averaged (metrics.balanced_accuracy)
    calibration: dict = field(default_factory=dict)  # metrics.calibration: ECE and the reliability diagram's bins
    skipped: list[dict] = field(default_factory=list)  # {path, reason}
    tta: bool = False
    temperature: float = 1.0  # the model's calibration: probabilities are softmax(logits / temperature)
    unknown: dict | None = None  # the unknown rule on these images: flagged, coverage, accuracy on the accepted ones
    measured: object = field(default=None, repr=False, compare=False)  # report.Measured: every image's probabilities
    report: dict | None = None  # where the HTML report went, its size and writing time (evaluate --report)

    def to_json_dict(self) -> dict:
        return {k: v for k, v in asdict(replace(self, measured=None)).items() if k != "measured"}

    def summary(self) -> dict:
        """The figures without the per-image lists (for a training run's results)."""
        return {k: getattr(self, k) for k in ("accuracy", "balanced_accuracy", "num_images", "per_class", "confusion_matrix",
                                              "calibration", "unknown")}
