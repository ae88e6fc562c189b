"""`finetune train`: the options, the config they make, and the run under torchrun with --devices."""

from __future__ import annotations

import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..config import (FAST_TRAINING_RATE, FINETUNE_BUDGET_S, FINETUNE_EPOCHS, FIRST_STEP, GROW_FROM, IMAGES_FOR_NO_VIEWS,
                      MAX_BUDGETED_FINETUNE_EPOCHS, MAX_EXTRA_VIEWS, TAIL_BUDGET_S, TAIL_EPOCHS, TAIL_FIT,
                      LONG_IMAGE_RATIO, MAX_WORKERS, SQUASH_SHARE, UNFROZEN_FINETUNE_EPOCHS, parse_duration)
from ..errors import FinetuneError, UsageError
from ..layout import LAYOUT_HELP
from .app import TRAIN, LabelColumns, LabelsCsv, ValSplit, app, folder_argument, given_path
from .output import echo_json, fail, reporter_for, say_error, show_train_result


# Over 60 lines only because every option is a parameter (typer's way); the body is a dozen lines.
@app.command()
def train(
    ctx: typer.Context,
    data: Annotated[Optional[Path], typer.Argument(help="Image folder: DATA/train/<class>/ + DATA/val/<class>/, or DATA/<class>/ to split.", show_default=False, parser=folder_argument)] = None,
    arch: Annotated[str, typer.Option(help="Backbone, e.g. resnet18, resnet50, efficientnet_lite0 (offline weights).")] = TRAIN.arch,
    weights: Annotated[Optional[Path], typer.Option(parser=given_path, help="Start from this state dict (.pth/.safetensors) or finetune model file instead of ImageNet weights from the cache/download.")] = TRAIN.weights,
    pretrained: Annotated[bool, typer.Option("--pretrained/--no-pretrained", help="Start from ImageNet weights (--no-pretrained: random init).")] = TRAIN.pretrained,
    epochs: Annotated[int, typer.Option(help="Epochs of the head on the frozen backbone (fast: features are computed once).")] = TRAIN.epochs,
    tail_epochs: Annotated[Optional[int], typer.Option(help=f"Then train the backbone's last blocks with the head, on activations cached by the feature pass, for this many epochs (0: never). Default: {TAIL_EPOCHS} when the head fits under {TAIL_FIT:.1%} of its training images or every stage's features won (images unlike ImageNet's), unless the head is right on every val image or they would take over {TAIL_BUDGET_S / 60:g} minutes (with --time-budget: as many as fit, up to {TAIL_EPOCHS}).", show_default=False)] = TRAIN.tail_epochs,
    finetune_epochs: Annotated[Optional[int], typer.Option(help=f"Then fine-tune the whole network for this many epochs (0: keep the backbone frozen). Default: {FINETUNE_EPOCHS} where the device trains the whole network at {FAST_TRAINING_RATE:g} images/s or more (a GPU) and they take under {FINETUNE_BUDGET_S / 60:g} minutes, unless the model is right on every val image; none on a CPU.", show_default=False)] = TRAIN.finetune_epochs,
    freeze_backbone: Annotated[Optional[bool], typer.Option("--freeze-backbone/--no-freeze-backbone", help=f"No whole-network fine-tuning (--freeze-backbone, as --finetune-epochs 0; the tail stage still trains the last blocks where planned: --tail-epochs 0 leaves it out) vs whole-network fine-tuning (--no-freeze-backbone: {UNFROZEN_FINETUNE_EPOCHS} fine-tune epochs unless --finetune-epochs says). Default: as planned (--finetune-epochs).", show_default=False)] = TRAIN.freeze_backbone,
    time_budget: Annotated[Optional[str], typer.Option(help=f"Time the whole run may take, e.g. 10m, 90s or 1h30m: the tail's epochs (up to {TAIL_EPOCHS}) and fine-tuning's (up to {MAX_BUDGETED_FINETUNE_EPOCHS}) are planned into what is left after the features and the head, at the pace measured on this device, on a CPU too. Default: no budget.", show_default=False)] = None,
    views: Annotated[Optional[int], typer.Option(help=f"Views per training image for the frozen-backbone features: the plain one plus augmented ones (default: {1 + MAX_EXTRA_VIEWS} for up to {IMAGES_FOR_NO_VIEWS // MAX_EXTRA_VIEWS:,} training images, fewer for more, 1 above {IMAGES_FOR_NO_VIEWS:,}; 1: the plain view only).", show_default=False)] = TRAIN.views,
    head_features: Annotated[str, typer.Option(help="What the head reads: auto (the better on val of the final features and every stage's features, standardised), final, or multi.")] = TRAIN.head_features,
    fit: Annotated[str, typer.Option(help=f"How an image becomes the network's square: crop (the shorter side resized, the centre kept), squash (the whole image, its aspect given up: pages, receipts, strips, whose ends the crop never sees), or auto (squash where at least {SQUASH_SHARE:.0%} of the training images are {LONG_IMAGE_RATIO:g} times as long as wide, else crop).")] = TRAIN.fit,
    all_images: Annotated[bool, typer.Option("--all-images", help=f"Train on every training image. Default: beyond {GROW_FROM:,}, the training set grows from {FIRST_STEP:,} in doublings while they still cut the val error by a tenth (off a CUDA GPU, one process, with the feature cache).")] = TRAIN.all_images,
    batch_size: Annotated[int, typer.Option(help="Images per batch.")] = TRAIN.batch_size,
    lr: Annotated[float, typer.Option(help=f"Learning rate of the head (AdamW); the tail stage and whole-network fine-tuning, which start from the trained head, go at lr x {TRAIN.backbone_lr_ratio:g}.")] = TRAIN.lr,
    img_size: Annotated[Optional[int], typer.Option(help="Training crop size in pixels (default: the arch's own, e.g. 224 for resnet, 288 for efficientnet_lite0).", show_default=False)] = TRAIN.img_size,
    layout: Annotated[str, typer.Option(help=f"How DATA is read: {LAYOUT_HELP}. auto: split folders by name (train/val/test and the like, also inside one wrapper folder) and by structure.")] = TRAIN.layout,
    labels: LabelsCsv = None,
    label_columns: LabelColumns = None,
    val_split: ValSplit = TRAIN.val_split,
    seed: Annotated[int, typer.Option(help="Seed for the split, augmentation and initialisation.")] = TRAIN.seed,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | mps (auto: CUDA, then MPS, then CPU).")] = TRAIN.device,
    workers: Annotated[Optional[int], typer.Option(help=f"Image-loading processes (default: cores - 1, at most {MAX_WORKERS}, shared among the ranks under torchrun; 0 loads in the main process).", show_default=False)] = TRAIN.workers,
    runs_dir: Annotated[Path, typer.Option(parser=given_path, help="Where run folders are created.")] = TRAIN.runs_dir,
    name: Annotated[Optional[str], typer.Option(help="Run folder name (default 'train'; numbered if taken, never overwritten).", show_default=False)] = TRAIN.name,
    patience: Annotated[int, typer.Option(help="Early stopping: end a stage after N epochs without a better val epoch (higher accuracy, or as high with a lower loss; 0: off).")] = TRAIN.patience,
    class_weights: Annotated[bool, typer.Option("--class-weights", help="Weight the loss by inverse class frequency, for imbalanced folders.")] = TRAIN.class_weights,
    label_smoothing: Annotated[float, typer.Option(help="Label smoothing of the cross-entropy loss (0: off).")] = TRAIN.label_smoothing,
    max_images_per_class: Annotated[Optional[int], typer.Option(help="Quick trials: use at most N images per class (train, val and test, seeded choice).", show_default=False)] = TRAIN.max_images_per_class,
    max_pixels: Annotated[int, typer.Option(help="Images with more pixels are skipped as possible decompression bombs.")] = TRAIN.max_pixels,
    resume: Annotated[Optional[Path], typer.Option(parser=given_path, help="Continue an interrupted run folder from its last completed epoch (its own settings are used).", show_default=False)] = None,
    cache: Annotated[bool, typer.Option("--cache/--no-cache", help="Keep the backbone's features on disk, so that the next run on the same images skips computing them (--no-cache: write nothing there).")] = TRAIN.cache,
    cache_dir: Annotated[Optional[Path], typer.Option(parser=given_path, help="Where features are cached (default: $FINETUNE_CACHE_DIR, else the user cache folder, e.g. ~/.cache/finetune).", show_default=False)] = TRAIN.cache_dir,
    cache_limit_gb: Annotated[float, typer.Option(help="Size limit of the feature cache; the least recently used features go first.")] = TRAIN.cache_limit_gb,
    feature_memory_gb: Annotated[float, typer.Option(help="Features beyond this size stay in a file, read block by block (memory stays bounded at any number of images).")] = TRAIN.feature_memory_gb,
    devices: Annotated[Optional[int], typer.Option(help="Train with N processes on this machine (one per GPU; CPU: gloo), via torchrun and DistributedDataParallel.", show_default=False)] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object with the results on stdout.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress output on stderr (warnings still shown).")] = False,
):
    """Train a classifier on an image folder.

    Example: finetune train ./photos --arch efficientnet_lite0 --json
    """
    if devices is not None and "WORLD_SIZE" not in os.environ:
        raise train_with_torchrun(devices, resume)
    if data is None and resume is None:
        raise fail(UsageError("missing DATA: give an image folder (finetune train ./photos), or --resume RUN_FOLDER."))
    try:
        budget = parse_duration(time_budget) if time_budget is not None else None
    except UsageError as e:
        raise fail(e)
    cfg = replace(TRAIN, data=data or Path("."), arch=arch, weights=weights, pretrained=pretrained, epochs=epochs,
                  tail_epochs=tail_epochs, finetune_epochs=finetune_epochs, freeze_backbone=freeze_backbone, time_budget=budget, views=views, head_features=head_features, fit=fit, all_images=all_images, batch_size=batch_size,
                  lr=lr, img_size=img_size, layout=layout, labels=labels, label_columns=label_columns, val_split=val_split, seed=seed, device=device, workers=workers,
                  runs_dir=runs_dir, name=name, max_pixels=max_pixels, resume=resume, patience=patience,
                  class_weights=class_weights, label_smoothing=label_smoothing, max_images_per_class=max_images_per_class,
                  cache=cache, cache_dir=cache_dir, cache_limit_gb=cache_limit_gb, feature_memory_gb=feature_memory_gb)
    from ..training import train as run_training  # imported late: keeps --help fast

    reporter = reporter_for(quiet, workers if resume is None else None)  # (resumed: its own --workers, said below)
    ignored = ignored_on_resume(ctx) if resume is not None and os.environ.get("RANK", "0") == "0" else []
    if ignored:
        reporter.warn(f"--resume goes on with the run's own data and settings; ignored: {', '.join(ignored)}")
    try:
        result = run_training(cfg, reporter)
    except FinetuneError as e:
        raise fail(e)
    if result is None:  # a torchrun rank other than 0: rank 0 reports
        return
    if json_out:
        echo_json(result.to_json_dict())
    else:
        show_train_result(result, cfg.class_weights)


# (these apply to a resumed run: the device and processes it runs on, and what the command shows)
APPLY_ON_RESUME = ("resume", "device", "devices", "json_out", "quiet")


def ignored_on_resume(ctx: typer.Context) -> list[str]:
    """DATA and the options typed with --resume (their default values too): the run goes on with
    those it started with."""
    typed = [p for p in ctx.command.params if p.name not in APPLY_ON_RESUME
             and getattr(ctx.get_parameter_source(p.name), "name", "") == "COMMANDLINE"]  # (typer may ship its own click)
    return ["DATA" if p.name == "data" else spelt(p, ctx.params.get(p.name)) for p in typed]


def spelt(option, value) -> str:
    """An option as it was typed: a flag's --no- form where that was the one (--no-cache, not --cache)."""
    off = getattr(option, "secondary_opts", None)
    return off[0] if off and value is False else option.opts[0]


def train_with_torchrun(devices: int, resume: Path | None) -> typer.Exit:
    """`train ... --devices N`: run this same command line in N processes under torchrun."""
    from ..launcher import launch, strip_devices_option

    if devices < 1:
        return fail(UsageError(f"--devices must be at least 1 (got {devices})."))
    if "train" not in sys.argv:
        return fail(UsageError("--devices: run it as 'finetune train DATA --devices N'."))
    outcome = launch(devices, strip_devices_option(sys.argv[sys.argv.index("train") + 1:]), resume)
    if outcome.message:
        say_error(outcome.message, outcome.rank)
    return typer.Exit(outcome.exit_code)
