"""Batched prediction on files, folders, glob patterns or a list of paths."""

from __future__ import annotations

import glob
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import torch

from .checkpoint import LoadedModel, load_model, resolve_model_path
from .config import PredictConfig
from .data import ImageFileDataset, make_loader, walk_files
from .device import autocast, autocast_dtype, pick_device, to_model_input
from .errors import UsageError
from .progress import Reporter

GLOB_CHARS = set("*?[")


@dataclass
class Prediction:
    path: str
    label: str | None = None
    score: float | None = None
    top_k: list[dict] = field(default_factory=list)
    error: str | None = None

    def to_json_dict(self) -> dict:
        if self.error is not None:
            return {"path": self.path, "error": self.error}
        return {"path": self.path, "label": self.label, "score": self.score, "top_k": self.top_k}


@dataclass
class InputItem:
    path: str
    error: str | None = None  # set when the input names nothing we can read


def expand_inputs(inputs: Iterable[str]) -> list[InputItem]:
    """Files as given; folders recursively (sorted, image files only); glob patterns expanded.

    An input that matches nothing becomes an item with an error, so it is reported in the
    output rather than silently dropped.
    """
    items: list[InputItem] = []
    for raw in inputs:
        p = Path(raw)
        if p.is_dir():
            images, _others = walk_files(p)
            items.extend(InputItem(str(f)) for f in images)
        elif p.exists():
            items.append(InputItem(raw))
        elif GLOB_CHARS & set(raw):
            matches = sorted(glob.glob(raw, recursive=True))
            files = [m for m in matches if Path(m).is_file()]
            items.extend(InputItem(m) for m in files) if files else items.append(InputItem(raw, "no files match this pattern"))
        else:
            items.append(InputItem(raw, "file not found"))
    return items


def read_path_list(lines: Iterable[str]) -> list[str]:
    """`-` on the command line: newline-separated paths on stdin (blank lines ignored)."""
    return [line.rstrip("\r\n") for line in lines if line.strip()]


def validate_config(cfg: PredictConfig) -> None:
    if cfg.top_k < 1:
        raise UsageError(f"--top-k must be at least 1 (got {cfg.top_k}).")
    if cfg.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1 (got {cfg.batch_size}).")


def open_model(cfg: PredictConfig) -> LoadedModel:
    return load_model(resolve_model_path(cfg.model, cfg.runs_dir))


def predict(cfg: PredictConfig, items: list[InputItem], loaded: LoadedModel,
            reporter: Reporter | None = None) -> Iterator[Prediction]:
    """Yield one Prediction per item, in input order, as soon as its batch is done."""
    reporter = reporter or Reporter()
    validate_config(cfg)
    device = pick_device(cfg.device)
    amp = autocast_dtype(device)
    model = loaded.model.to(device).to(memory_format=torch.channels_last).eval()
    classes = loaded.classes
    k = min(cfg.top_k, len(classes))
    readable = [i for i, item in enumerate(items) if item.error is None]
    dataset = ImageFileDataset([Path(items[i].path) for i in readable], loaded.preprocessing, cfg.max_pixels)
    loader = make_loader(dataset, cfg.batch_size, cfg.workers, pin_memory=device.type == "cuda")
    results: dict[int, Prediction] = {}
    next_out = 0
    reporter.start("Predicting", len(readable))
    with torch.inference_mode():
        for indices, batch, failed in loader:
            for j, reason in failed:
                results[readable[j]] = Prediction(items[readable[j]].path, error=reason)
            if batch is not None:
                with autocast(device, amp):
                    logits = model(to_model_input(batch[:, 0], device))
                probs = logits.float().softmax(1).cpu()
                scores, labels = probs.topk(k, dim=1)
                for j, s_row, l_row in zip(indices, scores.tolist(), labels.tolist()):
                    top = [{"label": classes[c], "score": round(s, 6)} for s, c in zip(s_row, l_row)]
                    results[readable[j]] = Prediction(items[readable[j]].path, top[0]["label"], top[0]["score"], top)
            reporter.advance(len(indices) + len(failed))
            # Emit in input order: inputs that needed no decoding (errors) are filled as we pass them.
            while next_out < len(items) and (next_out in results or items[next_out].error is not None):
                item = items[next_out]
                yield results.pop(next_out) if next_out in results else Prediction(item.path, error=item.error)
                next_out += 1
    while next_out < len(items):  # trailing inputs that were errors from the start
        item = items[next_out]
        yield results.pop(next_out) if next_out in results else Prediction(item.path, error=item.error)
        next_out += 1
    reporter.finish()
