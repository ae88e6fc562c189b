"""The commands other than train: each builds a config, calls the library and hands the
result to output.py."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..config import MAX_WORKERS
from ..errors import FinetuneError, UsageError
from ..layout import LAYOUT_HELP
from .app import (FORMATS, PREDICT, TRAIN, LabelColumns, LabelsCsv, MaxDistance, MinScore, NoUnknown, ValSplit, app,
                  folder_argument, given_path, load_model_or_newest)
from .output import (RichReporter, echo_json, fail, interrupted, render_evaluation, render_predictions, reporter_for, show_archs,
                     show_cache, show_check, show_export_result, show_fields, stderr)


@app.command()
def predict(
    inputs: Annotated[list[str], typer.Argument(help="Image files, folders (recursive), glob patterns, or - to read paths from stdin.", show_default=False)],
    model: Annotated[Optional[Path], typer.Option(parser=given_path, help="Model file or run folder (default: the newest run under --runs-dir).", show_default=False)] = PREDICT.model,
    runs_dir: Annotated[Path, typer.Option(parser=given_path, help="Where to look for the newest run when --model is not given.")] = PREDICT.runs_dir,
    top_k: Annotated[int, typer.Option(help="How many of the most likely classes to report per image.")] = PREDICT.top_k,
    batch_size: Annotated[int, typer.Option(help="Images per batch.")] = PREDICT.batch_size,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | mps.")] = PREDICT.device,
    workers: Annotated[Optional[int], typer.Option(help=f"Image-loading processes (default: cores - 1, at most {MAX_WORKERS}).", show_default=False)] = PREDICT.workers,
    max_pixels: Annotated[int, typer.Option(help="Images with more pixels are refused as possible decompression bombs.")] = PREDICT.max_pixels,
    tta: Annotated[bool, typer.Option("--tta", help="Test-time augmentation: average with the horizontally flipped image.")] = PREDICT.tta,
    output_format: Annotated[Optional[str], typer.Option("--format", help="table | json | jsonl | csv (default: table on a terminal, jsonl when piped).", show_default=False)] = None,
    no_unknown: NoUnknown = False,
    max_distance: MaxDistance = PREDICT.max_distance,
    min_score: MinScore = PREDICT.min_score,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress output on stderr.")] = False,
):
    """Predict the class of images with a trained model.

    Example: finetune predict ./incoming --format jsonl > labels.jsonl
    """
    from ..prediction import predict as run_predict, read_path_list

    fmt = output_format if output_format is not None else ("table" if sys.stdout.isatty() else "jsonl")
    if fmt not in FORMATS:
        raise fail(UsageError(f"--format must be one of {', '.join(FORMATS)} (got '{fmt}')."))
    raw_inputs: list[str] = []
    for item in inputs:
        raw_inputs.extend(read_path_list(sys.stdin) if item == "-" else [item])
    if not raw_inputs and "-" in inputs:
        raise fail(UsageError("-: standard input gave no paths; give one image path per line (e.g. find DIR -name '*.jpg' | "
                              "finetune predict -)."))
    cfg = replace(PREDICT, model=model, runs_dir=runs_dir, top_k=top_k, batch_size=batch_size,
                  device=device, workers=workers, max_pixels=max_pixels, tta=tta, unknown=not no_unknown,
                  max_distance=max_distance, min_score=min_score)
    reporter = reporter_for(quiet, workers)
    if fmt == "csv" and top_k != PREDICT.top_k:
        reporter.warn(f"--top-k {top_k}: CSV's columns are fixed (each image's label and score); --format jsonl or "
                      f"json gives the top {top_k}.")
    try:
        loaded = load_model_or_newest(model, runs_dir, reporter)
        failures, total = render_predictions(run_predict(loaded, raw_inputs, cfg, reporter), fmt)
    except FinetuneError as e:
        raise fail(e)
    except KeyboardInterrupt:
        raise interrupted(f"no predictions were written (--format {fmt} writes them all at its end)." if fmt in ("json", "table")
                          else "the predictions above are complete, the rest were not made.")
    if failures:
        where = "their rows in the table say why" if fmt == "table" else "see their 'error' field"
        stderr.print(f"{failures} of {total} inputs could not be predicted ({where}).", style="yellow", markup=False)
        raise typer.Exit(1)


@app.command()
def evaluate(
    data: Annotated[Path, typer.Argument(help="Labelled images: DATA's test split (else its val split), as train reads DATA; or DATA/<class>/*.", show_default=False, parser=folder_argument)],
    model: Annotated[Optional[Path], typer.Option(parser=given_path, help="Model file or run folder (default: the newest run under --runs-dir).", show_default=False)] = PREDICT.model,
    runs_dir: Annotated[Path, typer.Option(parser=given_path, help="Where to look for the newest run when --model is not given.")] = PREDICT.runs_dir,
    batch_size: Annotated[int, typer.Option(help="Images per batch.")] = PREDICT.batch_size,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | mps.")] = PREDICT.device,
    workers: Annotated[Optional[int], typer.Option(help=f"Image-loading processes (default: cores - 1, at most {MAX_WORKERS}).", show_default=False)] = PREDICT.workers,
    tta: Annotated[bool, typer.Option("--tta", help="Test-time augmentation: average with the horizontally flipped image.")] = PREDICT.tta,
    layout: Annotated[str, typer.Option(help=f"How DATA is read: {LAYOUT_HELP}.")] = PREDICT.layout,
    labels: LabelsCsv = None,
    label_columns: LabelColumns = None,
    no_unknown: NoUnknown = False,
    max_distance: MaxDistance = PREDICT.max_distance,
    min_score: MinScore = PREDICT.min_score,
    report_file: Annotated[Optional[Path], typer.Option("--report", parser=given_path, help="Also write a self-contained HTML report there (confusion matrix linked to the images, top losses, calibration).", show_default=False, dir_okay=False)] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress output on stderr.")] = False,
):
    """Measure a model on labelled images: accuracy, per-class metrics, confusion matrix, worst mistakes.

    Example: finetune evaluate ./photos/val --model runs/train --report val.html
    """
    from ..evaluation import evaluate as run_evaluate
    from ..run_report import check_report_path, write_evaluation_report

    cfg = replace(PREDICT, model=model, runs_dir=runs_dir, batch_size=batch_size, device=device, workers=workers, tta=tta,
                  layout=layout, labels=labels, label_columns=label_columns, unknown=not no_unknown,
                  max_distance=max_distance, min_score=min_score)
    reporter = reporter_for(quiet, workers)
    try:
        if report_file is not None:  # (before the measure: its refusal comes at once)
            check_report_path(report_file, data)
        loaded = load_model_or_newest(model, runs_dir, reporter)
        report = run_evaluate(loaded, data, cfg, reporter)
        if report_file is not None:
            report.report = write_evaluation_report(report_file, report, loaded, cfg.max_pixels, data)
            reporter.info(f"report: {report_file} ({report.report['bytes'] / 1e6:.1f} MB)")
    except FinetuneError as e:
        raise fail(e)
    except KeyboardInterrupt:
        raise interrupted("nothing was measured.")
    for s in report.skipped:
        reporter.warn(f"skipped {s['path']}: {s['reason']}")
    if json_out:
        echo_json(report.to_json_dict())
    else:
        render_evaluation(report)


@app.command()
def check(
    data: Annotated[Path, typer.Argument(help="The image folder, as you would give it to train.", show_default=False, parser=folder_argument)],
    layout: Annotated[str, typer.Option(help=f"How DATA is read: {LAYOUT_HELP}.")] = TRAIN.layout,
    labels: LabelsCsv = None,
    label_columns: LabelColumns = None,
    val_split: ValSplit = TRAIN.val_split,
    seed: Annotated[int, typer.Option(help="Seed of the val split.")] = TRAIN.seed,
    arch: Annotated[str, typer.Option(help="The backbone train would use (images are decoded at its size).")] = TRAIN.arch,
    img_size: Annotated[Optional[int], typer.Option(help="The crop size train would use (default: the arch's own).", show_default=False)] = TRAIN.img_size,
    max_pixels: Annotated[int, typer.Option(help="Images with more pixels are skipped as possible decompression bombs.")] = TRAIN.max_pixels,
    workers: Annotated[Optional[int], typer.Option(help="Decoding processes (default: every core, at most 8).", show_default=False)] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress output on stderr.")] = False,
):
    """Read a folder as train would, decode every image, and report what train would see; nothing is written.

    Exit code 0 when train would run, 1 when it would refuse. Example: finetune check ./photos
    """
    from ..check import check_folder

    cfg = replace(TRAIN, data=data, layout=layout, labels=labels, label_columns=label_columns, val_split=val_split, seed=seed, arch=arch, img_size=img_size,
                  max_pixels=max_pixels, workers=workers)
    try:
        result = check_folder(cfg, reporter_for(quiet, workers))
    except FinetuneError as e:
        raise fail(e)
    if json_out:
        echo_json(result.to_json_dict())
    else:
        show_check(result)
    raise typer.Exit(0 if result.ok else 1)


@app.command()
def export(
    model: Annotated[Optional[Path], typer.Option(parser=given_path, help="Model file or run folder (default: the newest run under --runs-dir).", show_default=False)] = None,
    output_format: Annotated[str, typer.Option("--format", help="onnx | torchscript.")] = "onnx",
    # (a string: a trailing "/" says a folder, which a Path would drop)
    out: Annotated[Optional[str], typer.Option(help="Output file, or a folder to write model.onnx or model.pt in (an existing one, or one ending in /; default: next to the model); a .json with classes and preprocessing is written beside it.", show_default=False)] = None,
    runs_dir: Annotated[Path, typer.Option(parser=given_path, help="Where to look for the newest run when --model is not given.")] = PREDICT.runs_dir,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")] = False,
):
    """Export a model (normalisation and softmax included) and check it matches PyTorch within 1e-4.

    Example: finetune export --model runs/train --format onnx --out model.onnx
    """
    from ..exporting import export as run_export

    try:
        loaded = load_model_or_newest(model, runs_dir, RichReporter(stderr))
        result = run_export(loaded, output_format, out)
    except FinetuneError as e:
        raise fail(e)
    except KeyboardInterrupt:
        raise interrupted("nothing was exported (the file it would replace is as it was).")
    if json_out:
        echo_json(result.to_json_dict())
    else:
        show_export_result(result)


@app.command()
def info(
    model: Annotated[Path, typer.Argument(help="Model file or run folder.", show_default=False, parser=given_path)],
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")] = False,
):
    """Show what a model file holds: arch, classes, preprocessing, training config, best metric, versions.

    Example: finetune info runs/train
    """
    from ..checkpoint import export_details

    details = export_details(model) if model.is_file() else None  # (an export: its sidecar says what it is)
    if details is None:
        try:
            loaded = load_model_or_newest(model, PREDICT.runs_dir)
        except FinetuneError as e:
            raise fail(e)
        details = {"path": str(loaded.path), "file_size": loaded.path.stat().st_size, **loaded.meta}
    if json_out:
        echo_json(details)
    else:
        show_fields(details)


@app.command()
def models(
    name: Annotated[str, typer.Argument(help="Only the names containing this (e.g. convnext, vit).", show_default=False)] = "",
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON array on stdout.")] = False,
):
    """List the --arch names by family: parameters, default image size, ImageNet top-1, and whether weights are on this machine.

    Example: finetune models convnext --json
    """
    from ..catalogue import list_archs

    try:
        rows = list_archs(name)
        if not rows:  # (an empty table read as "none of them" rather than "no such name")
            raise UsageError(f"no --arch name contains '{name}'; 'finetune models' lists them all.")
    except FinetuneError as e:
        raise fail(e)
    if json_out:
        echo_json(rows)
    else:
        show_archs(rows)


@app.command("cache")
def cache_command(
    clear: Annotated[bool, typer.Option("--clear", help="Delete every cached feature.")] = False,
    cache_dir: Annotated[Optional[Path], typer.Option(parser=given_path, help="The cache folder (default: $FINETUNE_CACHE_DIR, else the user cache folder).", show_default=False)] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")] = False,
):
    """Show the feature cache (where, how big, which feature sets), or clear it.

    Example: finetune cache --clear
    """
    from ..cache import clear as clear_cache
    from ..cache import cache_root, describe

    root = cache_root(cache_dir)
    try:
        summary = describe(root)
        if clear:
            summary = {**summary, "cleared_bytes": clear_cache(root), "bytes": 0, "entries": [], "digests_bytes": 0}
    except FinetuneError as e:
        raise fail(e)
    if json_out:
        echo_json(summary)
    else:
        show_cache(summary)
