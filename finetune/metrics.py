"""Metrics of a classifier on labelled images: confusion matrix, per-class precision/recall/F1,
worst mistakes and calibration. Numbers are kept as computed; they are rounded only for display."""

from __future__ import annotations

import torch

ECE_BINS = 15  # the usual number of equal-width confidence bins for the expected calibration error


def confusion_matrix(y_true: list[int], y_pred: list[int], num_classes: int) -> list[list[int]]:
    """cm[t][p]: how many images of true class t were predicted as p."""
    cm = [[0] * num_classes for _ in range(num_classes)]
    for t, p in zip(y_true, y_pred):
        cm[t][p] += 1
    return cm


def accuracy(cm: list[list[int]]) -> float:
    total = sum(map(sum, cm))
    return sum(cm[i][i] for i in range(len(cm))) / total if total else 0.0


def balanced_accuracy(cm: list[list[int]]) -> float | None:
    """The mean of each class's recall over the classes measured: what answering the largest class
    alone would not get (it gets 1 / classes), unlike accuracy on imbalanced images."""
    recalls = [row[i] / sum(row) for i, row in enumerate(cm) if sum(row)]
    return sum(recalls) / len(recalls) if recalls else None


def per_class_metrics(cm: list[list[int]], classes: list[str]) -> dict[str, dict]:
    out = {}
    for i, name in enumerate(classes):
        tp = cm[i][i]
        predicted = sum(row[i] for row in cm)
        support = sum(cm[i])
        if not support:  # (no image of it was measured: its recall is unknown, not 0; None in JSON's null)
            out[name] = {"precision": 0.0 if predicted else None, "recall": None, "f1": None, "support": 0}
            continue
        precision = tp / predicted if predicted else 0.0
        recall = tp / support
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        out[name] = {"precision": precision, "recall": recall, "f1": f1, "support": support}
    return out


def most_confused(cm: list[list[int]], classes: list[str], limit: int = 5) -> list[dict]:
    pairs = [{"true": classes[t], "predicted": classes[p], "count": cm[t][p]}
             for t in range(len(cm)) for p in range(len(cm)) if t != p and cm[t][p]]
    return sorted(pairs, key=lambda d: (-d["count"], d["true"], d["predicted"]))[:limit]


def top_losses(paths: list[str], y_true: list[int], probs: torch.Tensor, classes: list[str], limit: int | None = 10) -> list[dict]:
    """The images the model got most wrong: highest cross-entropy of the true class."""
    if not paths:
        return []
    true_p = probs[torch.arange(len(y_true)), torch.tensor(y_true)].clamp_min(1e-12)
    losses = -true_p.log()
    order = losses.argsort(descending=True)[:limit].tolist()
    return [{"path": paths[i], "true": classes[y_true[i]], "predicted": classes[int(probs[i].argmax())],
             "score": float(probs[i].max()), "loss": float(losses[i])} for i in order]


def calibration(probs: torch.Tensor, y_true: list[int], bins: int = ECE_BINS) -> dict:
    """Expected calibration error (top-label, equal-width bins) and the reliability diagram's bins:
    in each confidence bin, how sure the model was on average and how often it was right."""
    if not len(y_true):
        return {"ece": None, "bins": []}
    confidence, predicted = probs.float().max(1)
    correct = (predicted == torch.tensor(y_true)).float()
    edges = torch.linspace(0, 1, bins + 1)
    which = torch.bucketize(confidence, edges[1:-1])  # bin i holds (edges[i], edges[i+1]]
    ece, rows = 0.0, []
    for i in range(bins):
        inside = which == i
        n = int(inside.sum())
        if not n:
            continue
        conf, acc = float(confidence[inside].mean()), float(correct[inside].mean())
        ece += n / len(y_true) * abs(acc - conf)
        rows.append({"lower": float(edges[i]), "upper": float(edges[i + 1]), "count": n, "confidence": conf, "accuracy": acc})
    return {"ece": ece, "bins": rows}


def classification_report(paths: list[str], y_true: list[int], probs: torch.Tensor, classes: list[str]) -> dict:
    y_pred = probs.argmax(1).tolist() if len(paths) else []
    cm = confusion_matrix(y_true, y_pred, len(classes))
    return {
        "accuracy": accuracy(cm),
        "balanced_accuracy": balanced_accuracy(cm),
        "num_images": len(paths),
        "classes": classes,
        "per_class": per_class_metrics(cm, classes),
        "confusion_matrix": cm,
        "most_confused": most_confused(cm, classes),
        "top_losses": top_losses(paths, y_true, probs, classes),
        "calibration": calibration(probs, y_true),
    }
