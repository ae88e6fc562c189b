"""Metrics (confusion matrix, per-class precision/recall/F1, worst mistakes) and plots."""

from __future__ import annotations

from pathlib import Path

import torch

from .records import EpochRecord, Stage


def confusion_matrix(y_true: list[int], y_pred: list[int], num_classes: int) -> list[list[int]]:
    """cm[t][p]: how many images of true class t were predicted as p."""
    cm = [[0] * num_classes for _ in range(num_classes)]
    for t, p in zip(y_true, y_pred):
        cm[t][p] += 1
    return cm


def accuracy(cm: list[list[int]]) -> float:
    total = sum(map(sum, cm))
    return sum(cm[i][i] for i in range(len(cm))) / total if total else 0.0


def per_class_metrics(cm: list[list[int]], classes: list[str]) -> dict[str, dict]:
    out = {}
    for i, name in enumerate(classes):
        tp = cm[i][i]
        predicted = sum(row[i] for row in cm)
        support = sum(cm[i])
        precision = tp / predicted if predicted else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        out[name] = {"precision": round(precision, 4), "recall": round(recall, 4), "f1": round(f1, 4), "support": support}
    return out


def most_confused(cm: list[list[int]], classes: list[str], limit: int = 5) -> list[dict]:
    pairs = [{"true": classes[t], "predicted": classes[p], "count": cm[t][p]}
             for t in range(len(cm)) for p in range(len(cm)) if t != p and cm[t][p]]
    return sorted(pairs, key=lambda d: (-d["count"], d["true"], d["predicted"]))[:limit]


def top_losses(paths: list[str], y_true: list[int], probs: torch.Tensor, classes: list[str], limit: int = 10) -> list[dict]:
    """The images the model got most wrong: highest cross-entropy of the true class."""
    if not paths:
        return []
    true_p = probs[torch.arange(len(y_true)), torch.tensor(y_true)].clamp_min(1e-12)
    losses = -true_p.log()
    order = losses.argsort(descending=True)[:limit].tolist()
    return [{"path": paths[i], "true": classes[y_true[i]], "predicted": classes[int(probs[i].argmax())],
             "score": round(float(probs[i].max()), 4), "loss": round(float(losses[i]), 4)} for i in order]


def classification_report(paths: list[str], y_true: list[int], probs: torch.Tensor, classes: list[str]) -> dict:
    y_pred = probs.argmax(1).tolist() if len(paths) else []
    cm = confusion_matrix(y_true, y_pred, len(classes))
    return {
        "accuracy": round(accuracy(cm), 4),
        "num_images": len(paths),
        "classes": classes,
        "per_class": per_class_metrics(cm, classes),
        "confusion_matrix": cm,
        "most_confused": most_confused(cm, classes),
        "top_losses": top_losses(paths, y_true, probs, classes),
    }


# --- plots (matplotlib, headless) -----------------------------------------------------------

def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display needed, and never opens a window
    import matplotlib.pyplot as plt

    return plt


def plot_curves(history: list[EpochRecord], path: Path) -> Path:
    return _save(curves_figure(history), path)


def curves_figure(history: list[EpochRecord]):
    """Loss and accuracy per epoch, train vs val; a dotted line where fine-tuning starts."""
    plt = _pyplot()
    epochs = [r.epoch for r in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    for ax, key, title in ((ax_loss, "loss", "loss"), (ax_acc, "acc", "accuracy")):
        ax.plot(epochs, [getattr(r, f"train_{key}") for r in history], marker=".", label="train")
        ax.plot(epochs, [getattr(r, f"val_{key}") for r in history], marker=".", label="val")
        stage2 = [r.epoch for r in history if r.stage is Stage.FINETUNE]
        if stage2:
            ax.axvline(stage2[0] - 0.5, color="grey", linestyle=":", label="fine-tune starts")
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    return fig


def plot_confusion_matrix(cm: list[list[int]], classes: list[str], path: Path, title: str = "confusion matrix") -> Path:
    plt = _pyplot()
    n = len(classes)
    size = min(4 + 0.5 * n, 20)
    fig, ax = plt.subplots(figsize=(size, size), dpi=100)
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(n), classes, rotation=45, ha="right")
    ax.set_yticks(range(n), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    top = max((max(row) for row in cm), default=0)
    if n <= 30:
        for t in range(n):
            for p in range(n):
                ax.text(p, t, str(cm[t][p]), ha="center", va="center", color="white" if cm[t][p] > top / 2 else "black")
    fig.tight_layout()
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    import io

    from .files import atomic_write_bytes

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    _pyplot().close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path
