"""What the command line shows: results on stdout (tables, JSON, JSONL, CSV), progress,
warnings and errors on stderr. With the other modules of finetune/cli, the only place that imports rich or prints."""

from __future__ import annotations

import csv
import json
import math
import os
import sys
from collections import Counter

import typer
from rich.cells import cell_len
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Column, Table
from rich.text import Text

from ..errors import FinetuneError
from ..progress import Reporter

def reader_gone() -> None:
    """`finetune ... | head -1`: the reader has gone, which is no failure of the command, as for any
    Unix tool (rich exited 1: a finished training then failed a `set -o pipefail` script)."""
    sys.stdout = open(os.devnull, "w")  # (what is still to be written goes nowhere, without a second error)
    raise SystemExit(0)


class _Console(Console):
    def on_broken_pipe(self) -> None:
        reader_gone()


def _width() -> int | None:
    """COLUMNS as rich would read it, except a width under 1 (some containers report 0): rich then
    printed nothing at all, errors included. None: rich's own choice."""
    columns = os.environ.get("COLUMNS", "")
    return 80 if columns.isdigit() and int(columns) < 1 else None


stdout = _Console(soft_wrap=True, width=_width())
stderr = _Console(stderr=True, soft_wrap=True, width=_width())


def echo_json(obj) -> None:
    typer.echo(json_text(obj))


def json_text(obj, **kw) -> str:
    """JSON that strict parsers take: NaN and the infinities (which json.dumps writes as the
    non-standard NaN, Infinity) become null. A model of NaNs from elsewhere scores NaN."""
    try:
        return json.dumps(obj, allow_nan=False, **kw)
    except ValueError:
        return json.dumps(_finite(obj), **kw)


def _finite(obj):
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


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

    def epoch(self, record):
        if not self.quiet and record.stage != "head":  # head epochs take milliseconds: the bar is enough
            r = record.to_csv_row()
            self.console.print(Text(f"epoch {r['epoch']} ({r['stage']}): loss {r['train_loss']} acc {r['train_acc']}"
                                    f"  val loss {r['val_loss']} val acc {r['val_acc']}  {r['images_per_s']} img/s"))

    def info(self, message):
        if not self.quiet:
            self.console.print(Text(message, style="dim"))

    def warn(self, message):
        self.console.print(Text("warning: ", style="yellow") + Text(message))


def reporter_for(quiet: bool, workers: int | None = None) -> RichReporter:
    """Progress on stderr, having said where --workers asks for more processes than there are cores
    (under torchrun, rank 0 says it)."""
    from ..cpus import too_many_workers_note

    reporter = RichReporter(stderr, quiet)
    note = too_many_workers_note(workers)
    if note and os.environ.get("RANK", "0") == "0":
        reporter.warn(note)
    return reporter


def interrupted(what_then: str) -> typer.Exit:
    """Ctrl-C: one line on stderr saying what was left done, and exit 130 (128 + SIGINT)."""
    stderr.print(f"interrupted: {what_then}", style="yellow", markup=False)
    return typer.Exit(130)


def fail(error: FinetuneError) -> typer.Exit:
    if "RANK" in os.environ:  # a torchrun rank: whether it tells this error is decided with the other ranks in mind
        from ..distributed import told_by_this_rank

        tell, rank = told_by_this_rank(error)
    else:
        tell, rank = True, None
    if tell:
        say_error(str(error), rank)
    return typer.Exit(error.exit_code)


def say_error(message: str, rank=None) -> None:
    where = "" if rank is None else f" (rank {rank})"
    try:
        stderr.print(Text(f"error{where}: ", style="bold red") + Text(message))
    except OSError:  # (the terminal closed, SIGHUP's case: nobody to tell; the exit code still says it)
        pass


def render_predictions(predictions, fmt: str) -> tuple[int, int]:
    """Write predictions to stdout in `fmt`; streaming formats write as results arrive.
    Returns (failed, total)."""
    try:
        return _render_predictions(predictions, fmt)
    except BrokenPipeError:
        reader_gone()


def _render_predictions(predictions, fmt: str) -> tuple[int, int]:
    if fmt in ("jsonl", "csv"):
        writer = csv.writer(sys.stdout, lineterminator="\n")
        if fmt == "csv":
            writer.writerow(["path", "label", "score", "unknown", "distance", "error"])
        failures = total = 0
        for p in predictions:
            failures, total = failures + (p.error is not None), total + 1
            if fmt == "jsonl":
                sys.stdout.write(json_text(p.to_json_dict()) + "\n")
                sys.stdout.flush()
            else:
                writer.writerow([p.path, p.label or "", "" if p.score is None else p.score, "" if p.error else int(p.unknown),
                                 "" if p.distance is None else p.distance, p.error or ""])
        return failures, total
    rows = list(predictions)
    failures = sum(p.error is not None for p in rows)
    if fmt == "json":
        sys.stdout.write(json_text([p.to_json_dict() for p in rows], indent=2) + "\n")
        return failures, len(rows)
    # (paths folded, not cut: on a narrow terminal "…" took the file's name)
    table = Table(Column("path", overflow="fold"), "label", "score", "top k")
    for p in rows:
        if p.error is not None:
            table.add_row(Text(p.path), Text("error", style="red"), "", Text(p.error))
        else:
            if p.unknown:  # the classes it was nearest to, for a person to judge
                table.add_row(Text(p.path), Text("unknown", style="yellow"), "",
                              Text(", ".join(f"{t['label']} {t['score']:.3f}" for t in p.top_k)))
            else:
                others = ", ".join(f"{t['label']} {t['score']:.3f}" for t in p.top_k[1:])
                table.add_row(Text(p.path), Text(p.label), f"{p.score:.3f}", Text(others))
    stdout.print(table)
    return failures, len(rows)


def render_evaluation(report) -> None:
    balanced = f", balanced accuracy {report.balanced_accuracy:.4f}" if report.balanced_accuracy is not None else ""
    stdout.print(Text(f"accuracy {report.accuracy:.4f}{balanced} on {report.num_images} images ({report.data})"))
    per_class = Table(Column("class", overflow="fold"), "precision", "recall", "f1", "support", title="per class")
    for name, m in report.per_class.items():
        per_class.add_row(Text(name), *[f"{m[k]:.3f}" if m[k] is not None else "n/a" for k in ("precision", "recall", "f1")],
                          str(m["support"]))
    stdout.print(per_class)
    if matrix_width(report.classes, report.confusion_matrix) <= stdout.width:
        cm = Table("true \\ predicted", *[escape(c) for c in report.classes], title="confusion matrix")
        for name, row in zip(report.classes, report.confusion_matrix):
            cm.add_row(Text(name), *[str(v) for v in row])
        stdout.print(cm)
    else:  # (squeezed, its cells and names came out as "…")
        stdout.print(Text(f"confusion matrix: {len(report.classes)} classes, wider than the output's {stdout.width} "
                          f"columns: in --json (confusion_matrix), drawn by --report FILE.html"))
    u = report.unknown
    if u and u["rule"] != "off" and u["coverage"] is not None:
        stdout.print(Text(f"unknown rule: {u['flagged']} of {report.num_images} images flagged unknown; accuracy on the "
                          f"{u['coverage']:.1%} accepted: " + (f"{u['accuracy_on_accepted']:.4f}" if u["accuracy_on_accepted"] is not None else "n/a")))
    if report.calibration.get("ece") is not None:
        stdout.print(Text(f"calibration: ECE {report.calibration['ece']:.4f} (temperature {report.temperature:.3f})"))
    if report.most_confused:
        stdout.print(Text("most confused: " + "; ".join(f"{d['true']} -> {d['predicted']} ({d['count']})" for d in report.most_confused)))
    wrong = [d for d in report.top_losses if d["true"] != d["predicted"]]
    if wrong:
        losses = Table(Column("path", overflow="fold"), "true", "predicted", "score", title="top losses")
        for d in wrong:
            losses.add_row(Text(d["path"]), Text(d["true"]), Text(d["predicted"]), f"{d['score']:.3f}")
        stdout.print(losses)


def matrix_width(classes: list[str], matrix: list[list[int]]) -> int:
    """Characters a confusion-matrix table takes: the name column, a column per class (its name or
    its largest count), each with its border and padding."""
    counts = max((len(str(v)) for row in matrix for v in row), default=1)
    widths = [cell_len(c) for c in classes]  # (on screen: a CJK character takes two columns)
    return max(len("true \\ predicted"), *widths) + 4 + sum(max(w, counts) + 3 for w in widths)


def show_train_result(result, class_weights: bool) -> None:
    test = f"test acc {result.test_acc:.4f} ({result.num_test} images), " if result.test_acc is not None else ""
    stdout.print(Text(f"val acc {result.best_val_acc:.4f} (kept epoch {result.best_epoch} of {result.epochs}), {test}"
                      f"{result.num_train} train / {result.num_val} val images, {len(result.classes)} classes, {result.seconds:.1f}s on {result.device}"))
    if result.leakage:
        stdout.print(Text(f"leakage: {len(result.leakage)} val/test images have the same bytes as images of another split "
                          f"(listed in {result.run_dir / 'results.json'}); their accuracy is inflated"))
    if result.near_copies:
        stdout.print(Text(f"near-copies: {len(result.near_copies)} val/test images look like training images (listed in "
                          f"{result.run_dir / 'results.json'}); their accuracy is inflated"))
    if result.skipped:
        stdout.print(Text(f"skipped {len(result.skipped)} files (listed in {result.run_dir / 'skipped.csv'})"))
    if result.imbalanced:
        from ..scan import imbalance_detail

        counts = imbalance_detail(list(result.class_counts), list(result.class_counts.values()))
        balanced = (f"; val balanced accuracy {result.val['balanced_accuracy']:.4f} (each class's recall averaged)"
                    if result.val and result.val.get("balanced_accuracy") is not None else "")
        stdout.print(Text(f"classes are imbalanced ({counts}){balanced}{'' if class_weights else '; consider --class-weights'}"))
    stdout.print(Text(f"model: {result.model}"))
    stdout.print(Text(f"plots: {', '.join(result.plots)}; metrics: {result.run_dir / 'metrics.csv'}"))
    if result.suspects and result.suspects.get("count"):
        # (the least typical images are listed on every run, a share of the set: not label errors by themselves)
        claimed, unlike = result.suspects["another_class"], result.suspects["unlike_others"]
        said = [f"suspected label errors: {claimed} training image{'s' if claimed != 1 else ''} another class claims"] if claimed else []
        said += [f"{unlike} image{'s' if unlike != 1 else ''} least like the others, to look at"] if unlike else []
        stdout.print(Text(f"{'; '.join(said)} (listed in {result.suspects['file']})"))
    flagged = ((result.test or {}).get("unknown") or {}).get("flagged")
    if flagged:  # (their label is null in predict's output: a script should know before it reads them)
        stdout.print(Text(f"unknown: {flagged} of {result.num_test} test images would be answered unknown (label null; "
                          f"finetune predict --no-unknown answers a class for every image)"))
    if result.report:
        stdout.print(Text(f"report: {result.report['path']}"))


def show_export_result(result) -> None:
    stdout.print(Text(f"exported {result.path} ({result.format}); preprocessing and classes in {result.sidecar}"))
    from ..exporting import TOLERANCE

    stdout.print(Text(f"verified: max |difference| vs PyTorch {result.max_abs_diff:.2e} (tolerance {TOLERANCE:g})"))


def show_fields(details: dict) -> None:
    table = Table("field", Column("value", overflow="fold"), show_header=False)  # (a path whole, over lines)
    for key, value in details.items():
        table.add_row(key, Text(value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)))
    stdout.print(table)


def show_check(check) -> None:
    """`finetune check`: how the folder reads, its classes and counts, and what train would do."""
    if check.read_as:
        stdout.print(Text(f"read as: {check.read_as}"))
    for note in check.notes:
        stdout.print(Text(f"note: {note}"))
    if check.counts:
        splits = list(check.counts)
        table = Table("class", *splits, title=Text(f"{check.data}: {len(check.classes)} classes"))
        for c in check.classes:
            table.add_row(Text(c), *[f"{check.counts[s][c]:,}" for s in splits])
        table.add_row(Text("total", style="bold"), *[f"{sum(check.counts[s].values()):,}" for s in splits])
        stdout.print(table)
    if check.imbalanced:
        stdout.print(Text(f"imbalanced: the largest class has {check.imbalance}x the images of the smallest (train); consider --class-weights"))
    if check.images.get("count"):
        stdout.print(Text("images: " + "; ".join(check.images["summary"])))
    if check.skipped:
        reasons = Counter(_reason_kind(s["reason"]) for s in check.skipped)
        stdout.print(Text(f"skipped {len(check.skipped)} files: " + ", ".join(f"{n} {r}" for r, n in reasons.most_common())))
        for s in check.skipped[:10]:
            stdout.print(Text(f"  {s['path']}: {s['reason']}"))
        if len(check.skipped) > 10:
            stdout.print(Text(f"  ... and {len(check.skipped) - 10} more (--json lists all)"))
    if check.leakage:
        stdout.print(Text(f"leakage: {len(check.leakage)} val/test images have the same bytes as images of another split, e.g."))
        for pair in check.leakage[:5]:
            stdout.print(Text(f"  {pair['path']} = {pair['same_as']}"))
    verdict = (f"train would run ({check.seconds:.1f}s to check)" if check.ok else f"train would refuse: {check.problem}")
    stdout.print(Text(verdict, style="green" if check.ok else "red"))


# A skip reason's kind, for counting: the kind whose text the reason starts with (reasons name
# other files and folders further on, whose names may hold any of these words), else the kind
# whose text follows a file's size or suffix; any other reason is a decoding failure.
REASON_STARTS = (("not an image file", "not an image file"), ("DICOM", "DICOM"), ("the same bytes as", "duplicates"),
                 ("broken symbolic link", "broken symbolic link"), ("symbolic link", "symbolic link not followed"),
                 ("the same file as", "links to files read"), ("a folder already read", "folders read once"),
                 ("not a regular file", "not a regular file"), ("not in a class folder", "not in a class folder"),
                 ("empty file", "empty file"), ("listed in", "CSV rows naming no file"),
                 ("a row without a label", "CSV rows without a label"), ("listed again", "listed twice in the CSV"),
                 ("labelled", "labels in doubt"))
REASON_AFTER_SIZE = (("-pixel limit", "pixel limit"), (": aspect ratio", "aspect ratio"),
                     (" needs a Pillow plugin", "needs a Pillow plugin"),
                     ("write the extension in the CSV", "CSV names fitting several files"),
                     ("write its folder in the CSV", "CSV names fitting several files"))


def _reason_kind(reason: str) -> str:
    """A skip reason without the file-specific part, for counting."""
    return next((kind for text, kind in REASON_STARTS if reason.startswith(text)),
                next((kind for text, kind in REASON_AFTER_SIZE if text in reason), "could not be decoded"))


def show_archs(rows: list[dict]) -> None:
    table = Table("family", Column("arch", no_wrap=True), Column("params", no_wrap=True), "img size", "ImageNet top-1",
                  Column("weights here", overflow="fold"), caption="weights here: else a download, or --weights FILE")
    previous = None
    for r in rows:
        family = r["family"] if r["family"] != previous else ""
        previous = r["family"]
        top1 = f"{r['imagenet_top1']:.1f}" if r["imagenet_top1"] is not None else ""
        table.add_row(Text(family), Text(r["arch"]), f"{r['params'] / 1e6:.1f} M" if r["params"] else "", str(r["img_size"]), top1,
                      Text(r["offline_weights"] or "no"))
    stdout.print(table)


def show_cache(summary: dict) -> None:
    if "cleared_bytes" in summary:
        stdout.print(Text(f"cleared {_size(summary['cleared_bytes'])} of cached features and file hashes from {summary['dir']}"))
        return
    stdout.print(Text(f"feature cache: {summary['dir']}, {_size(summary['bytes'])}"))  # (a path's [x] is no markup)
    if summary["entries"]:
        table = Table("arch", "img size", "device", "files", "size", "last used")  # (the weights file: in --json)
        for e in summary["entries"]:
            table.add_row(Text(str(e["arch"])), str(e["img_size"]), str(e["device"]), str(e["chunks"]), _size(e["bytes"]),
                          str(e["last_used"] or "")[:16].replace("T", " "))  # (to the minute)
        stdout.print(table)
    if summary.get("digests_bytes"):
        stdout.print(f"and the files' content hashes of earlier runs: {_size(summary['digests_bytes'])}")


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"
