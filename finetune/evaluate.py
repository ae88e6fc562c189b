"""Evaluate a trained model on a labelled folder."""

from __future__ import annotations

from pathlib import Path

from .checkpoint import LoadedModel
from .config import PredictConfig
from .data import SPLIT_FOLDER_NAMES, class_folders, find_val_folder, scan_class_tree
from .errors import DataError
from .predict import iter_probabilities
from .progress import Reporter
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


def evaluate(data: Path, loaded: LoadedModel, cfg: PredictConfig, reporter: Reporter | None = None) -> dict:
    import torch

    root = find_eval_root(data)
    paths, labels, skipped = labelled_images(root, loaded.classes)
    kept_paths, kept_labels, probs = [], [], []
    for path, label, (p, reason) in zip(paths, labels, iter_probabilities(paths, loaded, cfg, reporter)):
        if reason is not None:
            skipped.append({"path": str(path), "reason": reason})
            continue
        kept_paths.append(str(path))
        kept_labels.append(label)
        probs.append(p)
    stacked = torch.stack(probs) if probs else torch.empty(0, len(loaded.classes))
    report = classification_report(kept_paths, kept_labels, stacked, loaded.classes)
    return {"model": str(loaded.path), "data": str(root), **report, "skipped": skipped, "tta": cfg.tta}
