"""The typer app, the defaults the commands read, and what several commands share.

Results go to stdout; progress, warnings and errors go to stderr. This package is the only
place that imports typer or rich, and the only one that prints.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .. import __version__
from ..config import DEFAULT_VAL_FRACTION, VAL_CAP, PredictConfig, TrainConfig
from ..progress import Reporter
from .output import reader_gone, say_error, stdout

# Options as fastai, Ultralytics, timm or the PyTorch tutorial name them: an unknown one is
# answered with ours (click's close matches missed these: --model gave "--help, --name").
OTHER_TOOLS_OPTIONS = {"--model": "--arch", "--bs": "--batch-size", "--batch": "--batch-size", "--imgsz": "--img-size",
                       "--image-size": "--img-size", "--lr0": "--lr", "--epoch": "--epochs", "--num-workers": "--workers",
                       "--freeze": "--freeze-backbone", "--project": "--runs-dir", "--pretrained-weights": "--weights",
                       "--initial-checkpoint": "--weights", "--valid-pct": "--val-split", "--val-size": "--val-split"}
POSITIONAL_DATA = ("--data", "--data-dir", "--dataset")


class Commands(typer.core.TyperGroup):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except Exception as e:  # (typer's own NoSuchOption class lives in a private module)
            if type(e).__name__ == "NoSuchOption" and getattr(e, "ctx", None) is not None:
                said_as_ours(e)
            raise


def said_as_ours(e) -> None:
    """An unknown option of another tool's, answered with this command's own, where it has it."""
    command = e.ctx.command
    ours = {opt for p in command.params for opt in getattr(p, "opts", [])}
    if e.option_name in POSITIONAL_DATA and any(p.name == "data" for p in command.params):
        e.message = f"No such option: {e.option_name} (the data folder is the first argument: finetune {command.name} DATA)"
        e.possibilities = None
    elif OTHER_TOOLS_OPTIONS.get(e.option_name) in ours:
        e.possibilities = [OTHER_TOOLS_OPTIONS[e.option_name]]


app = typer.Typer(
    cls=Commands,
    help="Train an image classifier from a folder of labelled images, then predict with it.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
)
TRAIN = TrainConfig()
PREDICT = PredictConfig()
FORMATS = ("table", "json", "jsonl", "csv")

def given_path(value: str | Path) -> Path:
    """A path option as typed; an empty one ("$DIR" with DIR unset) is refused: Path("") is the
    current folder, where runs, a cache or an export were written in its place."""
    return non_empty_path(value, "empty (an unset shell variable?); give a path, or . for the current folder.")


def non_empty_path(value: str | Path, refusal: str) -> Path:
    if not str(value).strip():
        raise typer.BadParameter(refusal)
    return Path(value)


# Options that train, evaluate and check share, spelt once.
LabelsCsv = Annotated[Optional[Path], typer.Option(parser=given_path, help="A CSV naming each image (relative to DATA) and its label, and optionally its split, instead of class folders.", show_default=False)]
LabelColumns = Annotated[Optional[str], typer.Option(help="The CSV's PATH,LABEL[,SPLIT] column names (default: found among path/filename/image_id, label/class/category, split/set).", show_default=False)]
ValSplit = Annotated[Optional[float], typer.Option(help=f"Fraction of each class held out for validation when DATA has no val/ folder (default: {DEFAULT_VAL_FRACTION:g}, at most {VAL_CAP:,} images in all).", show_default=False)]
# The unknown rule, shared by predict and evaluate.
NoUnknown = Annotated[bool, typer.Option("--no-unknown", help="Always answer a class, never unknown.")]
MaxDistance = Annotated[Optional[float], typer.Option(help="Unknown beyond this distance from the training images' features (default: the threshold stored in the model).", show_default=False)]
MinScore = Annotated[Optional[float], typer.Option(help="Also unknown when the top (calibrated) probability is below this.", show_default=False)]


def folder_argument(value: str) -> Path:
    """DATA as typed. An empty one ("$DATA" with DATA unset) is refused: Path("") is the current
    folder, which would be read (and trained on) in its place."""
    return non_empty_path(value, "DATA is empty (an unset shell variable?); give the image folder, or . for this one.")


def load_model_or_newest(model: Path | None, runs_dir: Path, reporter: Reporter | None = None):
    """Load --model, or the newest run's model and say which on stderr."""
    from ..checkpoint import load_model

    loaded = load_model(model, runs_dir)
    if model is None and reporter is not None:
        reporter.info(f"using the newest model: {loaded.path}{unfinished_note(loaded.path)}")
    elif reporter is not None and is_unfinished_run(loaded.path.parent):  # (its scores uncalibrated, no unknown rule yet)
        reporter.warn(f"{loaded.path}{unfinished_note(loaded.path)}")
    return loaded


def is_unfinished_run(folder: Path) -> bool:
    from ..checkpoint import run_finished

    return (folder / "config.json").is_file() and not run_finished(folder)


def unfinished_note(model_path: Path) -> str:
    """What to say of the newest model's run: where it stopped before its end (no results.json),
    how to go on, where it can (a Ctrl-C leaves the state to resume from; a diverged run does
    not); where it finished and a newer run has not (still training, or stopped), that one's name."""
    from ..checkpoint import newer_unfinished_run, run_finished
    from ..resume import STATE_FILENAME
    from ..runs import being_trained

    run = model_path.parent
    if run_finished(run):
        newer = newer_unfinished_run(model_path)
        return (f" (the newest finished run; {newer} is newer and has not finished: --model {newer} uses its best "
                f"epoch so far)") if newer else ""
    if being_trained(run):  # (the resume it would suggest is refused meanwhile)
        return " (its training has not finished: a process is training it now; the best epoch so far)"
    if (run / STATE_FILENAME).is_file():
        return f" (its training did not finish: the best epoch so far; 'finetune train --resume {run}' goes on)"
    return " (its training did not finish: the best epoch before it stopped)"


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


def main_entry() -> None:
    """`finetune` as a program: the app, with what goes wrong in writing its output said in one line
    (a full disk under `> out.json`, a closed stdin or stdout, an encoding that cannot write a name)."""
    import errno
    import os
    import sys

    for name in ("stdin", "stdout", "stderr"):  # (`<&-`, `>&-`: Python gives None, and each use was a traceback)
        if getattr(sys, name) is None:
            setattr(sys, name, open(os.devnull, "r" if name == "stdin" else "w"))
    try:
        os.getcwd()
    except FileNotFoundError:  # (torch's import then ended the process with oneMKL's "FATAL ERROR: Cannot load")
        say_error("the current folder no longer exists (deleted or moved while this shell was in it): cd to a folder "
                  "that exists and run the command again.")
        raise SystemExit(2)
    try:
        app(prog_name="finetune")
    except BrokenPipeError:
        reader_gone()
    except OSError as e:
        where = "the output" if e.filename is None else e.filename
        say_error(f"{where}: cannot be written ({e.strerror or errno.errorcode.get(e.errno, e)}).")
        raise SystemExit(1)
    except UnicodeEncodeError as e:
        say_error(f"the output's encoding ({e.encoding}) cannot write {e.object[e.start:e.end]!r}: set PYTHONUTF8=1 "
                  f"or a UTF-8 locale (LANG=C.UTF-8).")
        raise SystemExit(1)
