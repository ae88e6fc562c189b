"""evaluate, reports and plots, export (ONNX, TorchScript), info, models, and the everyday flags."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from finetune.cli import app
from finetune.records import EpochRecord, Stage
from finetune.metrics import classification_report
from finetune.plots import curves_figure

from conftest import FAST_TRAIN_ARGS, make_class_tree, make_image

runner = CliRunner()


@pytest.fixture
def run(trained_run):
    return trained_run


def test_evaluate_json_matches_training(run):
    result = runner.invoke(app, ["evaluate", str(run["data"]), "--model", run["summary"]["run_dir"], "--json", "--workers", "0"])
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["data"] == str(run["data"] / "val")  # DATA/val found by itself
    assert report["accuracy"] == run["summary"]["best_val_acc"]
    assert report["balanced_accuracy"] == run["summary"]["val"]["balanced_accuracy"] is not None  # (its figures: metrics' test)
    likeness = run["summary"]["likeness"]  # (val from the same making as train: alike)
    assert set(likeness) == {"train", "val", "test"} and likeness["val"] >= 0.75 * likeness["train"]
    assert report["classes"] == ["cat", "dog", "fox"]
    assert set(report["per_class"]["dog"]) == {"precision", "recall", "f1", "support"}
    assert [sum(r) for r in report["confusion_matrix"]] == [3, 3, 3]
    assert len(report["top_losses"]) == 9 and {"path", "true", "predicted", "score"} <= set(report["top_losses"][0])


def test_evaluate_table_and_unknown_classes(run, tmp_path):
    table = runner.invoke(app, ["evaluate", str(run["data"] / "val"), "--model", run["summary"]["model"], "--workers", "0"])
    assert table.exit_code == 0 and "confusion matrix" in table.stdout and "precision" in table.stdout
    import shutil

    shutil.copytree(run["data"] / "val" / "cat", tmp_path / "cats" / "cat")  # (no dog, no fox: their recall is unknown)
    some = runner.invoke(app, ["evaluate", str(tmp_path / "cats"), "--model", run["summary"]["model"], "--workers", "0",
                               "--report", str(tmp_path / "cats.html")])
    fox = next(line for line in some.stdout.splitlines() if line.startswith("│ fox"))
    assert some.exit_code == 0 and [c.strip() for c in fox.split("│")[1:6]] == ["fox", "n/a", "n/a", "n/a", "0"]
    assert "<td class=\"name\">fox</td><td class=\"num\">n/a</td><td class=\"num\">n/a</td>" in (tmp_path / "cats.html").read_text()
    cased = make_class_tree(tmp_path / "cased", 2, classes=("Cat", "dog"))
    told = runner.invoke(app, ["evaluate", str(cased), "--model", run["summary"]["model"]])
    assert told.exit_code == 1 and "classes 'Cat' and 'cat' differ only in case: rename the folder" in told.stderr
    other = make_class_tree(tmp_path / "other", 2, classes=("cat", "owl"))
    bad = runner.invoke(app, ["evaluate", str(other), "--model", run["summary"]["model"]])
    assert bad.exit_code == 1 and "the model does not know: owl" in bad.stderr and bad.stdout == ""


@pytest.mark.parametrize("n, drawn", [(3, True), (30, False)])
def test_evaluates_confusion_matrix_is_drawn_where_it_fits(capsys, n, drawn):
    from types import SimpleNamespace

    from finetune.cli.output import render_evaluation

    classes = [f"class_{i}" for i in range(n)]
    cm = [[5 if i == j else 0 for j in range(n)] for i in range(n)]
    report = SimpleNamespace(accuracy=1.0, balanced_accuracy=1.0, num_images=5 * n, data="d", classes=classes, confusion_matrix=cm, unknown=None,
                             per_class={c: {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 5} for c in classes},
                             calibration={}, temperature=1.0, most_confused=[], top_losses=[])
    render_evaluation(report)
    out = capsys.readouterr().out
    assert ("true \\ predicted" in out) is drawn and "…" not in out  # (30 columns in 80: every cell and name was "…")
    said = "confusion matrix: 30 classes, wider than the output's 80 columns: in --json (confusion_matrix), drawn by --report FILE.html"
    assert (said in out.replace("\n", " ")) is not drawn


def test_report_metrics_on_a_known_case():
    probs = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    report = classification_report(["a", "b", "c", "d"], [0, 1, 1, 0], probs, ["x", "y"])
    assert report["confusion_matrix"] == [[1, 1], [1, 1]] and report["accuracy"] == 0.5
    lopsided = classification_report(list("abcde"), [0, 0, 0, 0, 1], torch.tensor([[0.9, 0.1]] * 5), ["x", "y"])
    assert lopsided["accuracy"] == 0.8 and lopsided["balanced_accuracy"] == 0.5  # (the largest class answered alone)
    assert report["per_class"]["x"] == {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}
    assert report["top_losses"][0]["path"] == "d"  # true x at 0.3: the worst mistake
    assert report["most_confused"][0]["count"] == 1
    # A class no image of which was measured: its recall and F1 are unknown (they read 0.000, a total failure)
    three = classification_report(["a", "b", "c"], [0, 1, 1], torch.tensor([[0.9, 0.05, 0.05], [0.1, 0.8, 0.1], [0.1, 0.2, 0.7]]), ["x", "y", "z"])
    assert three["per_class"]["z"] == {"precision": 0.0, "recall": None, "f1": None, "support": 0}
    assert classification_report(["a"], [0], torch.tensor([[0.9, 0.1]]), ["x", "y"])["per_class"]["y"] == {
        "precision": None, "recall": None, "f1": None, "support": 0}


def test_training_writes_plots(run):
    run_dir = Path(run["summary"]["run_dir"])
    for name, min_size in (("curves.png", (800, 300)), ("confusion_matrix.png", (300, 300)), ("reliability.png", (300, 300))):
        with Image.open(run_dir / name) as im:
            assert im.format == "PNG" and im.size[0] >= min_size[0] and im.size[1] >= min_size[1]
    assert sorted(run["summary"]["plots"]) == sorted(str(run_dir / n) for n in ("curves.png", "confusion_matrix.png", "reliability.png"))


def test_curves_have_train_and_val_lines():
    history = [EpochRecord(i, Stage.HEAD, 1 / i, 0.5, 1.2 / i, 0.6, 1e-3, 0.1, 100.0) for i in (1, 2, 3)]
    fig = curves_figure(history)
    assert [len(ax.lines) for ax in fig.axes] == [2, 2]
    assert list(fig.axes[0].lines[1].get_ydata()) == pytest.approx([1.2, 0.6, 0.4])


def preprocess_like_sidecar(path: Path, side: dict) -> np.ndarray:
    """What a user of another runtime would do with the .json next to an export."""
    im = Image.open(path).convert("RGB")
    w, h = im.size
    s = side["resize"] / min(w, h)
    im = im.resize((max(side["resize"], round(w * s)), max(side["resize"], round(h * s))), Image.BILINEAR)
    th, tw = side["input_size"]
    left, top = (im.width - tw) // 2, (im.height - th) // 2
    arr = np.asarray(im.crop((left, top, left + tw, top + th)), dtype=np.float32) / 255.0
    return arr.transpose(2, 0, 1)[None]


@pytest.mark.parametrize("arch", ["efficientnet_lite0", "resnet18"])
def test_onnx_and_torchscript_exports_verify(run, tmp_path, arch):
    import onnxruntime as ort

    if arch == "efficientnet_lite0":
        model = run["summary"]["model"]
    else:
        trained = runner.invoke(app, ["train", str(run["data"]), "--runs-dir", str(tmp_path / "r"), "--json", "--no-pretrained",
                                      *FAST_TRAIN_ARGS, "--arch", "resnet18"])
        model = json.loads(trained.stdout)["model"]
    for fmt, suffix in (("onnx", "onnx"), ("torchscript", "pt")):
        out = tmp_path / f"m.{suffix}"
        result = runner.invoke(app, ["export", "--model", model, "--format", fmt, "--out", str(out), "--json"])
        assert result.exit_code == 0, result.stderr
        info = json.loads(result.stdout)
        assert info["max_abs_diff"] <= 1e-4 and Path(info["path"]) == out
        side = json.loads(Path(str(out) + ".json").read_text())
        assert side["classes"] == ["cat", "dog", "fox"] and side["input_size"] == [64, 64] and side["resize"] == 73
        assert side["arch"] == arch and len(side["mean"]) == 3 and len(side["std"]) == 3
        # (a trial found the sidecar silent on what changes scores, the class even: transparency, EXIF, precision)
        assert all(w in side["input"] for w in ("EXIF orientation", "composited on white", "antialiased"))
        assert side["precision"].startswith("float32; predict computes in bfloat16 where")
    # The ONNX file alone, fed as its sidecar says, agrees with `finetune predict`.
    image = run["data"] / "val" / "fox" / "fox_1.jpg"
    side = json.loads((tmp_path / "m.onnx.json").read_text())
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    batch = np.concatenate([preprocess_like_sidecar(image, side)] * 3)  # any batch size
    probs = session.run(None, {session.get_inputs()[0].name: batch})[0]
    assert probs.shape == (3, 3) and np.allclose(probs.sum(1), 1.0, atol=1e-5)
    predicted = json.loads(runner.invoke(app, ["predict", str(image), "--model", model, "--format", "json", "--device", "cpu", "--workers", "0"]).stdout)[0]
    assert side["classes"][int(probs[0].argmax())] == predicted["label"]
    # Not closer: the sidecar recipe resizes with PIL, predict with torchvision, and on this 40x32
    # noise image blown up to 73 px the two differ by about 0.02 in probability.
    assert abs(float(probs[0].max()) - predicted["score"]) < 0.05


def test_export_refuses_to_overwrite_the_model(run):
    result = runner.invoke(app, ["export", "--model", run["summary"]["model"], "--out", run["summary"]["model"]])
    assert result.exit_code == 2 and "would overwrite" in result.stderr


def test_a_failed_verification_writes_nothing(run, tmp_path, monkeypatch):
    from finetune import exporting

    monkeypatch.setattr(exporting, "TOLERANCE", -1.0)  # nothing can pass
    out = tmp_path / "m.pt"
    result = runner.invoke(app, ["export", "--model", run["summary"]["model"], "--format", "torchscript", "--out", str(out)])
    assert result.exit_code == 1 and "it was not written" in result.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("fmt, name", [("onnx", "model.onnx"), ("torchscript", "model.pt")])
def test_export_into_an_existing_folder_uses_the_default_name(run, tmp_path, fmt, name):
    folder = tmp_path / "exports"
    folder.mkdir()
    result = runner.invoke(app, ["export", "--model", run["summary"]["model"], "--format", fmt, "--out", str(folder), "--json"])
    assert result.exit_code == 0, result.stderr
    assert result.stderr == ""
    info = json.loads(result.stdout)
    assert Path(info["path"]) == folder / name and Path(info["sidecar"]) == folder / f"{name}.json"
    assert sorted(p.name for p in folder.iterdir()) == [name, f"{name}.json"]  # nothing else, no temporary file


@pytest.mark.parametrize("given, written", [("new/", "new/model.pt"), ("a/b/m.pt", "a/b/m.pt")])
def test_export_makes_the_folder_it_is_told_to_write_in(run, tmp_path, given, written):
    # `--out new/` names a folder (typer's Path would drop the slash and write a file "new");
    # `--out a/b/m.pt` a file in folders not made yet (files.atomic_target makes them).
    result = runner.invoke(app, ["export", "--model", run["summary"]["model"], "--format", "torchscript",
                                 "--out", str(tmp_path) + "/" + given, "--json"])
    assert result.exit_code == 0, result.stderr
    assert Path(json.loads(result.stdout)["path"]) == tmp_path / written
    assert (tmp_path / written).is_file() and (tmp_path / (written + ".json")).is_file()


def test_ctrl_c_in_export_evaluate_and_predict_says_what_was_left_done(run, tmp_path, monkeypatch):
    from finetune import evaluation, exporting, prediction

    def wrapped_interrupt(*args):  # (torch's exporter turns a Ctrl-C into errors of its own: three tracebacks)
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as e:
            raise RuntimeError("export failed") from e

    monkeypatch.setattr(exporting, "_export_torchscript", wrapped_interrupt)
    out = tmp_path / "m.pt"
    export = runner.invoke(app, ["export", "--model", run["summary"]["model"], "--format", "torchscript", "--out", str(out)])
    assert export.exit_code == 130 and export.stderr == "interrupted: nothing was exported (the file it would replace is as it was).\n"
    assert list(tmp_path.iterdir()) == []

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluation, "measure", ctrl_c)
    evaluate = runner.invoke(app, ["evaluate", str(run["data"]), "--model", run["summary"]["model"], "--json"])
    assert evaluate.exit_code == 130 and evaluate.stdout == "" and evaluate.stderr == "interrupted: nothing was measured.\n"
    monkeypatch.setattr(prediction, "iter_answers", ctrl_c)
    img = str(run["data"] / "val" / "cat" / "cat_0.jpg")
    as_json = runner.invoke(app, ["predict", img, "--model", run["summary"]["model"], "--format", "json"])
    assert as_json.exit_code == 130 and as_json.stdout == ""
    assert as_json.stderr == "interrupted: no predictions were written (--format json writes them all at its end).\n"
    as_table = runner.invoke(app, ["predict", img, "--model", run["summary"]["model"], "--format", "table"])
    assert as_table.exit_code == 130 and "no predictions were written (--format table writes them" in as_table.stderr


def test_a_model_file_is_known_by_its_bytes_and_an_export_by_its_sidecar(run, tmp_path):
    import shutil

    img = str(run["data"] / "val" / "cat" / "cat_0.jpg")
    copied = shutil.copy(run["summary"]["model"], tmp_path / "best.pt")  # (refused as "pickled" by its suffix)
    as_pt = runner.invoke(app, ["predict", img, "--model", str(copied), "--format", "jsonl", "--workers", "0"])
    assert as_pt.exit_code == 0 and json.loads(as_pt.stdout)["label"] == "cat"
    run_dir = Path(run["summary"]["run_dir"])
    with pytest.MonkeyPatch.context() as m:
        m.chdir(run_dir.parent)  # (exported from a relative --model: its sidecar named it relative to here)
        exported = runner.invoke(app, ["export", "--model", run_dir.name, "--format", "torchscript", "--out", str(tmp_path / "m.pt")])
    assert exported.exit_code == 0, exported.stderr
    for given in ("m.pt", "m.pt.json"):
        told = runner.invoke(app, ["predict", img, "--model", str(tmp_path / given)])
        assert told.exit_code == 2 and told.stderr == (
            f"error: {tmp_path / given}: an exported model, for other runtimes; finetune predicts with the model file it "
            f"was exported from: --model {run['summary']['model']}\n")
    for given in ("m.pt", "m.pt.json"):
        info = runner.invoke(app, ["info", str(tmp_path / given), "--json"])  # (refused with predict's advice)
        assert info.exit_code == 0, info.stderr
        shown = json.loads(info.stdout)
        assert shown["source_model"] == run["summary"]["model"] and shown["path"] == str(tmp_path / "m.pt")


@pytest.mark.parametrize("name", ["victim.png", "weights.pt"])
def test_export_replaces_only_its_own_exports(run, tmp_path, name):
    # (a photo named by mistake; a state dict saved as .pt, TorchScript's own suffix)
    theirs = make_image(tmp_path / name, (10, 200, 10), fmt="PNG")
    before = theirs.read_bytes()
    result = runner.invoke(app, ["export", "--model", run["summary"]["model"], "--format", "torchscript", "--out", str(theirs)])
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr == (f"error: --out {theirs}: a file is there already, not one finetune exported (no sidecar of "
                             f"finetune's, {name}.json, beside it); name a new file, or remove that one.\n")
    assert theirs.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == [name]
    (tmp_path / f"{name}.json").write_text('{"mine": true}')  # (a JSON file of the user's beside it was taken as a sidecar)
    both = runner.invoke(app, ["export", "--model", run["summary"]["model"], "--format", "torchscript", "--out", str(theirs)])
    assert both.exit_code == 2 and theirs.read_bytes() == before and (tmp_path / f"{name}.json").read_text() == '{"mine": true}'
    (tmp_path / "new.pt.json").write_text('{"mine": true}')
    sidecar_only = runner.invoke(app, ["export", "--model", run["summary"]["model"], "--format", "torchscript",
                                       "--out", str(tmp_path / "new.pt")])
    assert sidecar_only.exit_code == 2 and "new.pt.json is there already, not one finetune wrote" in sidecar_only.stderr
    (tmp_path / f"{name}.json").unlink()
    (tmp_path / "new.pt.json").unlink()
    again = runner.invoke(app, ["export", "--model", run["summary"]["model"], "--format", "torchscript", "--out", str(tmp_path / "m.pt")])
    assert again.exit_code == 0 and runner.invoke(app, ["export", "--model", run["summary"]["model"], "--format", "torchscript",
                                                        "--out", str(tmp_path / "m.pt")]).exit_code == 0  # its own: replaced


def refuse_writes_in(folder: Path, monkeypatch, where: str, error: OSError) -> None:
    """As a read-only disk or a folder without write permission would, whoever runs the tests
    (root ignores chmod): `where` is the step of files.atomic_target that fails."""
    import os
    import tempfile

    real = {"mkstemp": tempfile.mkstemp, "replace": os.replace}[where]

    def refusing(*args, **kwargs):
        target = kwargs.get("dir") if where == "mkstemp" else Path(args[1]).parent
        if target is not None and Path(target) == folder:
            raise error
        return real(*args, **kwargs)

    monkeypatch.setattr(tempfile if where == "mkstemp" else os, where, refusing)


def test_export_to_a_read_only_place_says_so(run, tmp_path, monkeypatch):
    import errno

    out = tmp_path / "m.onnx"
    refuse_writes_in(tmp_path, monkeypatch, "mkstemp", OSError(errno.EROFS, "Read-only file system"))
    result = runner.invoke(app, ["export", "--model", run["summary"]["model"], "--out", str(out)])
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr == f"error: {out}: cannot write it (Read-only file system). Pass --out with a writable location.\n"
    assert list(tmp_path.iterdir()) == []


def test_export_refused_at_the_last_step_leaves_no_temporary_file(run, tmp_path, monkeypatch):
    import errno

    out = tmp_path / "m.pt"
    refuse_writes_in(tmp_path, monkeypatch, "replace", PermissionError(errno.EACCES, "Permission denied"))
    result = runner.invoke(app, ["export", "--model", run["summary"]["model"], "--format", "torchscript", "--out", str(out)])
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr == f"error: {out}: cannot write it (Permission denied). Pass --out with a writable location.\n"
    assert list(tmp_path.iterdir()) == []  # the verified temporary file was removed, and no sidecar written


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes into a chmod 0o500 folder all the same")
def test_export_into_a_folder_without_write_permission(run, tmp_path):
    folder = tmp_path / "locked"
    folder.mkdir(mode=0o500)
    try:
        result = runner.invoke(app, ["export", "--model", run["summary"]["model"], "--format", "torchscript", "--out", str(folder / "m.pt")])
        assert list(folder.iterdir()) == []
    finally:
        folder.chmod(0o700)  # so that pytest can remove tmp_path
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr == f"error: {folder / 'm.pt'}: cannot write it (Permission denied). Pass --out with a writable location.\n"


def test_info_and_models(run):
    info = json.loads(runner.invoke(app, ["info", run["summary"]["run_dir"], "--json"]).stdout)
    assert info["arch"] == "efficientnet_lite0" and info["classes"] == ["cat", "dog", "fox"]
    assert info["file_size"] == Path(run["summary"]["model"]).stat().st_size and "torch" in info["versions"]
    rows = {r["arch"]: r for r in json.loads(runner.invoke(app, ["models", "--json"]).stdout)}
    assert rows["resnet18"]["params"] == 11_689_512 and rows["efficientnet_lite0"]["offline_weights"]  # as published, 1000-class head included
    assert rows["efficientnet_lite0"]["params"] == 4_652_008 and rows["vit_b_16"]["imagenet_top1"] == 81.072
    missing = runner.invoke(app, ["info", "no/such/model.safetensors"])  # (info takes it as its argument, not --model)
    assert missing.exit_code == 2 and missing.stdout == ""
    assert missing.stderr == "error: no/such/model.safetensors: model file not found: give the path of a model.safetensors or of a run folder.\n"


def test_every_command_has_help_with_an_example():
    names = [c.name or c.callback.__name__ for c in app.registered_commands]
    assert {"train", "predict", "evaluate", "export", "info", "models"} <= set(names)
    for name in names:
        result = runner.invoke(app, [name, "--help"])
        assert result.exit_code == 0 and "Example:" in result.stdout, name
        assert "--help" in result.stdout


def test_every_option_has_help_text():
    import typer.main

    group = typer.main.get_command(app)
    for name, command in group.commands.items():
        for param in command.params:
            if param.param_type_name == "option" and param.name != "help":
                assert param.help and len(param.help) > 10, f"{name} {param.opts}"


def test_onnx_export_without_the_extra_says_how_to_install(run, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if not installed
    result = runner.invoke(app, ["export", "--model", run["summary"]["model"], "--format", "onnx", "--out", str(tmp_path / "m.onnx")])
    assert result.exit_code == 1 and 'pip install -e ".[export]"' in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_shell_completion_is_offered():
    result = runner.invoke(app, ["--help"])
    assert "--install-completion" in result.stdout and "--show-completion" in result.stdout
    # What --show-completion prints, asked for by name: its shell detection depends on the parent process.
    script = runner.invoke(app, [], prog_name="finetune", env={"_FINETUNE_COMPLETE": "source_bash"})
    assert script.exit_code == 0 and "_finetune_completion()" in script.stdout and "complete " in script.stdout
    words = runner.invoke(app, [], prog_name="finetune",
                          env={"_FINETUNE_COMPLETE": "complete_bash", "COMP_WORDS": "finetune tr", "COMP_CWORD": "1"})
    assert words.stdout.split() == ["train"]


# --- everyday training flags ------------------------------------------------------------------

def test_patience_stops_early(run, tmp_path):
    said = [a for a in FAST_TRAIN_ARGS if a != "--quiet"]  # (the early stop is said on stderr)
    result = runner.invoke(app, ["train", str(run["data"]), "--runs-dir", str(tmp_path), "--json", *said,
                                 "--epochs", "40", "--patience", "2"])
    summary = json.loads(result.stdout)
    assert summary["stopped_early"] and summary["epochs"] < 40
    assert result.stderr.count("early stop: no better val epoch (higher accuracy, or as high with a lower loss) for 2 epochs") == 1
    with open(Path(summary["run_dir"]) / "metrics.csv", newline="") as f:
        history = [(float(r["val_acc"]), float(r["val_loss"])) for r in csv.DictReader(f)]
    best_val = max(range(len(history)), key=lambda i: (history[i][0], -history[i][1], -i)) + 1
    assert summary["epochs"] - best_val == 2  # two epochs without a better val accuracy
    assert summary["best_epoch"] == summary["epochs"]  # and the stage's last model is kept, as for any stage


def test_imbalance_is_reported_and_class_weights_apply(tmp_path):
    data = tmp_path / "data"
    for name, n in (("cat", 12), ("dog", 3)):
        make_class_tree(data / "train", n, classes=(name,))
        make_class_tree(data / "val", 2, classes=(name,), seed=50)
    plain = runner.invoke(app, ["train", str(data), "--runs-dir", str(tmp_path / "a"), "--json", *FAST_TRAIN_ARGS])
    summary = json.loads(plain.stdout)
    assert summary["imbalanced"] and summary["class_counts"] == {"cat": 12, "dog": 3}
    assert "classes are imbalanced (cat 12, dog 3); consider --class-weights" in plain.stderr
    weighted = runner.invoke(app, ["train", str(data), "--runs-dir", str(tmp_path / "b"), "--json", "--class-weights", *FAST_TRAIN_ARGS])
    assert weighted.exit_code == 0 and "class weights are on" in weighted.stderr
    assert json.loads(weighted.stdout)["best_val_acc"] >= 0.5
    first_loss = lambda out: float(next(csv.DictReader(open(Path(json.loads(out.stdout)["run_dir"]) / "metrics.csv")))["train_loss"])  # noqa: E731
    assert first_loss(weighted) != first_loss(plain)  # (the same steps otherwise: the loss weighs dogs 4x cats)


def test_the_loss_weighs_classes_and_smooths_labels_as_asked():
    import torch
    import torch.nn.functional as F

    from finetune.config import TrainConfig
    from finetune.stages import make_loss

    logits, y = torch.tensor([[2.0, 0.0], [0.5, 1.5], [1.0, 1.0]]), torch.tensor([0, 1, 0])
    cpu = torch.device("cpu")
    plain = make_loss(TrainConfig(data="x", label_smoothing=0.0), [12, 3], cpu)(logits, y)
    assert torch.allclose(plain, F.cross_entropy(logits, y))
    weighted = make_loss(TrainConfig(data="x", label_smoothing=0.0, class_weights=True), [12, 3], cpu)(logits, y)
    per_image = F.cross_entropy(logits, y, reduction="none")
    w = torch.tensor([15 / 24, 15 / 6])[y]  # total / (classes x count)
    assert torch.allclose(weighted, (w * per_image).sum() / w.sum())
    smoothed = make_loss(TrainConfig(data="x", label_smoothing=0.1), [12, 3], cpu)(logits, y)
    assert torch.allclose(smoothed, F.cross_entropy(logits, y, label_smoothing=0.1)) and not torch.allclose(smoothed, plain)


def test_class_weights_with_smoothing_still_answer_a_common_image_with_its_own_class():
    """cross_entropy's weight= weighed the smoothing's share by class too: at 20:1 the rare class
    outweighed a common image's own label, and the head learnt to answer it (a trial: val 0.97 -> 0.54)."""
    import torch

    from finetune.config import TrainConfig
    from finetune.stages import make_loss

    loss = make_loss(TrainConfig(data="x", class_weights=True), [300, 15], torch.device("cpu"))  # (smoothing 0.1)
    logits = torch.zeros(1, 2, requires_grad=True)
    optimizer = torch.optim.SGD([logits], lr=0.5)
    for _ in range(300):  # the logits that minimise a common-class image's loss
        optimizer.zero_grad()
        loss(logits, torch.tensor([0])).backward()
        optimizer.step()
    assert logits.softmax(1)[0, 0] > 0.9  # (its smoothed target: 0.95)


def test_max_images_per_class_and_label_smoothing(run, tmp_path):
    talkative = [a for a in FAST_TRAIN_ARGS if a != "--quiet"]
    result = runner.invoke(app, ["train", str(run["data"]), "--runs-dir", str(tmp_path), "--json", *talkative,
                                 "--max-images-per-class", "2", "--label-smoothing", "0"])
    summary = json.loads(result.stdout)
    assert (summary["num_train"], summary["num_val"]) == (6, 6)
    assert "--max-images-per-class 2: using 6 training, 6 val images of them" in result.stderr  # (read as: the whole folder)
    config = json.loads((Path(summary["run_dir"]) / "config.json").read_text())
    assert config["label_smoothing"] == 0 and config["max_images_per_class"] == 2


def test_tta_changes_scores_but_stays_a_distribution(run, tmp_path):
    from finetune.files import read_safetensors, write_safetensors

    # A high temperature, so that no score is 1.0 to six places and the flipped view's effect shows.
    tensors, meta = read_safetensors(Path(run["summary"]["model"]))
    write_safetensors(tmp_path / "warm.safetensors", tensors, {**meta, "calibration": {**meta["calibration"], "temperature": 50.0}})
    args = ["predict", str(run["data"] / "val"), "--model", str(tmp_path / "warm.safetensors"), "--format", "json", "--workers", "0"]
    plain = json.loads(runner.invoke(app, args).stdout)
    tta = json.loads(runner.invoke(app, [*args, "--tta"]).stdout)
    assert [p["path"] for p in plain] == [p["path"] for p in tta]
    assert any(abs(a["score"] - b["score"]) > 1e-6 for a, b in zip(plain, tta))
    assert all(abs(sum(t["score"] for t in p["top_k"]) - 1) < 1e-3 for p in tta)
    evaluate = ["evaluate", str(run["data"]), "--model", str(tmp_path / "warm.safetensors"), "--json", "--workers", "0"]
    report, plain_report = (json.loads(runner.invoke(app, args).stdout) for args in ([*evaluate, "--tta"], evaluate))
    assert report["tta"] is True and plain_report["tta"] is False
    scores = lambda r: {d["path"]: d["score"] for d in r["top_losses"]}  # noqa: E731
    assert scores(report).keys() == scores(plain_report).keys() and scores(report) != scores(plain_report)  # (flips measured)
