"""Measure a trained model on labelled images: a folder (its test or val split as train reads
it), or samples a caller already has (training's test split)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from .checkpoint import LoadedModel, as_loaded
from .config import PredictConfig, predict_config
from .data import Sample, held_out_content_digest, held_out_digest
from .errors import DataError, FinetuneError, UsageError, folder_readable
from .layout import find_layout, sub_folders
from .prediction import Answer, is_unknown, iter_answers
from .progress import Reporter, reporter_or_quiet
from .records import EvaluationReport
from .metrics import classification_report
from .report import Measured
from .scan import TreeReader, drop_duplicates, look_alike_pairs


def find_eval_root(data: Path, layout: str = "auto") -> tuple[Path, bool]:
    """DATA's test split, else its val split (as train would read DATA), else DATA's own class
    folders; and whether it is that last, the folder training itself would read (no held-out folder)."""
    found = find_layout(data, layout)
    for role in ("test", "val"):
        if role in found.splits:
            return found.splits[role], False
    if found.kind != "class folders":
        raise DataError(f"{data}: holds a training split ({found.splits['train']}) but no test or val folder to measure "
                        f"on. Pass a folder of labelled held-out images.")
    return found.root, True


def labelled_images(root: Path, classes: list[str], known: dict[Path, str] | None = None) -> tuple[list[Sample], list[dict]]:
    """Images under root/<class>/, labelled by the model's class order; what is not an image is skipped.
    `known`: the files' hashes, where the folder was just read (held_out_in_training)."""
    folders = [p.name for p in sub_folders(root)]
    if not folders:
        raise DataError(f"{root}: no class folders. Evaluate needs labelled images: {root}/<class>/*.jpg.")
    unknown = [c for c in folders if c not in classes]
    if unknown:
        raise DataError(f"{root}: class folders the model does not know: {', '.join(unknown)} (the model knows: "
                        f"{', '.join(classes)}{look_alike_pairs(unknown, classes, 'rename the folder')}). Remove them or "
                        f"use the right --model.")
    skipped: list[dict] = []
    reader = TreeReader([root / c for c in folders], skipped)
    samples = {"test": [Sample(p, label) for label, c in enumerate(classes) if (root / c).is_dir() for p in reader.images(root / c)]}
    drop_duplicates(samples, classes, skipped, known=known)  # as train reads a split: identical files count once
    if not samples["test"]:
        raise DataError(f"{root}: the class folders hold no images.")
    return samples["test"], skipped


def evaluate(model: LoadedModel | str | Path | None, data: Path | str, cfg: PredictConfig | None = None,
             reporter: Reporter | None = None) -> EvaluationReport:
    """Measure `model` on DATA's test split, else its val split, else DATA's class folders
    (DATA read as `cfg.layout` says, as for training); where the model learnt from these very
    folders and they hold no test or val split, on the val images its training held out.
    `model` as predict() takes it (None: `cfg.model`, else the newest run under `cfg.runs_dir`)."""
    cfg = predict_config(cfg)
    reporter = reporter_or_quiet(reporter)
    model = as_loaded(model, cfg.model, cfg.runs_dir)  # (the Python API also takes a path, or None)
    if not isinstance(data, (str, os.PathLike)):
        raise UsageError(f"data: give the path of a folder of labelled images (got {type(data).__name__}).")
    with folder_readable(data):
        if cfg.labels is not None:
            return evaluate_labelled(model, Path(data), cfg, reporter)
        root, training_folder = find_eval_root(Path(data), cfg.layout)
        held = held_out_in_training(model, Path(data), cfg) if training_folder else None
        if held is not None and held.samples is not None:
            return measure(model, held.samples, cfg, reporter, f"{root} (the val images its training held out)", held.skipped)
        samples, skipped = labelled_images(root, model.classes, held.digests if held else None)
        return measure(model, samples, cfg, reporter, f"{root}{held.note if held else ''}", skipped)


@dataclass
class HeldOut:
    samples: list[Sample] | None  # None: DATA changed since training, which images it held out is not known
    skipped: list[dict]
    note: str = ""  # what the measure's source says of it then
    digests: dict[Path, str] | None = None  # the hashes its reading took: every image is then measured without taking them again


CHANGED_NOTE = (" (every image: it changed since the model learnt from it, so which images its training held out is "
                "not known; the accuracy counts images it learnt from)")


def held_out_in_training(model: LoadedModel, data: Path, cfg: PredictConfig) -> HeldOut | None:
    """The val images the model's training held out of DATA (its `trained_on` says it learnt from
    DATA, with the same labels file), read again as training read it (its seed, val share, layout
    and labels), labelled in the model's class order. None when the model learnt from elsewhere
    (or its file is older than `trained_on`); no samples when reading DATA again finds other val
    images than training had (files added or removed since). Measuring all of DATA would count
    the images the model learnt from. A copy of that folder elsewhere (moved, copied) is known by
    the same held-out files, named relative to it: read as training read it, it is measured the same."""
    from .reading import scan_dataset

    source, tc = model.meta.get("trained_on"), model.meta.get("train_config") or {}
    if not source or not _same_file(cfg.labels, source.get("labels")):
        return None
    same_place = Path(source["data"]) == data.resolve()
    labels = source.get("labels")
    try:
        split = scan_dataset(data, tc.get("val_split"), int(tc.get("seed", 0)), cfg.layout if cfg.layout != "auto" else
                             tc.get("layout") or "auto", Path(labels) if labels else None, cfg.label_columns or tc.get("label_columns"))
    except FinetuneError:
        if same_place:
            raise
        return None  # (another folder, not readable as training read its own: measured as it is)
    index = {c: i for i, c in enumerate(model.classes)}
    same_files = held_out_digest(split, data) == source.get("val_digest") and (
        same_place or held_out_content_digest(split) == source.get("val_content"))  # (elsewhere: the same bytes too)
    if any(c not in index for c in split.classes) or not same_files:
        return HeldOut(None, [], CHANGED_NOTE if same_place else "", {s.path: s.digest for s in split.train + split.val + split.test})
    return HeldOut([Sample(s.path, index[split.classes[s.label]]) for s in split.val], split.skipped)


def _same_file(given: Path | None, recorded: str | None) -> bool:
    """Whether the labels file given to evaluate is the one training read (both none counts)."""
    return (given is None) == (recorded is None) and (given is None or Path(given).resolve() == Path(recorded))


def evaluate_labelled(model: LoadedModel, data: Path, cfg: PredictConfig, reporter: Reporter | None) -> EvaluationReport:
    """With a labels CSV: its test rows, else its val rows, else all its rows."""
    from .labels import read_labels_csv

    skipped: list[dict] = []
    found = read_labels_csv(data, cfg.labels, cfg.label_columns, skipped)
    role = next((r for r in ("test", "val") if found.rows.get(r)), None)
    held = held_out_in_training(model, data, cfg) if role is None else None  # (no split column)
    if held is not None and held.samples is not None:
        return measure(model, held.samples, cfg, reporter, f"{cfg.labels} (the val rows its training held out)", held.skipped)
    rows = found.rows[role] if role else [row for rows in found.rows.values() for row in rows]
    unknown = sorted({label for _, label in rows} - set(model.classes))
    if unknown:
        raise DataError(f"{cfg.labels}: labels the model does not know: {', '.join(unknown[:5])} (the model knows: "
                        f"{', '.join(model.classes)}). Remove those rows or use the right --model.")
    if not rows:
        raise DataError(f"{cfg.labels}: no rows whose image file was found in {data}.")
    index = {c: i for i, c in enumerate(model.classes)}
    samples = sorted((Sample(p, index[label]) for p, label in rows), key=lambda s: str(s.path))
    return measure(model, samples, cfg, reporter, f"{cfg.labels} ({role or 'all'} rows){held.note if held else ''}", skipped)


def measure(model: LoadedModel, samples: list[Sample], cfg: PredictConfig, reporter: Reporter | None,
            source: str, skipped: list[dict] | None = None, given: Iterable | None = None) -> EvaluationReport:
    """Accuracy, per-class figures, confusion matrix and worst mistakes of `model` on `samples`;
    images that cannot be read are added to `skipped`. `given`: each sample's (Answer, None) or
    (None, reason) when the caller has them (training's test split, from cached features)."""
    import torch

    skipped = list(skipped or [])
    paths = [s.path for s in samples]
    kept_paths, kept_labels, answers = [], [], []
    results = list(given if given is not None else iter_answers(paths, model, cfg, reporter))  # (to its end: its progress closed)
    for sample, (answer, reason) in zip(samples, results, strict=True):
        if reason is not None:
            skipped.append({"path": str(sample.path), "reason": reason})
            continue
        kept_paths.append(str(sample.path))
        kept_labels.append(sample.label)
        answers.append(answer)
    stacked = torch.stack([a.probs for a in answers]) if answers else torch.empty(0, len(model.classes))
    metrics = classification_report(kept_paths, kept_labels, stacked, model.classes)
    distance = torch.tensor([a.distance for a in answers]) if answers and answers[0].distance is not None else None
    flagged = [is_unknown(a, model, cfg) for a in answers]
    return EvaluationReport(model=str(model.path), data=source, **metrics, skipped=skipped, tta=cfg.tta,
                            temperature=model.temperature, unknown=unknown_figures(answers, kept_labels, flagged, model, cfg),
                            measured=Measured(source, kept_paths, kept_labels, stacked, distance,
                                              torch.tensor(flagged, dtype=torch.bool)))


def unknown_figures(answers: list[Answer], labels: list[int], flagged: list[bool], model: LoadedModel,
                    cfg: PredictConfig) -> dict:
    """What the unknown rule did on these labelled images (`flagged`, image by image): how many it
    flags, and the accuracy on the ones it accepts (coverage = accepted / all)."""
    accepted = [int(a.probs.argmax()) == y for a, y, f in zip(answers, labels, flagged) if not f]
    threshold = cfg.max_distance if cfg.max_distance is not None else model.distance_threshold
    no_rule = threshold is None and cfg.min_score is None  # (a model whose run has not finished has none yet)
    return {"rule": "off" if not cfg.unknown or no_rule else {"max_distance": threshold, "min_score": cfg.min_score},
            "flagged": sum(flagged), "coverage": len(accepted) / len(answers) if answers else None,
            "accuracy_on_accepted": sum(accepted) / len(accepted) if accepted else None}
