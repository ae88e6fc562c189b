"""The command line: build a config, call the library, render the result.

Results go to stdout; progress, warnings and errors go to stderr. This is the only module
that imports typer or rich, and the only one that prints.
"""

from __future__ import annotations

import csv
import json
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from . import __version__
from .config import PredictConfig, TrainConfig
from .errors import FinetuneError, UsageError
from .progress import Reporter

app = typer.Typer(
    help="Train an image classifier from a folder of labelled images, then predict with it.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
)
stdout = Console(soft_wrap=True)
stderr = Console(stderr=True, soft_wrap=True)

TRAIN = TrainConfig()
PREDICT = PredictConfig()
FORMATS = ("table", "json", "jsonl", "csv")


class RichReporter(Reporter):
    """Progress bars and messages on stderr; silent but for warnings when quiet."""

    def __init__(self, console: Console, quiet: bool = False):
        self.console, self.quiet = console, quiet
        self.progress: Progress | None = None
        self.task = None

    def start(self, description, total):
        if self.quiet:
            return
        self.progress = Progress(
            SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[figures]}"), TimeElapsedColumn(), console=self.console,
        )
        self.progress.start()
        self.task = self.progress.add_task(description, total=total, figures="")

    def advance(self, steps=1, **fields):
        if self.progress is not None:
            figures = "  ".join(f"{k.replace('_', ' ')} {v}" for k, v in fields.items())
            self.progress.update(self.task, advance=steps, figures=figures)

    def finish(self):
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def epoch(self, row):
        if not self.quiet and row["stage"] != "head":  # head epochs take milliseconds: the bar is enough
            self.console.print(Text(f"epoch {row['epoch']} ({row['stage']}): loss {row['train_loss']} acc {row['train_acc']}"
                                    f"  val loss {row['val_loss']} val acc {row['val_acc']}  {row['images_per_s']} img/s"))

    def info(self, message):
        if not self.quiet:
            self.console.print(Text(message, style="dim"))

    def warn(self, message):
        self.console.print(Text("warning: ", style="yellow") + Text(message))


def fail(error: FinetuneError) -> typer.Exit:
    rank = os.environ.get("RANK")
    if rank is not None:  # a torchrun rank: its error also goes where torchrun and our launcher read it
        from .distributed import LAUNCHED_ENV, record_rank_error

        recorded = record_rank_error(error)
        if recorded and os.environ.get(LAUNCHED_ENV):  # under `train --devices`, the launcher prints the one cause
            return typer.Exit(error.exit_code)
    if error.silent:  # a rank stopped by another's failure, which that one reports
        pass
    elif rank in (None, "0"):
        say_error(str(error))
    elif error.rank_specific:  # under torchrun most errors are the same on every rank
        say_error(str(error), rank)
    return typer.Exit(error.exit_code)


def say_error(message: str, rank=None) -> None:
    where = "" if rank is None else f" (rank {rank})"
    stderr.print(Text(f"error{where}: ", style="bold red") + Text(message))


def open_model_or_newest(model: Path | None, runs_dir: Path, reporter: Reporter | None = None):
    """Load --model, or the newest run's model and say which on stderr."""
    from .checkpoint import open_model

    loaded = open_model(model, runs_dir)
    if model is None and reporter is not None:
        reporter.info(f"using the newest model: {loaded.path}")
    return loaded


def version_callback(value: bool):
    if value:
        stdout.print(f"finetune {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[Optional[bool], typer.Option("--version", callback=version_callback, is_eager=True, help="Show the version and exit.")] = None,
):
    """Train an image classifier from a folder of labelled images, then predict with it.

    Example: finetune train ./photos && finetune predict new.jpg
    """


@app.command()
def train(
    data: Annotated[Optional[Path], typer.Argument(help="Image folder: DATA/train/<class>/ + DATA/val/<class>/, or DATA/<class>/ to split.", show_default=False)] = None,
    arch: Annotated[str, typer.Option(help="Backbone, e.g. resnet18, resnet50, efficientnet_lite0 (offline weights).")] = TRAIN.arch,
    weights: Annotated[Optional[Path], typer.Option(help="Start from this state dict (.pth/.safetensors) or finetune model file instead of ImageNet weights from the cache/download.")] = TRAIN.weights,
    pretrained: Annotated[bool, typer.Option("--pretrained/--no-pretrained", help="Start from ImageNet weights (--no-pretrained: random init).")] = TRAIN.pretrained,
    epochs: Annotated[int, typer.Option(help="Epochs of the head on the frozen backbone (fast: features are computed once).")] = TRAIN.epochs,
    finetune_epochs: Annotated[Optional[int], typer.Option(help="Then fine-tune the whole network for this many epochs (0: keep the backbone frozen).", show_default=str(TRAIN.finetune_epochs))] = None,
    freeze_backbone: Annotated[Optional[bool], typer.Option("--freeze-backbone/--no-freeze-backbone", help="Fixed feature extractor (default) vs whole-network fine-tuning (--no-freeze-backbone: 5 fine-tune epochs unless --finetune-epochs says).", show_default=False)] = None,
    views: Annotated[int, typer.Option(help="Augmented views per training image for the frozen-backbone features.")] = TRAIN.views,
    batch_size: Annotated[int, typer.Option(help="Images per batch.")] = TRAIN.batch_size,
    lr: Annotated[float, typer.Option(help="Learning rate of the head (AdamW); the backbone gets lr x 0.1 when fine-tuned.")] = TRAIN.lr,
    img_size: Annotated[Optional[int], typer.Option(help="Training crop size in pixels (default: the arch's own, e.g. 224 for resnet, 288 for efficientnet_lite0).", show_default=False)] = TRAIN.img_size,
    val_split: Annotated[float, typer.Option(help="Fraction of each class held out for validation when DATA has no val/ folder.")] = TRAIN.val_split,
    seed: Annotated[int, typer.Option(help="Seed for the split, augmentation and initialisation.")] = TRAIN.seed,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | mps (auto: CUDA, then MPS, then CPU).")] = TRAIN.device,
    workers: Annotated[Optional[int], typer.Option(help="Image-loading processes (default: cores - 1, at most 8, shared among the ranks under torchrun; 0 loads in the main process).", show_default=False)] = TRAIN.workers,
    runs_dir: Annotated[Path, typer.Option(help="Where run folders are created.")] = TRAIN.runs_dir,
    name: Annotated[Optional[str], typer.Option(help="Run folder name (default 'train'; numbered if taken, never overwritten).", show_default=False)] = TRAIN.name,
    patience: Annotated[int, typer.Option(help="Early stopping: end a stage after N epochs without a better val accuracy (0: off).")] = TRAIN.patience,
    class_weights: Annotated[bool, typer.Option("--class-weights", help="Weight the loss by inverse class frequency, for imbalanced folders.")] = TRAIN.class_weights,
    label_smoothing: Annotated[float, typer.Option(help="Label smoothing of the cross-entropy loss (0: off).")] = TRAIN.label_smoothing,
    max_images_per_class: Annotated[Optional[int], typer.Option(help="Quick trials: use at most N images per class (train and val, seeded choice).", show_default=False)] = TRAIN.max_images_per_class,
    max_pixels: Annotated[int, typer.Option(help="Images with more pixels are skipped as possible decompression bombs.")] = TRAIN.max_pixels,
    resume: Annotated[Optional[Path], typer.Option(help="Continue an interrupted run folder from its last completed epoch (its own settings are used).", show_default=False)] = None,
    devices: Annotated[Optional[int], typer.Option(help="Train with N processes on this machine (one per GPU; CPU: gloo), via torchrun and DistributedDataParallel.", show_default=False)] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object with the results on stdout.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress output on stderr (warnings still shown).")] = False,
):
    """Train a classifier on an image folder.

    Example: finetune train ./photos --arch efficientnet_lite0 --json
    """
    if devices is not None and "WORLD_SIZE" not in os.environ:
        from .launcher import launch, strip_devices_option

        if devices < 1:
            raise fail(UsageError(f"--devices must be at least 1 (got {devices})."))
        if "train" not in sys.argv:
            raise fail(UsageError("--devices: run it as 'finetune train DATA --devices N'."))
        outcome = launch(devices, strip_devices_option(sys.argv[sys.argv.index("train") + 1:]))
        if outcome.message:
            say_error(outcome.message, outcome.rank)
        raise typer.Exit(outcome.exit_code)
    if data is None and resume is None:
        raise fail(UsageError("missing DATA: give an image folder (finetune train ./photos), or --resume RUN_FOLDER."))
    if finetune_epochs is None:
        finetune_epochs = 5 if freeze_backbone is False else TRAIN.finetune_epochs
    elif freeze_backbone and finetune_epochs > 0:
        raise fail(UsageError("--freeze-backbone and --finetune-epochs > 0 contradict each other; pass one of them."))
    cfg = replace(TRAIN, data=data or Path("."), arch=arch, weights=weights, pretrained=pretrained, epochs=epochs,
                  finetune_epochs=finetune_epochs, views=views, batch_size=batch_size, lr=lr, img_size=img_size,
                  val_split=val_split, seed=seed, device=device, workers=workers, runs_dir=runs_dir, name=name,
                  max_pixels=max_pixels, resume=resume, patience=patience, class_weights=class_weights,
                  label_smoothing=label_smoothing, max_images_per_class=max_images_per_class)
    from .train import train as run_training  # imported late: keeps --help fast

    try:
        result = run_training(cfg, RichReporter(stderr, quiet))
    except FinetuneError as e:
        raise fail(e)
    if result is None:  # a torchrun rank other than 0: rank 0 reports
        return
    if json_out:
        typer.echo(json.dumps(result.to_json_dict()))
        return
    stdout.print(Text(f"best val acc {result.best_val_acc:.4f} (epoch {result.best_epoch} of {result.epochs}), "
                      f"{result.num_train} train / {result.num_val} val images, {len(result.classes)} classes, {result.seconds:.1f}s on {result.device}"))
    if result.skipped:
        stdout.print(Text(f"skipped {len(result.skipped)} files (listed in {result.run_dir / 'skipped.csv'})"))
    if result.imbalanced:
        counts = ", ".join(f"{c} {n}" for c, n in result.class_counts.items())
        stdout.print(Text(f"classes are imbalanced ({counts}){'' if cfg.class_weights else '; consider --class-weights'}"))
    stdout.print(Text(f"model: {result.model}"))
    stdout.print(Text(f"plots: {', '.join(result.plots)}; metrics: {result.run_dir / 'metrics.csv'}"))


@app.command()
def predict(
    inputs: Annotated[list[str], typer.Argument(help="Image files, folders (recursive), glob patterns, or - to read paths from stdin.", show_default=False)],
    model: Annotated[Optional[Path], typer.Option(help="Model file or run folder (default: the newest run under --runs-dir).", show_default=False)] = PREDICT.model,
    runs_dir: Annotated[Path, typer.Option(help="Where to look for the newest run when --model is not given.")] = PREDICT.runs_dir,
    top_k: Annotated[int, typer.Option(help="How many of the most likely classes to report per image.")] = PREDICT.top_k,
    batch_size: Annotated[int, typer.Option(help="Images per batch.")] = PREDICT.batch_size,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | mps.")] = PREDICT.device,
    workers: Annotated[Optional[int], typer.Option(help="Image-loading processes (default: cores - 1, at most 8).", show_default=False)] = PREDICT.workers,
    max_pixels: Annotated[int, typer.Option(help="Images with more pixels are refused as possible decompression bombs.")] = PREDICT.max_pixels,
    tta: Annotated[bool, typer.Option("--tta", help="Test-time augmentation: average with the horizontally flipped image.")] = PREDICT.tta,
    output_format: Annotated[Optional[str], typer.Option("--format", help="table | json | jsonl | csv (default: table on a terminal, jsonl when piped).", show_default=False)] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress output on stderr.")] = False,
):
    """Predict the class of images with a trained model.

    Example: finetune predict ./incoming --format jsonl > labels.jsonl
    """
    from .predict import expand_inputs, predict as run_predict, read_path_list

    fmt = output_format or ("table" if sys.stdout.isatty() else "jsonl")
    if fmt not in FORMATS:
        raise fail(UsageError(f"--format must be one of {', '.join(FORMATS)} (got '{fmt}')."))
    raw_inputs: list[str] = []
    for item in inputs:
        raw_inputs.extend(read_path_list(sys.stdin) if item == "-" else [item])
    cfg = replace(PREDICT, inputs=raw_inputs, model=model, runs_dir=runs_dir, top_k=top_k, batch_size=batch_size,
                  device=device, workers=workers, max_pixels=max_pixels, tta=tta)
    reporter = RichReporter(stderr, quiet)
    try:
        loaded = open_model_or_newest(model, runs_dir, reporter)
        items = expand_inputs(cfg.inputs)
        if not items:
            raise UsageError("no inputs: pass image files, folders, glob patterns, or - to read paths from stdin.")
        failures = render_predictions(run_predict(cfg, items, loaded, reporter), fmt)
    except FinetuneError as e:
        raise fail(e)
    except KeyboardInterrupt:
        stderr.print(Text("interrupted: the predictions above are complete, the rest were not made.", style="yellow"))
        raise typer.Exit(130)
    if failures:
        stderr.print(Text(f"{failures} of {len(items)} inputs could not be predicted (see their 'error' field).", style="yellow"))
        raise typer.Exit(1)


def render_predictions(predictions, fmt: str) -> int:
    try:
        return _render_predictions(predictions, fmt)
    except BrokenPipeError:  # `finetune predict dir | head`: the reader has gone, as in any Unix tool
        sys.stdout = open(os.devnull, "w")
        return 0


def _render_predictions(predictions, fmt: str) -> int:
    """Write predictions to stdout in `fmt`; streaming formats write as results arrive. Returns failures."""
    failures = 0
    if fmt == "jsonl":
        for p in predictions:
            failures += p.error is not None
            sys.stdout.write(json.dumps(p.to_json_dict()) + "\n")
            sys.stdout.flush()
        return failures
    if fmt == "csv":
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(["path", "label", "score", "error"])
        for p in predictions:
            failures += p.error is not None
            writer.writerow([p.path, p.label or "", "" if p.score is None else p.score, p.error or ""])
        return failures
    rows = list(predictions)
    failures = sum(p.error is not None for p in rows)
    if fmt == "json":
        sys.stdout.write(json.dumps([p.to_json_dict() for p in rows], indent=2) + "\n")
        return failures
    table = Table("path", "label", "score", "top k")
    for p in rows:
        if p.error is not None:
            table.add_row(Text(p.path), Text("error", style="red"), "", Text(p.error))
        else:
            others = ", ".join(f"{t['label']} {t['score']:.3f}" for t in p.top_k[1:])
            table.add_row(Text(p.path), Text(p.label), f"{p.score:.3f}", Text(others))
    stdout.print(table)
    return failures


@app.command()
def evaluate(
    data: Annotated[Path, typer.Argument(help="Labelled images: DATA/<class>/*, or DATA/test/ or DATA/val/ of class folders.", show_default=False)],
    model: Annotated[Optional[Path], typer.Option(help="Model file or run folder (default: the newest run under --runs-dir).", show_default=False)] = PREDICT.model,
    runs_dir: Annotated[Path, typer.Option(help="Where to look for the newest run when --model is not given.")] = PREDICT.runs_dir,
    batch_size: Annotated[int, typer.Option(help="Images per batch.")] = PREDICT.batch_size,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | mps.")] = PREDICT.device,
    workers: Annotated[Optional[int], typer.Option(help="Image-loading processes (default: cores - 1, at most 8).", show_default=False)] = PREDICT.workers,
    tta: Annotated[bool, typer.Option("--tta", help="Test-time augmentation: average with the horizontally flipped image.")] = PREDICT.tta,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress output on stderr.")] = False,
):
    """Measure a model on labelled images: accuracy, per-class metrics, confusion matrix, worst mistakes.

    Example: finetune evaluate ./photos/val --model runs/train --json
    """
    from .evaluate import evaluate as run_evaluate

    cfg = replace(PREDICT, model=model, runs_dir=runs_dir, batch_size=batch_size, device=device, workers=workers, tta=tta)
    reporter = RichReporter(stderr, quiet)
    try:
        loaded = open_model_or_newest(model, runs_dir, reporter)
        report = run_evaluate(data, loaded, cfg, reporter)
    except FinetuneError as e:
        raise fail(e)
    for s in report["skipped"]:
        reporter.warn(f"skipped {s['path']}: {s['reason']}")
    if json_out:
        typer.echo(json.dumps(report))
        return
    render_evaluation(report)


def render_evaluation(report: dict) -> None:
    classes = report["classes"]
    stdout.print(Text(f"accuracy {report['accuracy']:.4f} on {report['num_images']} images ({report['data']})"))
    per_class = Table("class", "precision", "recall", "f1", "support", title="per class")
    for name, m in report["per_class"].items():
        per_class.add_row(Text(name), f"{m['precision']:.3f}", f"{m['recall']:.3f}", f"{m['f1']:.3f}", str(m["support"]))
    stdout.print(per_class)
    cm = Table("true \\ predicted", *[escape(c) for c in classes], title="confusion matrix")
    for name, row in zip(classes, report["confusion_matrix"]):
        cm.add_row(Text(name), *[str(v) for v in row])
    stdout.print(cm)
    if report["most_confused"]:
        stdout.print(Text("most confused: " + "; ".join(f"{d['true']} -> {d['predicted']} ({d['count']})" for d in report["most_confused"])))
    wrong = [d for d in report["top_losses"] if d["true"] != d["predicted"]]
    if wrong:
        losses = Table("path", "true", "predicted", "score", title="top losses")
        for d in wrong:
            losses.add_row(Text(d["path"]), Text(d["true"]), Text(d["predicted"]), f"{d['score']:.3f}")
        stdout.print(losses)


@app.command()
def export(
    model: Annotated[Optional[Path], typer.Option(help="Model file or run folder (default: the newest run under --runs-dir).", show_default=False)] = None,
    output_format: Annotated[str, typer.Option("--format", help="onnx | torchscript.")] = "onnx",
    out: Annotated[Optional[Path], typer.Option(help="Output file (default: next to the model, .onnx or .pt); a .json with classes and preprocessing is written beside it.", show_default=False)] = None,
    runs_dir: Annotated[Path, typer.Option(help="Where to look for the newest run when --model is not given.")] = PREDICT.runs_dir,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")] = False,
):
    """Export a model (normalisation and softmax included) and check it matches PyTorch within 1e-4.

    Example: finetune export --model runs/train --format onnx --out model.onnx
    """
    from .export import export_model

    try:
        loaded = open_model_or_newest(model, runs_dir, RichReporter(stderr))
        result = export_model(loaded, output_format, out)
    except FinetuneError as e:
        raise fail(e)
    if json_out:
        typer.echo(json.dumps(result.to_json_dict()))
        return
    stdout.print(Text(f"exported {result.path} ({result.format}); preprocessing and classes in {result.sidecar}"))
    stdout.print(Text(f"verified: max |difference| vs PyTorch {result.max_abs_diff:.2e} (tolerance 1e-4)"))


@app.command()
def info(
    model: Annotated[Path, typer.Argument(help="Model file or run folder.", show_default=False)],
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")] = False,
):
    """Show what a model file holds: arch, classes, preprocessing, training config, best metric, versions.

    Example: finetune info runs/train
    """
    try:
        loaded = open_model_or_newest(model, PREDICT.runs_dir)
    except FinetuneError as e:
        raise fail(e)
    details = {"path": str(loaded.path), "file_size": loaded.path.stat().st_size, **loaded.meta}
    if json_out:
        typer.echo(json.dumps(details))
        return
    table = Table("field", "value", show_header=False)
    for key, value in details.items():
        table.add_row(key, Text(value if isinstance(value, str) else json.dumps(value)))
    stdout.print(table)


@app.command()
def models(
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON array on stdout.")] = False,
):
    """List the --arch names, their parameter counts, and whether pretrained weights are available offline.

    Example: finetune models --json
    """
    from .models import list_archs

    rows = list_archs()
    if json_out:
        typer.echo(json.dumps(rows))
        return
    table = Table("arch", "params", "default img size", "offline weights")
    for r in rows:
        table.add_row(r["arch"], f"{r['params'] / 1e6:.1f} M", str(r["img_size"]), Text(r["offline_weights"] or "no (download or --weights)"))
    stdout.print(table)
