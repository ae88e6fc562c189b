"""One self-contained HTML report of a model on labelled images: `report.html` in every run
folder, and `finetune evaluate DATA --report FILE.html`.

One file, no network: CSS inline, plots and thumbnails embedded as data URIs (small JPEGs, so
a report over thousands of images stays a few MB), no JavaScript. Each off-diagonal cell of a
confusion matrix links to the thumbnails of its images.
"""

from __future__ import annotations

import base64
import datetime
import io
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch

from .calibration import uncalibrated
from .files import atomic_write_text
from .images import load_rgb
from .metrics import ECE_BINS, calibration, classification_report, top_losses
from .plots import coverage_figure, curves_figure, png_bytes, reliability_figure
from .records import EpochRecord

THUMB_SIDE = 128  # px, the longer side of a thumbnail
THUMB_QUALITY = 70
TOP_LOSSES_SHOWN = 24
SUSPECTS_SHOWN = 48
THUMBS_PER_CELL = 60  # beyond this, a cell's images are listed by path only (keeps the file a few MB)


@dataclass
class Measured:
    """A model's answers on one labelled set, image by image."""

    name: str  # "val", "test", or where the images came from
    paths: list[str]
    labels: list[int]
    probs: torch.Tensor  # [images, classes]
    distance: torch.Tensor | None = None  # [images], from the training images (calibration.FeatureDistance), when known
    flagged: torch.Tensor | None = None  # [images] bool: answered unknown (None: by the model's threshold on `distance`)


@dataclass
class ReportContent:
    """Everything a report shows; report.py turns it into HTML."""

    title: str
    classes: list[str]
    summary: list[tuple[str, str]]  # (what, value) rows, in order
    sets: list[Measured]
    class_counts: dict[str, list[int]] = field(default_factory=dict)  # split -> images per class
    history: list[EpochRecord] = field(default_factory=list)
    suspects: list[dict] | None = None  # {path, given, suggested, probability}; None: not computed
    suspects_note: str = ""  # how they were found, or why not
    skipped: list[dict] = field(default_factory=list)
    settings: dict = field(default_factory=dict)
    temperature: float = 1.0  # the model's calibration: the sets' probabilities are softmax(logits / temperature)
    distance_threshold: float | None = None  # the model's unknown rule
    curves_png: bytes | None = None  # the learning curves already drawn (the run's curves.png)
    tta: bool = False  # the sets' probabilities average the image's and its mirror's


def thumbnail_uri(path: str, max_pixels: int) -> str | None:
    """A small JPEG of the image as a data URI; None when it cannot be read (any more)."""
    try:
        image = load_rgb(Path(path), max_pixels, min_side=THUMB_SIDE)
    except Exception:  # noqa: BLE001 - a report shows what it can; the image is listed by path anyway
        return None
    image.thumbnail((THUMB_SIDE, THUMB_SIDE))
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=THUMB_QUALITY)
    return data_uri(buf.getvalue(), "image/jpeg")


def png_uri(fig) -> str:
    return data_uri(png_bytes(fig), "image/png")


def data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode("ascii")


class Thumbnails:
    """Each image's thumbnail made once, however many galleries show it."""

    def __init__(self, max_pixels: int):
        self.max_pixels, self.made = max_pixels, {}

    def __call__(self, path: str) -> str | None:
        if path not in self.made:
            self.made[path] = thumbnail_uri(path, self.max_pixels)
        return self.made[path]


def set_view(m: Measured, content: ReportContent, thumbs: Thumbnails) -> dict:
    """What the report shows of one measured set: metrics, the confusion matrix with its cells'
    images, the top losses and calibration."""
    classes = content.classes
    metrics = classification_report(m.paths, m.labels, m.probs, classes)
    pred = m.probs.argmax(1).tolist() if m.paths else []
    slug = "".join(ch if ch.isalnum() else "-" for ch in m.name.lower()) or "set"
    mistakes: dict[tuple[int, int], list[int]] = {}  # (true, predicted) -> images: one pass, whatever the class count
    for i, (t, p) in enumerate(zip(m.labels, pred)):
        if t != p:
            mistakes.setdefault((t, p), []).append(i)
    cells = []
    for (t, p), members in sorted(mistakes.items()):
        members.sort(key=lambda i: -float(m.probs[i, p]))
        images = [image_view(m.paths[i], classes[t], classes[p], float(m.probs[i, p]), thumbs) for i in members[:THUMBS_PER_CELL]]
        cells.append({"id": f"{slug}-true{t}-pred{p}", "true": classes[t], "predicted": classes[p], "images": images,
                      "more": [m.paths[i] for i in members[THUMBS_PER_CELL:]]})
    losses = metrics["top_losses"] = _top_losses(m, classes, thumbs)
    cal = metrics["calibration"]
    # Undoing the temperature assumes one scaled softmax: not so for an average of two (test-time augmentation).
    before = (calibration(uncalibrated(m.probs, content.temperature), m.labels)["ece"]
              if m.paths and content.temperature != 1.0 and not content.tta else None)
    return {"ece_before": before, "coverage": coverage_view(m, pred, content.distance_threshold), "name": m.name,
            "slug": slug, "metrics": metrics, "cells": cells, "cell_ids": {(c["true"], c["predicted"]): c["id"] for c in cells},
            "top_losses": losses, "reliability": png_uri(reliability_figure(cal, m.name)) if cal["bins"] else None}


def coverage_view(m: Measured, pred: list[int], threshold: float | None) -> dict | None:
    """The unknown rule on this set: how many it flags, accuracy on the rest, and the trade-off plot."""
    if m.distance is None or not m.paths:
        return None
    correct = torch.tensor(pred) == torch.tensor(m.labels)
    if m.flagged is not None:  # what the rule said image by image (evaluate's options included)
        kept = ~m.flagged
    else:
        kept = m.distance <= threshold if threshold is not None else torch.ones(len(correct), dtype=torch.bool)
    return {"flagged": int((~kept).sum()), "accuracy_kept": float(correct[kept].float().mean()) if kept.any() else None,
            "coverage": float(kept.float().mean()), "plot": png_uri(coverage_figure(m.distance, correct, threshold, m.name))}


def _top_losses(m: Measured, classes: list[str], thumbs: Thumbnails) -> list[dict]:
    return [{**row, **image_view(row["path"], row["true"], row["predicted"], row["score"], thumbs)}
            for row in top_losses(m.paths, m.labels, m.probs, classes, TOP_LOSSES_SHOWN)]


def image_view(path: str, true: str, predicted: str, probability: float, thumbs: Thumbnails) -> dict:
    return {"path": path, "name": Path(path).name, "true": true, "predicted": predicted, "probability": probability,
            "thumb": thumbs(path)}


def render(content: ReportContent, max_pixels: int) -> str:
    from jinja2 import Environment, StrictUndefined

    thumbs = Thumbnails(max_pixels)
    sets = [set_view(m, content, thumbs) for m in content.sets]
    suspects = [{**s, **image_view(s["path"], s["given"], s["suggested"], s["probability"], thumbs)}
                for s in (content.suspects or [])[:SUSPECTS_SHOWN]]
    env = Environment(autoescape=True, undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    template = env.from_string(resources.files("finetune").joinpath("templates/report.html.j2").read_text("utf-8"))
    return template.render(
        c=content, sets=sets, ece_bins=ECE_BINS, suspects=suspects, num_suspects=len(content.suspects or []),
        curves=curves_uri(content),
        written=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    )


def curves_uri(content: ReportContent) -> str | None:
    """The learning curves: the run's curves.png when it is there (drawn once), else drawn now."""
    if content.curves_png is not None:
        return data_uri(content.curves_png, "image/png")
    return png_uri(curves_figure(content.history)) if content.history else None


def write_report(path: Path, content: ReportContent, max_pixels: int) -> dict:
    """Write the report; returns where, its size and how long it took."""
    started = time.perf_counter()
    html = render(content, max_pixels)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, html)
    return {"path": str(path), "bytes": path.stat().st_size, "seconds": time.perf_counter() - started}

