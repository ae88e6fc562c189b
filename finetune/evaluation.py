"""Evaluate a trained model on a labelled folder."""

from __future__ import annotations

from pathlib import Path

from .checkpoint import LoadedModel
from .config import PredictConfig
from .data import SPLIT_FOLDER_NAMES, class_folders, find_val_folder, scan_class_tree
from .errors import DataError
from .prediction import iter_probabilities
from .progress import Reporter
from .records import EvaluationReport
from .report import classification_report


def find_eval_root(data: Path) -> Path:
    """DATA/test or DATA/val (first found), else DATA itself as a folder of class folders."""
    if not data.is_dir():
        raise DataError(f"{data}: no such folder. Give a folder of class folders, or one with a test/ or val/ folder.")
    return find_val_folder(data, SPLIT_FOLDER_NAMES) or data


def labelled_images(root: Path, classes: list[str]) -> tuple[list[Path], list[int], list[dict]]:
    """Images under root/<class>/, labelled by the model's class order; non-images are skipped."""
    folders = [p.name for p in class_folders(root)]
    if not folders:
        raise DataError(f"{root}: no class folders. Evaluate needs labelled images: {root}/<class>/*.jpg.")
    unknown = [c for c in folders if c not in classes]
    if unknown:
        raise DataError(f"{root}: class folders the model does not know: {', '.join(unknown)} (the model knows: {', '.join(classes)}). Remove them or use the right --model.")
    skipped: list[dict] = []
    samples = scan_class_tree(root, classes, skipped)
    if not samples:
        raise DataError(f"{root}: the class folders hold no images.")
    return [s.path for s in samples], [s.label for s in samples], skipped


def evaluate(model: LoadedModel, data: Path | str, cfg: PredictConfig | None = None,
             reporter: Reporter | None = None) -> EvaluationReport:
    """Measure `model` on labelled images: DATA/test or DATA/val if there is one, else DATA's class folders."""
    import torch

    cfg = cfg or PredictConfig()
    root = find_eval_root(Path(data))
    paths, labels, skipped = labelled_images(root, model.classes)
    kept_paths, kept_labels, probs = [], [], []
    for path, label, (p, reason) in zip(paths, labels, iter_probabilities(paths, model, cfg, reporter)):
        if reason is not None:
            skipped.append({"path": str(path), "reason": reason})
            continue
        kept_paths.append(str(path))
        kept_labels.append(label)
        probs.append(p)
    stacked = torch.stack(probs) if probs else torch.empty(0, len(model.classes))
    metrics = classification_report(kept_paths, kept_labels, stacked, model.classes)
    return EvaluationReport(model=str(model.path), data=str(root), **metrics, skipped=skipped, tta=cfg.tta)
