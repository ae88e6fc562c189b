"""Batched prediction on files, folders, glob patterns or a list of paths."""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import torch

from .checkpoint import LoadedModel, as_loaded
from .config import PredictConfig, predict_config
from .cpus import usable_cores
from .data import ImageFileDataset, make_loader
from .device import autocast, autocast_dtype, forward_in_chunks, pick_device, threads_within_usable_cores, to_model_input
from .errors import UsageError
from .fold import folded, probe_images
from .progress import Reporter, reporter_or_quiet
from .scan import UNREADABLE_FOLDER, files_not_read, list_images

GLOB_CHARS = set("*?[")


@dataclass
class Prediction:
    path: str
    label: str | None = None  # None when the image is unknown (or could not be read)
    score: float | None = None  # the calibrated probability of the most likely class
    top_k: list[dict] = field(default_factory=list)
    error: str | None = None
    unknown: bool = False  # unlike every class: beyond the model's distance threshold, or under --min-score
    distance: float | None = None  # from the training images (calibration.FeatureDistance); None for older model files

    def to_json_dict(self) -> dict:
        if self.error is not None:
            return {"path": self.path, "error": self.error}
        return {"path": self.path, "label": self.label, "score": self.score, "top_k": self.top_k, "unknown": self.unknown,
                "distance": self.distance}


@dataclass(frozen=True)
class Answer:
    """One image's answer from the model: calibrated probabilities, and its distance from the training images."""

    probs: torch.Tensor
    distance: float | None


def is_unknown(answer: Answer, loaded: LoadedModel, cfg: PredictConfig) -> bool:
    """Whether to answer "unknown": a distance over the threshold (cfg.max_distance, else the
    model's), or a top probability under cfg.min_score; never with cfg.unknown off."""
    if not cfg.unknown:
        return False
    threshold = cfg.max_distance if cfg.max_distance is not None else loaded.distance_threshold
    if threshold is not None and answer.distance is not None and answer.distance > threshold:
        return True
    return cfg.min_score is not None and float(answer.probs.max()) < cfg.min_score


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
        if not raw.strip():  # (Path("") is the current folder, which was read whole)
            items.append(InputItem(raw, "an empty path (an unset shell variable?)"))
        elif p.is_dir():
            skipped: list[dict] = []
            try:
                found = list_images(p, skipped)
            except PermissionError:
                items.append(InputItem(raw, UNREADABLE_FOLDER))
                continue
            items.extend(InputItem(str(f)) for f in found)
            # (a folder inside that may not be read is said, like an unreadable file; other files are not images)
            items.extend(InputItem(s["path"], s["reason"]) for s in skipped if s["reason"] == UNREADABLE_FOLDER)
            if not found:  # (said, rather than dropped: the folder was asked for)
                items.append(InputItem(raw, f"no images in this folder{files_not_read(skipped, p)}"))
        elif p.is_file():
            items.append(InputItem(raw))
        elif p.exists():  # (a FIFO or a device would block the decoder)
            items.append(InputItem(raw, "not a regular file"))
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


def iter_answers(paths: list[Path], loaded: LoadedModel, cfg: PredictConfig, reporter: Reporter | None = None,
                 device: torch.device | None = None) -> Iterator[tuple[Answer | None, str | None]]:
    """For each path, in order: (Answer, None), or (None, reason) when it cannot be read.

    Batched; images are decoded in loader workers while the model computes. Probabilities are
    the softmax of the logits divided by the model's temperature. With `cfg.tta` they are
    averaged with those of the horizontally flipped image. `device`: as picked by the caller (else cfg's).
    """
    reporter = reporter or Reporter()
    cfg = cfg.checked()
    device = device or pick_device(cfg.device)
    amp = autocast_dtype(device)
    model = inference_net(loaded, device)
    n = len(loaded.classes)
    dataset = ImageFileDataset(paths, loaded.preprocessing, cfg.max_pixels)
    loader = make_loader(dataset, cfg.batch_size, cfg.workers, pin_memory=device.type == "cuda")
    reporter.start("Predicting", len(paths))
    cores = usable_cores()  # (read once: cgroup files, affinity)
    for indices, batch, failed in loader:
        by_index: dict[int, tuple] = {i: (None, reason) for i, reason in failed}
        if batch is not None:
            # (no_grad, not inference_mode, and torch's threads within the cores, only around the batch: the
            # caller's code runs between items, with its own settings: inference mode left on there broke its
            # autograd and a later train(), and two iterators read in turn left the thread count lowered)
            with torch.no_grad(), threads_within_usable_cores(cores):
                x = to_model_input(batch[:, 0], device)
                with autocast(device, amp):
                    out = forward_in_chunks(model.logits_and_stages, x, device, amp).float()
                    flipped = forward_in_chunks(model, x.flip(-1), device, amp).float() if cfg.tta else None
                answers = answers_of(out[:, :n], out[:, n:], loaded, flipped)
            by_index.update({i: (a, None) for i, a in zip(indices, answers)})
        for i in sorted(by_index):  # the loader keeps order; failures sit among their batch
            yield by_index[i]
        reporter.advance(len(by_index))
    reporter.finish()  # (not when the caller stops reading early: it may be saying why, a bar then would follow)


def inference_net(loaded: LoadedModel, device: torch.device) -> torch.nn.Module:
    """The loaded model on the device for inference, its BatchNorms folded into their convolutions
    (fold.py); the model file's own module is left as it is."""
    model = loaded.model.to(device).to(memory_format=torch.channels_last).eval()
    return folded(model, probe_images(loaded.preprocessing.img_size, device), lambda net, x: net.logits_and_stages(x))


def answers_of(logits: torch.Tensor, stages: torch.Tensor, loaded: LoadedModel,
               flipped_logits: torch.Tensor | None = None) -> list[Answer]:
    """Answers from the model's logits and every stage's features: the softmax of the logits over
    the model's temperature (averaged with the flipped image's, given those), and the distance."""
    probs = (logits / loaded.temperature).softmax(1)
    if flipped_logits is not None:
        probs = (probs + (flipped_logits / loaded.temperature).softmax(1)) / 2
    far = loaded.distance(stages).tolist() if loaded.distance is not None else [None] * len(probs)
    return [Answer(p, f) for p, f in zip(probs.cpu(), far)]


def answers_from_rows(loaded: LoadedModel, rows: torch.Tensor, device: torch.device | None = None) -> list[Answer]:
    """Answers from rows a feature pass cached (Classifier.rows) instead of from images: the
    model's tail, if it keeps one, runs on their activations, the head on every stage's features,
    on `device` (None: where the rows are) in its precision, as val was measured."""
    model, answers = loaded.model.to(device or rows.device).eval(), []
    with torch.inference_mode():
        for stages in model.stage_chunks(rows, device):
            answers.extend(answers_of(model.logits_of_stages(stages), stages, loaded))
    return answers


def predict(model: LoadedModel | str | Path | None, inputs: Iterable[str | Path] | str | Path, cfg: PredictConfig | None = None,
            reporter: Reporter | None = None) -> Iterator[Prediction]:
    """One Prediction per image, in input order, each as soon as its batch is done (an iterator:
    the model, the settings and the inputs are checked when it is called, the images read as it
    is consumed).

    `inputs`: image files, folders (searched recursively) and glob patterns, as on the
    command line, or one of them; an input that names nothing readable gives a Prediction with
    an error. `model`: a load_model result, or the path of a model file or run folder; None: `cfg.model`,
    else the newest run under `cfg.runs_dir` (given both, `model` is used).
    """
    cfg = predict_config(cfg)
    reporter = reporter_or_quiet(reporter)
    device = pick_device(cfg.device)  # (an absent --device said now: the CSV header once came out before it)
    model = as_loaded(model, cfg.model, cfg.runs_dir)
    items = expand_inputs(str(i) for i in input_list(inputs))
    if not items:
        raise UsageError("no inputs: pass image files, folders, glob patterns, or - to read paths from stdin.")
    return predictions(model, items, cfg, reporter, device)


def input_list(inputs) -> list[str | os.PathLike]:
    """predict's `inputs` as a list of paths: one path is one input (not a sequence of one-letter
    inputs); anything but paths is a UsageError (a number once ended in a TypeError)."""
    if isinstance(inputs, (str, os.PathLike)):
        return [inputs]
    wanted = "inputs: give image files, folders or glob patterns (a path, or a list of them)"
    if isinstance(inputs, (bytes, bytearray)) or not isinstance(inputs, Iterable):
        raise UsageError(f"{wanted}; got {type(inputs).__name__}.")
    listed = list(inputs)
    odd = next((i for i in listed if not isinstance(i, (str, os.PathLike))), None)
    if odd is not None:
        raise UsageError(f"{wanted}; got {type(odd).__name__} among them.")
    return listed


def predictions(model: LoadedModel, items: list[InputItem], cfg: PredictConfig, reporter: Reporter | None,
                device: torch.device) -> Iterator[Prediction]:
    classes = model.classes
    k = min(cfg.top_k, len(classes))
    readable = [Path(item.path) for item in items if item.error is None]
    results = iter_answers(readable, model, cfg, reporter, device)
    for item in items:
        if item.error is not None:
            yield Prediction(item.path, error=item.error)
            continue
        answer, reason = next(results)
        if reason is not None:
            yield Prediction(item.path, error=reason)
            continue
        scores, labels = answer.probs.topk(k)
        top = [{"label": classes[c], "score": round(s, 6)} for s, c in zip(scores.tolist(), labels.tolist())]
        unknown = is_unknown(answer, model, cfg)
        yield Prediction(item.path, None if unknown else top[0]["label"], top[0]["score"], top, unknown=unknown,
                         distance=answer.distance)  # unrounded: what the rule compared
    for _ in results:  # let the loader finish (and the progress bar close)
        pass
