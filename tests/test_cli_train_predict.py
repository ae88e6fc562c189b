"""End to end through the CLI: train on a tiny folder, then predict in every format."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from finetune.cli import app
from finetune.device import pick_device

from conftest import FAST_TRAIN_ARGS, tree_hashes

runner = CliRunner()


@pytest.fixture
def trained(trained_run):
    return trained_run


def test_train_json_has_the_documented_fields(trained):
    s = trained["summary"]
    for key in ("run_dir", "model", "best_val_acc", "epochs", "classes", "num_train", "num_val", "skipped", "device", "seconds"):
        assert key in s, key
    assert s["classes"] == ["cat", "dog", "fox"]
    assert (s["num_train"], s["num_val"]) == (18, 9)
    assert 0.0 <= s["best_val_acc"] <= 1.0
    assert s["epochs"] == 3 and s["device"].split(":")[0] == pick_device("auto").type and s["skipped"] == []
    assert trained["result"].stdout.count("\n") == 1  # exactly one JSON object on stdout


def test_colour_classes_are_learned(trained):
    assert trained["summary"]["best_val_acc"] >= 0.9


def test_run_folder_holds_model_metrics_and_config(trained):
    run = Path(trained["summary"]["run_dir"])
    assert Path(trained["summary"]["model"]) == run / "model.safetensors"
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert {"train_loss", "val_acc", "images_per_s"} <= set(rows[0])
    assert json.loads((run / "config.json").read_text())["arch"] == "efficientnet_lite0"
    assert (run / "skipped.csv").read_text().startswith("path,reason")


def test_training_leaves_the_data_folder_untouched(trained):
    assert tree_hashes(trained["data"]) == trained["hashes"]


def test_second_run_gets_a_new_folder(trained, tmp_path):
    result = runner.invoke(app, ["train", str(trained["data"]), "--runs-dir", str(tmp_path), "--name", "exp", "--json", *FAST_TRAIN_ARGS])
    again = runner.invoke(app, ["train", str(trained["data"]), "--runs-dir", str(tmp_path), "--name", "exp", "--json", *FAST_TRAIN_ARGS])
    assert json.loads(result.stdout)["run_dir"] == str(tmp_path / "exp")
    assert json.loads(again.stdout)["run_dir"] == str(tmp_path / "exp2")


def test_human_summary_without_json(trained, tmp_path):
    result = runner.invoke(app, ["train", str(trained["data"]), "--runs-dir", str(tmp_path), *FAST_TRAIN_ARGS])
    assert result.exit_code == 0
    assert "val acc" in result.stdout and "kept epoch" in result.stdout and "model.safetensors" in result.stdout
    assert not result.stdout.lstrip().startswith("{")
    # (clean colour classes: the least typical image of the set is listed, as on every run, but it is no label error)
    assert "suspected label errors" not in result.stdout and "1 image least like the others, to look at" in result.stdout
    assert "the unknown rule was set on 9 val images, too few to place it surely" in result.stderr


def test_the_summary_says_how_many_test_images_the_unknown_rule_would_leave_without_a_label(trained, capsys):
    from dataclasses import replace

    from finetune.cli.output import show_train_result
    from finetune.records import TrainResult

    result = TrainResult(**{**{k: v for k, v in trained["summary"].items() if k in TrainResult.__dataclass_fields__},
                            "run_dir": Path(trained["summary"]["run_dir"]), "model": Path(trained["summary"]["model"])})
    show_train_result(replace(result, num_test=12, test_acc=1.0, test={"unknown": {"flagged": 2}}), class_weights=False)
    assert ("unknown: 2 of 12 test images would be answered unknown (label null; finetune predict --no-unknown answers a "
            "class for every image)") in capsys.readouterr().out


def test_other_tools_option_names_are_answered_with_ours(tmp_path):
    def said(*args):
        result = runner.invoke(app, [*args])
        assert result.exit_code == 2 and result.stdout == ""
        return " ".join(result.stderr.replace("│", " ").split())

    # (click's close matches gave "--help, --name" for --model and "--json, --labels, --seed" for --bs)
    assert "No such option: --model (Possible options: --arch)" in said("train", str(tmp_path), "--model", "resnet18")
    assert "No such option: --bs (Possible options: --batch-size)" in said("train", str(tmp_path), "--bs", "8")
    assert "No such option: --data (the data folder is the first argument: finetune train DATA)" in said("train", "--data", "x")
    assert "(Possible options: --batch-size)" in said("predict", "x.jpg", "--bs", "8")
    assert "--batch-size" not in said("cache", "--bs", "8")  # (only where the command has it)


def predict(trained, *args, input=None):
    return runner.invoke(app, ["predict", *args, "--runs-dir", str(trained["runs"]), "--workers", "0"], input=input)


def test_predict_folder_jsonl_uses_newest_run(trained):
    result = predict(trained, str(trained["data"] / "val"), "--format", "jsonl")
    assert result.exit_code == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(lines) == 9
    assert [Path(r["path"]).name for r in lines] == sorted(Path(r["path"]).name for r in lines)  # sorted walk
    for r in lines:
        assert set(r) == {"path", "label", "score", "top_k", "unknown", "distance"}
        assert r["label"] == r["top_k"][0]["label"] and len(r["top_k"]) == 3 and r["unknown"] is False
        assert abs(sum(t["score"] for t in r["top_k"]) - 1.0) < 1e-3
    correct = sum(Path(r["path"]).parent.name == r["label"] for r in lines)
    assert correct / len(lines) == pytest.approx(trained["summary"]["best_val_acc"], abs=1e-4)
    assert "newest model" in result.stderr and trained["summary"]["model"] in result.stderr


def test_predict_says_when_the_newest_model_is_of_a_run_that_did_not_finish(trained, tmp_path):
    import shutil

    runs = tmp_path / "runs"
    shutil.copytree(Path(trained["summary"]["run_dir"]), runs / "stopped")
    (runs / "stopped" / "results.json").rename(runs / "results.json.aside")  # (written when a run ends)
    (runs / "stopped" / "last_state.safetensors").write_bytes(b"")  # (what a Ctrl-C leaves for --resume)
    img = str(trained["data"] / "val" / "dog" / "dog_0.jpg")
    say = lambda: runner.invoke(app, ["predict", img, "--runs-dir", str(runs), "--workers", "0"]).stderr  # noqa: E731
    assert f"its training did not finish: the best epoch so far; 'finetune train --resume {runs / 'stopped'}' goes on" in say()
    import fcntl

    with open(runs / "stopped" / "config.json", "rb") as held:  # as a process training it holds it (a resume: refused)
        fcntl.flock(held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert "(its training has not finished: a process is training it now; the best epoch so far)" in say()
    named = runner.invoke(app, ["predict", img, "--model", str(runs / "stopped"), "--workers", "0"]).stderr  # (said nothing)
    assert f"warning: {runs / 'stopped' / 'model.safetensors'} (its training did not finish: the best epoch so far" in named
    (runs / "stopped" / "last_state.safetensors").unlink()  # (a diverged run: nothing to resume)
    assert "(its training did not finish: the best epoch before it stopped)" in say()
    from finetune.files import read_safetensors, write_safetensors

    tensors, meta = read_safetensors(runs / "stopped" / "model.safetensors")  # as a run writes it before its end
    write_safetensors(tmp_path / "early.safetensors", {k: v for k, v in tensors.items() if not k.startswith("distance.")},
                      {k: v for k, v in meta.items() if k not in ("calibration", "unknown")})
    early = json.loads(runner.invoke(app, ["evaluate", str(trained["data"]), "--model", str(tmp_path / "early.safetensors"),
                                           "--json", "--workers", "0"]).stdout)
    assert early["unknown"]["rule"] == "off"  # (it reported a rule the model does not have: "0 of 9 flagged")
    (runs / "results.json.aside").rename(runs / "stopped" / "results.json")
    finished = say()
    assert "newest model" in finished and "did not finish" not in finished
    # A finished run, and a newer one still training (its model file written as it goes, without
    # calibration or the unknown rule): the finished one is used, and the newer one named.
    shutil.copytree(runs / "stopped", runs / "done")
    os.utime(runs / "done" / "model.safetensors", ns=(1, (runs / "stopped" / "model.safetensors").stat().st_mtime_ns - 10**9))
    (runs / "stopped" / "results.json").unlink()
    assert (f"using the newest model: {runs / 'done' / 'model.safetensors'} (the newest finished run; {runs / 'stopped'} is "
            f"newer and has not finished: --model {runs / 'stopped'} uses its best epoch so far)") in " ".join(say().split())


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "json"])
def test_predict_with_a_bad_option_writes_nothing_on_stdout(trained, fmt):
    # (the CSV header came out before the settings were checked: `> out.csv` left a file that looked valid)
    img = str(trained["data"] / "val" / "dog" / "dog_0.jpg")
    result = predict(trained, img, "--format", fmt, "--min-score", "1.5")
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.endswith("\nerror: --min-score must be between 0 and 1 (got 1.5).\n")
    no_such_device = predict(trained, img, "--format", fmt, "--device", "tpu")
    assert no_such_device.exit_code == 2 and no_such_device.stdout == ""
    assert no_such_device.stderr.endswith("\nerror: unknown --device 'tpu'; use one of auto, cpu, cuda, mps.\n")


def test_predict_json_csv_and_table(trained, tmp_path):
    img = str(trained["data"] / "val" / "dog" / "dog_0.jpg")
    as_json = predict(trained, img, "--format", "json", "--top-k", "2")
    parsed = json.loads(as_json.stdout)
    assert isinstance(parsed, list) and parsed[0]["path"] == img and len(parsed[0]["top_k"]) == 2
    as_csv = list(csv.DictReader(io.StringIO(predict(trained, img, "--format", "csv").stdout)))
    top_5 = predict(trained, img, "--format", "csv", "--top-k", "5")  # (ignored without a word)
    assert "warning: --top-k 5: CSV's columns are fixed (each image's label and score); --format jsonl or json gives " \
           "the top 5." in top_5.stderr and list(csv.DictReader(io.StringIO(top_5.stdout))) == as_csv
    assert as_csv[0]["path"] == img and as_csv[0]["label"] == parsed[0]["label"] and as_csv[0]["error"] == ""
    import shutil

    short = str(shutil.copy(img, tmp_path / "x.jpg"))  # (a path that names no class: the row's cells are read)
    table = predict(trained, short, "--format", "table")
    rows = [[c.strip() for c in line.strip("│ ").split("│")] for line in table.stdout.splitlines() if line.startswith("│")]
    assert table.exit_code == 0 and rows[0][1:3] == [parsed[0]["label"], f"{parsed[0]['score']:.3f}"]
    assert "".join(r[0] for r in rows) == short  # (folded over lines, not cut short with "…")


def test_predict_glob_and_stdin_and_model_option(trained):
    pattern = str(trained["data"] / "val" / "cat" / "*.jpg")
    by_glob = predict(trained, pattern, "--model", trained["summary"]["run_dir"], "--format", "jsonl")
    assert len(by_glob.stdout.splitlines()) == 3 and "newest model" not in by_glob.stderr
    paths = "\n".join(str(p) for p in sorted((trained["data"] / "val" / "fox").glob("*.jpg"))) + "\n"
    by_stdin = predict(trained, "-", "--model", trained["summary"]["model"], "--format", "jsonl", input=paths)
    assert [json.loads(x)["path"] for x in by_stdin.stdout.splitlines()] == paths.split()


def test_predict_reports_unreadable_inputs_and_exits_1(trained, tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not really a jpeg")
    good = str(trained["data"] / "val" / "cat" / "cat_0.jpg")
    result = predict(trained, good, str(bad), str(tmp_path / "missing.png"), "--format", "jsonl")
    assert result.exit_code == 1
    records = [json.loads(x) for x in result.stdout.splitlines()]
    assert [r["path"] for r in records] == [good, str(bad), str(tmp_path / "missing.png")]
    assert "label" in records[0]
    assert "error" in records[1] and "error" in records[2] and records[2]["error"] == "file not found"
    assert "2 of 3 inputs could not be predicted (see their 'error' field)" in result.stderr
    table = predict(trained, good, str(bad), "--format", "table")  # (the table has no 'error' field to see)
    assert table.exit_code == 1 and "1 of 2 inputs could not be predicted (their rows in the table say why)" in table.stderr


def test_predict_names_dicom_files_and_folders_without_images(trained, tmp_path):
    scans = tmp_path / "scans"
    scans.mkdir()
    (scans / "1.2.840.10008.1").write_bytes(b"\0" * 128 + b"DICM")  # an exported series: no suffix
    (tmp_path / "empty").mkdir()
    result = predict(trained, str(scans / "1.2.840.10008.1"), str(scans), str(tmp_path / "empty"), "--format", "jsonl")
    assert result.exit_code == 1
    errors = [json.loads(x)["error"] for x in result.stdout.splitlines()]
    assert errors[0].startswith("DICOM, not read: export the images as PNG")
    assert errors[1].startswith("no images in this folder, only 1 file it does not read (e.g. 1.2.840.10008.1: DICOM")
    assert errors[2] == "no images in this folder"


def deny_listing(monkeypatch, *folders: Path) -> None:
    """As folders without read permission would be (the tests may run as root, who reads all)."""
    real_scandir = os.scandir

    def scandir(path="."):
        if Path(path) in folders:
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)


def test_predict_reports_folders_it_may_not_read(trained, tmp_path, monkeypatch):
    import shutil

    inbox = tmp_path / "inbox"
    shutil.copytree(trained["data"] / "val" / "cat", inbox)
    (inbox / "private").mkdir()
    (tmp_path / "locked").mkdir()
    deny_listing(monkeypatch, inbox / "private", tmp_path / "locked")
    result = predict(trained, str(inbox), str(tmp_path / "locked"), "--format", "jsonl")
    assert result.exit_code == 1 and "Traceback" not in result.stderr  # (it was a PermissionError's traceback)
    records = [json.loads(x) for x in result.stdout.splitlines()]
    assert sum("label" in r for r in records) == 3
    errors = {r["path"]: r["error"] for r in records if "error" in r}
    assert errors == {str(inbox / "private"): "a folder that may not be read (permission denied): make it readable",
                      str(tmp_path / "locked"): "a folder that may not be read (permission denied): make it readable"}


def test_evaluate_on_a_folder_it_may_not_read_is_one_line(trained, monkeypatch):
    val = trained["data"] / "val"
    deny_listing(monkeypatch, val / "cat")
    result = runner.invoke(app, ["evaluate", str(val), "--model", trained["summary"]["model"], "--workers", "0"])
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr.strip().splitlines()[-1] == f"error: {val / 'cat'}: permission denied; make it readable or pass another folder."


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes are POSIX")
def test_predict_reports_a_named_pipe_instead_of_waiting_on_it(trained, tmp_path):
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)  # (opening it to decode would wait for a writer forever)
    result = predict(trained, str(fifo), "--format", "jsonl")
    assert result.exit_code == 1 and json.loads(result.stdout)["error"] == "not a regular file"


def test_more_workers_than_cores_are_capped_and_said_once(trained, monkeypatch):
    import warnings

    from finetune import cpus

    monkeypatch.setattr(cpus, "usable_cores", lambda: 2)
    img = str(trained["data"] / "val" / "dog" / "dog_0.jpg")
    with warnings.catch_warnings(record=True) as caught:  # (torch's own: a multi-line UserWarning, twice)
        warnings.simplefilter("always")
        result = runner.invoke(app, ["predict", img, "--runs-dir", str(trained["runs"]), "--workers", "100", "--format", "jsonl"])
    assert result.exit_code == 0 and json.loads(result.stdout)["label"] == "dog"
    assert result.stderr.startswith("warning: --workers 100: this process may use 2 cores; using 2 loader processes.\n")
    assert not [w for w in caught if "worker" in str(w.message)]


def test_empty_paths_are_refused_not_read_as_the_current_folder(trained, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # ("$DIR" with DIR unset: each of these read or wrote the current folder)
    for args in (["predict", "x.jpg", "--runs-dir", ""], ["predict", "x.jpg", "--model", ""], ["export", "--model", ""],
                 ["info", ""]):
        refused = runner.invoke(app, args)
        assert refused.exit_code == 2 and "empty (an unset shell variable?)" in refused.stderr, args
    out = runner.invoke(app, ["export", "--model", trained["summary"]["model"], "--out", ""])
    assert out.exit_code == 2 and out.stderr.startswith("error: --out is empty (an unset shell variable?)")
    empty_input = predict(trained, "", "--format", "jsonl")
    assert empty_input.exit_code == 1 and json.loads(empty_input.stdout) == {"path": "", "error": "an empty path (an unset shell variable?)"}
    assert list(tmp_path.iterdir()) == []


def test_predict_usage_errors_exit_2(trained, tmp_path):
    assert predict(trained, "x.jpg", "--format", "xml").exit_code == 2
    no_runs = runner.invoke(app, ["predict", "x.jpg", "--runs-dir", str(tmp_path / "none")])
    assert no_runs.exit_code == 2 and "no trained model under" in no_runs.stderr and no_runs.stdout == ""
    assert predict(trained, "x.jpg", "--top-k", "0").exit_code == 2
    no_stdin = predict(trained, "-", input="")
    assert no_stdin.exit_code == 2 and no_stdin.stderr.startswith("error: -: standard input gave no paths")
    runs = runner.invoke(app, ["predict", "x.jpg", "--model", str(trained["runs"])])  # (the runs folder, not a run)
    assert runs.exit_code == 2 and f"{trained['runs']}: a folder of runs, not a run; --runs-dir {trained['runs']}" in runs.stderr
    for contradiction, says in ((["--no-unknown", "--max-distance", "0.1"], "--no-unknown answers a class for every image"),
                                (["--format", ""], "--format must be one of table, json, jsonl, csv (got '')")):
        refused = predict(trained, "x.jpg", *contradiction)  # (the second option was ignored; '' read as the default)
        assert refused.exit_code == 2 and says in refused.stderr and refused.stdout == ""
    negative = runner.invoke(app, ["predict", "x.jpg", "--runs-dir", str(trained["runs"]), "--workers", "-1"])
    assert negative.exit_code == 2 and "--workers must be 0 or more" in negative.stderr


def test_python_dash_m_entry_point(trained):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "finetune", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("finetune ")


def test_the_program_says_what_goes_wrong_with_its_output_in_one_line(trained, tmp_path):
    # (as a CI job or a container runs it: each of these was a traceback, a hang, silence or exit 1)
    import shutil
    import subprocess
    import sys

    img = shutil.copy(trained["data"] / "val" / "cat" / "cat_0.jpg", tmp_path / "café.jpg")
    model = trained["summary"]["model"]

    def run(shell: str, **env):
        return subprocess.run(["bash", "-o", "pipefail", "-c", shell], capture_output=True, text=True, timeout=120,
                              env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), **env})

    finetune = f"{sys.executable} -m finetune"
    silent = run(f"{finetune} predict {img} --model /nowhere", COLUMNS="0")  # (some containers say 0: nothing was printed)
    assert silent.returncode == 2 and "model file not found" in silent.stderr
    full = run(f"{finetune} predict {img} --model {model} --format jsonl --workers 1 > /dev/full")  # (a hang)
    assert full.returncode == 1 and full.stderr.strip().endswith("error: the output: cannot be written (No space left on device).")
    ascii_only = run(f"{finetune} predict {img} --model {model} --format csv --workers 0", PYTHONIOENCODING="ascii")
    assert ascii_only.returncode == 1 and "error: the output's encoding (ascii) cannot write '" in ascii_only.stderr
    assert "set PYTHONUTF8=1 or a UTF-8 locale" in ascii_only.stderr and "Traceback" not in ascii_only.stderr
    closed = run(f"{finetune} predict - --model {model} <&-")
    assert closed.returncode == 2 and "standard input gave no paths" in closed.stderr
    piped = run(f"{finetune} evaluate {trained['data']} --model {model} --workers 0 | head -1")  # (rich exited 1)
    assert piped.returncode == 0 and piped.stdout.startswith("accuracy ")
    gone = tmp_path / "gone"  # (a shell left in a deleted folder: torch's import ended the process with oneMKL's message)
    deleted = run(f"mkdir {gone} && cd {gone} && rmdir {gone} && {finetune} predict {img} --model {model}",
                  PYTHONPATH=os.pathsep.join(p for p in sys.path if os.path.isabs(p)))  # ('' ended Python's start)
    assert deleted.returncode == 2 and deleted.stderr.startswith("error: the current folder no longer exists")
    assert len(deleted.stderr.strip().splitlines()) == 1


def test_a_diverging_run_stops_with_one_line_and_keeps_no_model_of_it(image_folder, tmp_path):
    runs = tmp_path / "runs"
    result = runner.invoke(app, ["train", str(image_folder), "--runs-dir", str(runs), *FAST_TRAIN_ARGS, "--lr", "1e30"])
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr.startswith("error: training diverged: the loss became nan in head 1 of ")
    assert "start again with a lower --lr (it is 1e+30, the default 0.001)" in result.stderr and "Traceback" not in result.stderr
    assert list(runs.iterdir()) == []  # (no model, no state: nor a folder of config.json and metrics.csv to sort out)
    infinite = runner.invoke(app, ["train", str(image_folder), "--runs-dir", str(runs), "--lr", "inf"])
    assert infinite.exit_code == 2 and "--lr must be a positive number (got inf)" in infinite.stderr


def test_evaluate_on_the_folder_a_model_learnt_from_measures_the_images_it_held_out(tmp_path, monkeypatch):
    # One folder of classes: training held 20% out for val. Evaluating that folder must not count
    # the images the model learnt from, wherever evaluate runs from.
    from conftest import CLASS_COLOURS, make_class_tree, make_image

    make_class_tree(tmp_path / "work" / "flat", 10, classes=("cat", "dog"))
    monkeypatch.chdir(tmp_path / "work")
    trained = runner.invoke(app, ["train", "flat", "--runs-dir", "runs", "--json", *FAST_TRAIN_ARGS])
    assert trained.exit_code == 0, trained.stderr
    summary = json.loads(trained.stdout)
    assert summary["run_dir"] == str(tmp_path / "work" / "runs" / "train")  # (absolute: results.json is read from anywhere)
    monkeypatch.chdir(tmp_path)
    model = str(tmp_path / "work" / "runs" / "train")
    held_out = runner.invoke(app, ["evaluate", str(tmp_path / "work" / "flat"), "--model", model, "--json"])
    assert held_out.exit_code == 0, held_out.stderr
    report = json.loads(held_out.stdout)
    assert report["num_images"] == summary["num_val"] == 4 and report["data"].endswith("(the val images its training held out)")
    assert report["accuracy"] == summary["best_val_acc"]
    (tmp_path / "link").symlink_to(tmp_path / "work")  # the same folder by another name (it measured every image)
    by_link = json.loads(runner.invoke(app, ["evaluate", str(tmp_path / "link" / "flat"), "--model", model, "--json"]).stdout)
    assert by_link["num_images"] == 4 and by_link["data"].endswith("(the val images its training held out)")
    import shutil

    shutil.copytree(tmp_path / "work" / "flat", tmp_path / "moved")  # (a copy elsewhere: it counted the training images)
    moved = json.loads(runner.invoke(app, ["evaluate", str(tmp_path / "moved"), "--model", model, "--json"]).stdout)
    assert moved["num_images"] == 4 and moved["data"] == f"{tmp_path / 'moved'} (the val images its training held out)"
    assert moved["accuracy"] == summary["best_val_acc"]
    make_class_tree(tmp_path / "namesake", 10, classes=("cat", "dog"), seed=5)  # (the same names, other images)
    from finetune import digests

    hashed = []
    real_file_digest = digests.file_digest
    monkeypatch.setattr(digests, "file_digest", lambda path: hashed.append(path) or real_file_digest(path))
    namesake = json.loads(runner.invoke(app, ["evaluate", str(tmp_path / "namesake"), "--model", model, "--json"]).stdout)
    assert namesake["num_images"] == 20 and namesake["data"] == str(tmp_path / "namesake")
    assert len(hashed) == 20  # (each file hashed once: looking for the held-out images, then measuring them all, read it twice)
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    make_class_tree(tmp_path / "other", 3, classes=("cat", "dog"), seed=9)  # a folder it never saw: all of it
    other = json.loads(runner.invoke(app, ["evaluate", str(tmp_path / "other"), "--model", model, "--json"]).stdout)
    assert other["num_images"] == 6 and other["data"] == str(tmp_path / "other")
    flat = tmp_path / "work" / "flat"
    rows = ["path,label", *(f"{p.relative_to(flat).as_posix()},{p.parent.name}" for p in sorted(flat.glob("*/*.jpg")))]
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")  # (the model learnt from the folders, not this CSV)
    by_csv = json.loads(runner.invoke(app, ["evaluate", str(flat), "--model", model, "--labels", str(tmp_path / "labels.csv"),
                                            "--json"]).stdout)
    assert by_csv["num_images"] == 20 and "held out" not in by_csv["data"]
    make_image(flat / "cat" / "cat_new.jpg", CLASS_COLOURS["cat"], seed=123)  # the folder changed: its val split too
    changed = json.loads(runner.invoke(app, ["evaluate", str(flat), "--model", model, "--json"]).stdout)
    assert changed["num_images"] == 21 and "every image: it changed since the model learnt from it" in changed["data"]


def test_evaluate_finds_the_held_out_images_again_when_some_of_them_could_not_be_read(tmp_path):
    # Training dropped the val files it could not decode before it wrote the val set's digest;
    # evaluate's scan keeps them until it reads them: another digest, so every image measured.
    from conftest import make_class_tree

    flat = make_class_tree(tmp_path / "flat", 10, classes=("cat", "dog"))
    for c in ("cat", "dog"):
        for i in range(4):
            (flat / c / f"broken_{i}.jpg").write_text(f"junk {c} {i}")  # (each its own bytes: no duplicates)
    trained = runner.invoke(app, ["train", str(flat), "--runs-dir", str(tmp_path / "runs"), "--json", *FAST_TRAIN_ARGS])
    assert trained.exit_code == 0, trained.stderr
    summary = json.loads(trained.stdout)
    assert len(summary["skipped"]) == 8 and summary["num_val"] < 28 // 5  # (broken files took val places)
    report = json.loads(runner.invoke(app, ["evaluate", str(flat), "--model", summary["run_dir"], "--json"]).stdout)
    assert report["data"].endswith("(the val images its training held out)")
    assert report["num_images"] == summary["num_val"] and report["accuracy"] == summary["best_val_acc"]


@pytest.mark.parametrize("command", ["train", "check", "evaluate"])
def test_an_empty_data_argument_is_refused_not_read_as_the_current_folder(tmp_path, monkeypatch, command):
    # `finetune train "$DATA"` with DATA unset: Path("") is ".", which was read (and trained on).
    from conftest import make_class_tree

    make_class_tree(tmp_path, 3, classes=("cat", "dog"))  # (the current folder would do as DATA)
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, [command, "", "--runs-dir", str(tmp_path.parent / "runs")] if command == "train" else [command, ""])
    assert result.exit_code == 2 and result.stdout == ""
    said = " ".join(result.stderr.translate({ord(c): " " for c in "│╭╮╰╯─"}).split())  # (typer's box around the line)
    assert "Invalid value for 'data': DATA is empty (an unset shell variable?); give the image folder, or . for this one." in said
    assert not (tmp_path.parent / "runs").exists()


def test_json_on_stdout_holds_no_nan_for_strict_parsers():
    # (a model of NaNs from elsewhere scores NaN: json.dumps wrote NaN, which strict parsers refuse)
    from finetune.cli.output import json_text

    def refuse(constant):
        raise ValueError(constant)

    nan, inf = float("nan"), float("inf")
    text = json_text([{"path": "a.jpg", "score": nan, "top_k": [{"label": "cat", "score": inf}], "distance": 0.5}], indent=2)
    assert json.loads(text, parse_constant=refuse) == [{"path": "a.jpg", "score": None, "top_k": [{"label": "cat", "score": None}],
                                                       "distance": 0.5}]
    assert json_text({"score": 0.25}) == '{"score": 0.25}'
