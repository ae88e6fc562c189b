"""The figures of a run: learning curves, confusion matrix, reliability diagram.

Made with matplotlib's object API (a `Figure` of its own, no pyplot): the library never
switches the plotting backend or opens a window, so a notebook that calls it keeps its own.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path
from typing import Iterator

from .files import atomic_write_bytes
from .records import EpochRecord, Stage

# Figures whose labels are known in advance get fixed margins: matplotlib's tight_layout measures
# every text first, which took more than half of drawing them (0.88 -> 0.40 s for the three,
# a second of every run and of every training in the test suite). The confusion matrix keeps
# it: its tick labels are the class names, of any length.
FIXED_MARGINS = {
    "curves": {"left": 0.07, "right": 0.98, "bottom": 0.12, "top": 0.92, "wspace": 0.22},
    "square": {"left": 0.17, "right": 0.96, "bottom": 0.11, "top": 0.92},
}


def curves_figure(history: list[EpochRecord]):
    """Loss and accuracy per epoch, train vs val; a line where each later stage (tail, fine-tune) starts."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4), dpi=100)
    ax_loss, ax_acc = fig.subplots(1, 2)
    epochs = [r.epoch for r in history]
    for ax, key, title in ((ax_loss, "loss", "loss"), (ax_acc, "acc", "accuracy")):
        ax.plot(epochs, [getattr(r, f"train_{key}") for r in history], marker=".", label="train")
        ax.plot(epochs, [getattr(r, f"val_{key}") for r in history], marker=".", label="val")
        for stage, style, label in ((Stage.TAIL, "--", "tail starts"), (Stage.FINETUNE, ":", "fine-tune starts")):
            starts = [r.epoch for r in history if r.stage is stage]
            if starts:
                ax.axvline(starts[0] - 0.5, color="grey", linestyle=style, label=label)
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.subplots_adjust(**FIXED_MARGINS["curves"])
    return fig


TICK_CHARS = 24  # a longer class name squeezed the matrix into a corner of its figure


def tick_label(name: str) -> str:
    return plain(name if len(name) <= TICK_CHARS else name[:TICK_CHARS - 1] + "…")


def confusion_figure(cm: list[list[int]], classes: list[str], title: str = "confusion matrix"):
    from matplotlib.figure import Figure

    n = len(classes)
    size = min(4 + 0.5 * n, 20)
    fig = Figure(figsize=(size, size), dpi=100)
    ax = fig.subplots()
    image = ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(n), [tick_label(c) for c in classes], rotation=45, ha="right")
    ax.set_yticks(range(n), [tick_label(c) for c in classes])
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(plain(title))
    top = max((max(row) for row in cm), default=0)
    if n <= 30:
        for t in range(n):
            for p in range(n):
                ax.text(p, t, str(cm[t][p]), ha="center", va="center", color="white" if cm[t][p] > top / 2 else "black")
    else:  # (too many cells for their counts: the colours' scale says them)
        fig.colorbar(image, ax=ax, fraction=0.04, pad=0.02, label="images")
    with fonts_lacking_glyphs_unsaid():
        fig.tight_layout()
    return fig


def reliability_figure(calibration: dict, title: str = "reliability"):
    """Accuracy against confidence per bin (metrics.calibration); the diagonal is perfect calibration."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.5, 4.5), dpi=100)
    ax = fig.subplots()
    bins = calibration["bins"]
    ax.bar([b["lower"] for b in bins], [b["accuracy"] for b in bins], width=[b["upper"] - b["lower"] for b in bins],
           align="edge", edgecolor="black", alpha=0.7, label="accuracy in bin")
    ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], "o", color="tab:orange", markersize=4,
            label="mean confidence in bin")
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfectly calibrated")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (top score)")
    ax.set_ylabel("accuracy")
    ece = calibration["ece"]
    ax.set_title(plain(f"{title}: ECE {ece:.3f}" if ece is not None else title))
    ax.legend(loc="upper left", fontsize="small")
    fig.subplots_adjust(**FIXED_MARGINS["square"])
    return fig


def coverage_figure(distance, correct, threshold: float | None, title: str = "coverage"):
    """Accuracy on the images kept against the share kept, as the distance threshold of the
    unknown rule falls; a dot where the model's threshold is."""
    from matplotlib.figure import Figure

    order = distance.argsort()
    right = correct.float()[order].cumsum(0)
    kept = right.new_tensor(range(1, len(order) + 1))
    fig = Figure(figsize=(4.5, 4.5), dpi=100)
    ax = fig.subplots()
    start = min(20, len(order)) - 1  # the accuracy of a handful of images is noise: from 20 kept images on
    ax.plot((kept / len(order))[start:].tolist(), (right / kept)[start:].tolist(), label="accuracy on the kept images")
    if threshold is not None:
        n = int((distance <= threshold).sum())
        if n:
            ax.plot([n / len(order)], [float(right[n - 1] / n)], "o", color="tab:red", label=f"the model's threshold ({threshold:.2f})")
    ax.set_xlim(0, 1.02)
    ax.set_xlabel("share of images kept (coverage)")
    ax.set_ylabel("accuracy")
    ax.set_title(plain(title))
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize="small")
    fig.subplots_adjust(**FIXED_MARGINS["square"])
    return fig


def plain(text: str) -> str:
    """Text shown as it is: matplotlib reads what stands between two $ as mathematics (a folder name may hold them);
    a name read under a non-UTF-8 locale (its bytes as surrogates, which matplotlib cannot draw: a traceback) as UTF-8."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace").replace("$", r"\$")


def png_bytes(fig) -> bytes:
    buf = io.BytesIO()
    with fonts_lacking_glyphs_unsaid():
        fig.savefig(buf, format="png")
    return buf.getvalue()


@contextlib.contextmanager
def fonts_lacking_glyphs_unsaid() -> Iterator[None]:
    """Matplotlib warns on stderr, once per character, when its font lacks a class name's letters
    (Chinese, say); they show as boxes in the plot, and the report's tables show the names."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Glyph \d+ .* missing from", category=UserWarning)
        yield


def save_png(fig, path: Path) -> Path:
    atomic_write_bytes(path, png_bytes(fig))
    return path
