"""Batched prediction on files, folders, glob patterns or a list of paths."""

from __future__ import annotations

import glob
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import torch

from .checkpoint import LoadedModel
from .config import PredictConfig
from .data import ImageFileDataset, make_loader
from .device import autocast, autocast_dtype, forward_in_chunks, pick_device, to_model_input
from .errors import UsageError
from .progress import Reporter
from .scan import list_images

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
            items.extend(InputItem(str(f)) for f in list_images(p))
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


def iter_probabilities(paths: list[Path], loaded: LoadedModel, cfg: PredictConfig,
                       reporter: Reporter | None = None) -> Iterator[tuple[torch.Tensor | None, str | None]]:
    """For each path, in order: (class probabilities, None), or (None, reason) when it cannot be read.

    Batched; images are decoded in loader workers while the model computes. With
    `cfg.tta` the probabilities are averaged with those of the horizontally flipped image.
    """
    reporter = reporter or Reporter()
    cfg = cfg.checked()
    device = pick_device(cfg.device)
    amp = autocast_dtype(device)
    model = loaded.model.to(device).to(memory_format=torch.channels_last).eval()
    dataset = ImageFileDataset(paths, loaded.preprocessing, cfg.max_pixels)
    loader = make_loader(dataset, cfg.batch_size, cfg.workers, pin_memory=device.type == "cuda")
    reporter.start("Predicting", len(paths))
    with torch.inference_mode():
        for indices, batch, failed in loader:
            by_index: dict[int, tuple] = {i: (None, reason) for i, reason in failed}
            if batch is not None:
                x = to_model_input(batch[:, 0], device)
                with autocast(device, amp):
                    probs = forward_in_chunks(model, x, device).float().softmax(1)
                    if cfg.tta:
                        probs = (probs + forward_in_chunks(model, x.flip(-1), device).float().softmax(1)) / 2
                by_index.update({i: (p, None) for i, p in zip(indices, probs.cpu())})
            for i in sorted(by_index):  # the loader keeps order; failures sit among their batch
                yield by_index[i]
            reporter.advance(len(by_index))
    reporter.finish()


def predict(model: LoadedModel, inputs: Iterable[str | Path], cfg: PredictConfig | None = None,
            reporter: Reporter | None = None) -> Iterator[Prediction]:
    """One Prediction per image, in input order, each as soon as its batch is done.

    `inputs`: image files, folders (searched recursively) and glob patterns, as on the
    command line; an input that names nothing readable gives a Prediction with an error.
    """
    cfg = cfg or PredictConfig()
    items = expand_inputs(str(i) for i in inputs)
    if not items:
        raise UsageError("no inputs: pass image files, folders, glob patterns, or - to read paths from stdin.")
    classes = model.classes
    k = min(cfg.top_k, len(classes))
    readable = [Path(item.path) for item in items if item.error is None]
    results = iter_probabilities(readable, model, cfg, reporter)
    for item in items:
        if item.error is not None:
            yield Prediction(item.path, error=item.error)
            continue
        probs, reason = next(results)
        if reason is not None:
            yield Prediction(item.path, error=reason)
            continue
        scores, labels = probs.topk(k)
        top = [{"label": classes[c], "score": round(s, 6)} for s, c in zip(scores.tolist(), labels.tolist())]
        yield Prediction(item.path, top[0]["label"], top[0]["score"], top)
    for _ in results:  # let the loader finish (and the progress bar close)
        pass
