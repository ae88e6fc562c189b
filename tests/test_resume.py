"""Crash safety: Ctrl-C keeps the last good files and --resume continues exactly; OOM; seeds."""

from __future__ import annotations

import csv
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from finetune import Reporter, TrainConfig, load_model, train
from finetune.cli import app
from finetune.errors import TrainingInterrupted
from finetune.features import FeatureExtractor
from finetune.resume import STATE_FILENAME, ResumeState
from finetune.stages import FinetuneStage

from conftest import CLASS_COLOURS, FAST_TRAIN_ARGS, make_image, make_train_val, tree_hashes

runner = CliRunner()
COMPARED = ("epoch", "stage", "train_loss", "train_acc", "val_loss", "val_acc", "lr")


def config(data: Path, runs: Path, **kw) -> TrainConfig:
    base = TrainConfig(data=data, runs_dir=runs, arch="efficientnet_lite0", img_size=64, epochs=3, views=2,
                       tail_epochs=2, finetune_epochs=2, batch_size=8, workers=0, seed=3)
    return replace(base, **kw)


class CtrlCAt(Reporter):
    """Raises KeyboardInterrupt on the n-th `advance` of a stage whose name starts with `stage`."""

    def __init__(self, stage: str, n: int):
        self.stage, self.n, self.current, self.count = stage, n, "", 0

    def start(self, description, total):
        self.current, self.count = description, 0

    def advance(self, steps=1, **fields):
        if self.current.startswith(self.stage) and steps:
            self.count += 1
            if self.count == self.n:
                raise KeyboardInterrupt


def compared(history):
    return [{k: row[k] for k in COMPARED} for row in (record.to_csv_row() for record in history)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    make_train_val(root / "data")
    result = train(config(root / "data", root / "ref"))
    return root / "data", result


# ("Tail (last blocks) epoch 1", 1): from the state the head stage left (the winning candidate head, adopted)
@pytest.mark.parametrize("stage, n", [("Fine-tune epoch 2", 1), ("Tail (last blocks) epoch 1", 1), ("Tail (last blocks) epoch 2", 1)])
def test_interrupt_then_resume_matches_an_uninterrupted_run(reference, tmp_path, stage, n):
    data, ref = reference
    before = tree_hashes(data)
    with pytest.raises(TrainingInterrupted, match="--resume"):
        train(config(data, tmp_path), CtrlCAt(stage, n))
    run = tmp_path / "train"
    assert (run / STATE_FILENAME).is_file()
    if stage.startswith("Fine-tune"):
        assert load_model(run / "model.safetensors").classes == ["cat", "dog", "fox"]  # last good model loadable
    resumed = train(TrainConfig(resume=run))
    assert resumed.run_dir == run
    assert compared(resumed.history) == compared(ref.history)
    assert resumed.best_val_acc == ref.best_val_acc and resumed.best_epoch == ref.best_epoch
    saved, expected = load_model(run).model.state_dict(), load_model(ref.run_dir).model.state_dict()
    assert all(torch.equal(saved[k], expected[k]) for k in expected)  # the very same best model
    assert not (run / STATE_FILENAME).exists()
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert [int(r["epoch"]) for r in rows] == list(range(1, 8))
    assert [r["stage"] for r in rows] == ["head"] * 3 + ["tail"] * 2 + ["finetune"] * 2
    assert tree_hashes(data) == before


def test_ctrl_c_while_the_candidate_heads_train_says_to_start_again(reference, tmp_path):
    data, _ = reference
    with pytest.raises(TrainingInterrupted, match="start it again"):  # they take seconds; the features are in the cache
        train(config(data, tmp_path), CtrlCAt("Head 2 of 4", 2))
    assert not (tmp_path / "train" / STATE_FILENAME).exists() and not (tmp_path / "train" / "model.safetensors").exists()


def test_cli_ctrl_c_exits_130_with_a_message(reference, tmp_path, monkeypatch):
    data, _ = reference

    def interrupted(self):  # Ctrl-C as the fine-tune stage asks for its first batch
        raise KeyboardInterrupt
        yield

    monkeypatch.setattr(FinetuneStage, "batches", interrupted)
    result = runner.invoke(app, ["train", str(data), "--runs-dir", str(tmp_path), "--finetune-epochs", "1", *FAST_TRAIN_ARGS])
    assert result.exit_code == 130
    assert "training interrupted; the model kept so far is in" in result.stderr
    assert f"finetune train --resume {tmp_path / 'train'}" in result.stderr
    assert load_model(tmp_path / "train" / "model.safetensors").classes == ["cat", "dog", "fox"]


def test_cli_ctrl_c_while_loading_weights_exits_130_with_one_line(reference, tmp_path, monkeypatch):
    data, _ = reference

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr("finetune.training.resolve_pretrained", interrupted)
    result = runner.invoke(app, ["train", str(data), "--runs-dir", str(tmp_path), *FAST_TRAIN_ARGS])
    assert result.exit_code == 130 and result.stdout == ""
    assert result.stderr.strip().splitlines()[-1] == \
        "error: training interrupted before its first epoch; nothing to resume: start it again."


def test_cli_resume_of_a_finished_or_foreign_folder_is_refused(reference, tmp_path):
    _, ref = reference
    done = runner.invoke(app, ["train", "--resume", str(ref.run_dir)])
    assert done.exit_code == 2 and "already finished" in done.stderr
    other = runner.invoke(app, ["train", "--resume", str(tmp_path)])
    assert other.exit_code == 2 and "not a run folder" in other.stderr
    nothing = runner.invoke(app, ["train"])
    assert nothing.exit_code == 2 and "missing DATA" in nothing.stderr
    (tmp_path / "config.json").write_text('{"data": "photos", "epo')  # (cut short: a full disk, an editor)
    damaged = runner.invoke(app, ["train", "--resume", str(tmp_path)])
    assert damaged.exit_code == 2 and "Traceback" not in damaged.stderr  # (it was a JSONDecodeError's)
    assert damaged.stderr.strip().splitlines()[-1] == (
        f"error: --resume {tmp_path}: its config.json cannot be read (not the settings a run writes); "
        "the run cannot be resumed. Start a new run.")


def test_a_run_being_trained_is_not_resumed_by_a_second_process(reference, tmp_path, monkeypatch):
    import fcntl
    import shutil

    from finetune import training
    from finetune.errors import UsageError
    from finetune.runs import training_lock

    data, ref = reference
    stopped = tmp_path / "stopped"
    stopped.mkdir()
    shutil.copy(ref.run_dir / "config.json", stopped / "config.json")  # (a run not finished)
    with open(stopped / "config.json", "rb") as held:  # as the process training it holds it
        fcntl.flock(held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        second = runner.invoke(app, ["train", "--resume", str(stopped)])
    assert second.exit_code == 2 and second.stderr == (
        f"error: --resume {stopped}: another process is training this run now; let it finish, or stop it (Ctrl-C) and "
        f"resume then.\n")
    after = runner.invoke(app, ["train", "--resume", str(stopped)])  # (let go: on to what is missing)
    assert after.exit_code == 2 and "nothing to resume" in after.stderr
    tried = []

    def resumed_meanwhile(run, *args):  # (while a run trains, its folder is locked)
        with pytest.raises(UsageError, match="another process is training this run now"):
            with training_lock(run.folder.path):
                pass
        tried.append(run.folder.path)
        raise KeyboardInterrupt

    monkeypatch.setattr(training, "run_stages", resumed_meanwhile)
    with pytest.raises(TrainingInterrupted):
        train(config(data, tmp_path / "runs"))
    assert len(tried) == 1
    monkeypatch.undo()

    def no_locks_here(fd, operation):  # (some network file systems: every run was refused as "being trained")
        raise OSError(38, "Function not implemented")

    monkeypatch.setattr(fcntl, "flock", no_locks_here)
    assert train(config(data, tmp_path / "unlocked")).best_val_acc == ref.best_val_acc


# SIGTERM: docker stop, scancel, a plain timeout; SIGHUP: the terminal closed, ssh dropped. Both killed
# the process where it stood (SIGHUP: exit 129, no word, the features computed so far never cached).
@pytest.mark.parametrize("signame, code", [("SIGTERM", 143), ("SIGHUP", 129)])
def test_sigterm_or_sighup_stops_a_run_as_ctrl_c_does(reference, tmp_path, signame, code):
    import os
    import signal

    signum = getattr(signal, signame)

    class TermAt(CtrlCAt):
        def advance(self, steps=1, **fields):
            try:
                super().advance(steps, **fields)
            except KeyboardInterrupt:
                os.kill(os.getpid(), signum)

    data, _ = reference
    outside = signal.signal(signum, signal.SIG_DFL)  # (as in a terminal: CI may run under nohup)
    before = signal.getsignal(signum)
    with pytest.raises(TrainingInterrupted, match=rf"training stopped by {signame}; the model kept so far is in .* "
                                                  r"Continue with: finetune train --resume") as stopped:
        train(config(data, tmp_path / "runs"), TermAt("Fine-tune epoch 1", 1))
    restored = signal.signal(signum, outside)
    assert stopped.value.exit_code == code  # (as shells and schedulers read the signal; Ctrl-C's is 130)
    assert restored is before and (tmp_path / "runs" / "train" / STATE_FILENAME).is_file()


def test_sigterm_while_a_run_writes_its_end_lets_it_finish(reference, tmp_path, monkeypatch):
    import os
    import signal

    from finetune import training

    data, _ = reference
    real_finish = training.finish

    def terminated_while_finishing(*args):  # (it was reported as "interrupted before its first epoch")
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)  # (a trial: Ctrl-C three times there, seconds of silence, then exit 0)
        return real_finish(*args)

    class Warned(Reporter):
        def __init__(self):
            self.warned = []

        def warn(self, message):
            self.warned.append(message)

    monkeypatch.setattr(training, "finish", terminated_while_finishing)
    said = Warned()
    result = train(config(data, tmp_path / "runs"), said)
    assert (result.run_dir / "results.json").is_file() and not (result.run_dir / STATE_FILENAME).exists()
    told = [w for w in said.warned if w.startswith("the run is writing its end")]
    assert told == ["the run is writing its end (model, test split, report): it stops when that is done"]  # (once)


def test_cuda_out_of_memory_suggests_a_smaller_batch(reference, tmp_path, monkeypatch):
    data, _ = reference

    def oom(self, split, views):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(FeatureExtractor, "features_of", oom)
    result = runner.invoke(app, ["train", str(data), "--runs-dir", str(tmp_path / "runs"), *FAST_TRAIN_ARGS])
    assert result.exit_code == 1 and result.stdout == ""
    assert "ran out of memory at --batch-size 8; start again with --batch-size 4" in result.stderr
    assert list((tmp_path / "runs").iterdir()) == []  # (nothing kept: no run folder to sort out)
    assert "Traceback" not in result.stderr


def test_cuda_out_of_memory_in_a_resumed_run_does_not_suggest_what_resume_ignores(reference, tmp_path, monkeypatch):
    data, _ = reference
    with pytest.raises(TrainingInterrupted):
        train(config(data, tmp_path), CtrlCAt("Fine-tune epoch 2", 1))

    def oom(self):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        yield

    monkeypatch.setattr(FinetuneStage, "batches", oom)
    result = runner.invoke(app, ["train", "--resume", str(tmp_path / "train")])
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr.splitlines()[-1] == ("error: the GPU ran out of memory at this run's --batch-size 8; free the GPU's memory "
                                    "(other processes) and resume again, or start a new run with --batch-size 4.")
    assert (tmp_path / "train" / STATE_FILENAME).is_file()  # (still resumable)


def test_same_seed_same_run_on_cpu(reference, tmp_path):
    data, ref = reference
    again = train(config(data, tmp_path))
    assert compared(again.history) == compared(ref.history)
    other = train(config(data, tmp_path, seed=4))
    assert compared(other.history) != compared(ref.history)


def test_later_stages_validate_and_keep_their_weights_average(reference, tmp_path):
    data, ref = reference
    plain = train(config(data, tmp_path, average_epochs=0, finetune_epochs=0))  # the weights as trained
    ref_rows, plain_rows = compared(ref.history), compared(plain.history)
    head, tail = slice(0, 3), slice(3, 5)
    assert [r["stage"] for r in ref_rows[tail]] == ["tail", "tail"] and plain_rows[head] == ref_rows[head]
    trained = lambda rows: [(r["train_loss"], r["train_acc"]) for r in rows]  # noqa: E731
    assert trained(plain_rows[tail]) == trained(ref_rows[tail])  # the same steps: the average does not train
    assert [r["val_loss"] for r in plain_rows[tail]] != [r["val_loss"] for r in ref_rows[tail]]  # what is validated


def test_resuming_a_run_with_nothing_kept_is_refused_before_its_folder_is_read(reference, tmp_path):
    """A trial: a killed run's folder (its config alone) was scanned and its backbone loaded, then refused."""
    from finetune.errors import UsageError

    _, ref = reference
    stopped = tmp_path / "stopped"
    stopped.mkdir()
    saved = json.loads((ref.run_dir / "config.json").read_text())
    (stopped / "config.json").write_text(json.dumps({**saved, "data": str(tmp_path / "gone")}))  # (never read)
    with pytest.raises(UsageError, match=r"nothing to resume \(no last_state.safetensors\): the run stopped before it kept"):
        train(TrainConfig(resume=stopped))


def test_a_resumed_run_that_finishes_removes_what_a_killed_write_left(reference, tmp_path):
    """A trial: SIGKILL while the model file was written left '.model.safetensors.XXXX.tmp' (2 MB) for good."""
    data, _ = reference
    with pytest.raises(TrainingInterrupted):
        train(config(data, tmp_path), CtrlCAt("Fine-tune epoch 1", 1))
    leftover = tmp_path / "train" / ".model.safetensors.mf1j0f7e.tmp"
    leftover.write_bytes(b"half a model")
    train(TrainConfig(resume=tmp_path / "train"))
    assert not leftover.exists() and (tmp_path / "train" / "results.json").is_file()


def test_ctrl_c_before_the_first_epoch_does_not_promise_a_resume(reference, tmp_path):
    data, _ = reference
    with pytest.raises(TrainingInterrupted, match="stopped before it kept an epoch to resume from") as info:
        train(config(data, tmp_path), CtrlCAt("Features (train)", 1))
    assert "--resume" not in str(info.value) and "(its run folder removed)" in str(info.value)
    assert not (tmp_path / "train").exists()  # (each interrupted start left one more folder, nothing in it to use)


def test_resume_works_from_another_directory(reference, tmp_path, monkeypatch):
    data, ref = reference
    monkeypatch.chdir(data.parent)
    with pytest.raises(TrainingInterrupted):
        train(config(Path(data.name), Path("relative_runs")), CtrlCAt("Fine-tune epoch 1", 1))
    saved = json.loads((data.parent / "relative_runs" / "train" / "config.json").read_text())
    assert Path(saved["data"]).is_absolute() and Path(saved["runs_dir"]).is_absolute()
    monkeypatch.chdir(tmp_path)
    resumed = train(TrainConfig(resume=data.parent / "relative_runs" / "train"))
    assert compared(resumed.history) == compared(ref.history)


def test_a_resumed_runs_seconds_count_the_time_before_the_interruption_too(reference, tmp_path, monkeypatch):
    from finetune import resume

    data, _ = reference
    with pytest.raises(TrainingInterrupted):
        train(config(data, tmp_path), CtrlCAt("Fine-tune epoch 2", 1))
    saved = ResumeState.load(tmp_path / "train" / STATE_FILENAME)
    assert saved.seconds > 0  # the features, the heads, the tail and a fine-tuning epoch
    load = ResumeState.load
    monkeypatch.setattr(resume.ResumeState, "load", lambda path: replace(load(path), seconds=1000.0))  # a long first part
    resumed = train(TrainConfig(resume=tmp_path / "train"))
    assert 1000.0 < resumed.seconds < 1000.0 + 600


def test_data_and_options_given_with_resume_are_said_to_be_ignored(reference, tmp_path):
    # (the run goes on as it started: a DATA or --epochs given with --resume changed nothing, silently)
    data, ref = reference
    with pytest.raises(TrainingInterrupted):
        train(config(data, tmp_path / "runs"), CtrlCAt("Fine-tune epoch 1", 1))
    result = runner.invoke(app, ["train", str(tmp_path), "--resume", str(tmp_path / "runs" / "train"), "--epochs", "5",
                                 "--workers", "0", "--arch", "resnet18", "--no-cache", "--json"])  # (resnet18: the default)
    assert result.exit_code == 0, result.stderr
    assert ("warning: --resume goes on with the run's own data and settings; ignored: DATA, --arch, --epochs, --workers, "
            "--no-cache" in result.stderr)  # (--no-cache was named --cache)
    summary = json.loads(result.stdout)
    assert summary["epochs"] == len(ref.history) and summary["best_val_acc"] == ref.best_val_acc  # (3 head epochs, as started)


def test_early_stop_is_remembered_by_resume(reference, tmp_path):
    data, _ = reference
    cfg = config(data, tmp_path, epochs=40, patience=2, finetune_epochs=1)
    full = train(replace(cfg, runs_dir=tmp_path / "full"))
    assert full.stopped_early
    with pytest.raises(TrainingInterrupted):
        train(cfg, CtrlCAt("Fine-tune epoch 1", 1))
    resumed = train(TrainConfig(resume=tmp_path / "train"))
    assert compared(resumed.history) == compared(full.history) and resumed.stopped_early


def an_image_added(data: Path) -> None:
    make_image(data / "train" / "cat" / "cat_new.jpg", CLASS_COLOURS["cat"], seed=999)  # (a mere copy is dropped)


def a_val_image_rewritten(data: Path) -> None:
    """Its name kept: the kept epoch's val logits, the calibration's and unknown rule's ground, were of other bytes."""
    first = sorted((data / "val" / "cat").iterdir())[0]
    make_image(first, CLASS_COLOURS["cat"], seed=998, fmt="JPEG")


def a_val_image_broken(data: Path) -> None:
    """It would no longer decode (refused by its bytes, as a rewritten one: the run went on, and its model came
    out with no calibration or unknown rule)."""
    sorted((data / "val" / "dog").iterdir())[0].write_bytes(b"not an image any more")


@pytest.mark.parametrize("change", [an_image_added, a_val_image_rewritten, a_val_image_broken])
def test_resume_refuses_a_changed_folder(reference, tmp_path, change):
    import shutil

    data, _ = reference
    copy = tmp_path / "data"
    shutil.copytree(data, copy)
    with pytest.raises(TrainingInterrupted):
        train(config(copy, tmp_path / "runs"), CtrlCAt("Fine-tune epoch 1", 1))
    change(copy)
    from finetune.errors import DataError

    with pytest.raises(DataError, match="images were added, removed, renamed or changed since"):
        train(TrainConfig(resume=tmp_path / "runs" / "train"))


def test_a_state_from_before_contents_counted_resumes_on_the_same_names(reference, tmp_path):
    """States written before the files' bytes counted hold their names' digest: still resumable."""
    from finetune.reading import scan_dataset
    from finetune.resume import files_digest

    data, _ = reference
    with pytest.raises(TrainingInterrupted):
        train(config(data, tmp_path / "runs"), CtrlCAt("Fine-tune epoch 1", 1))
    state = ResumeState.load(tmp_path / "runs" / "train" / STATE_FILENAME)
    split = scan_dataset(data, None, 3)
    assert state.files_digest == files_digest(split, data)  # (the contents' digest, spelt as written)
    old = replace(state, files_digest=files_digest(split, data, contents=False))
    old.check_same_data(split, files_digest(split, data), data, tmp_path)  # the same names: no error
    from finetune.errors import DataError

    with pytest.raises(DataError):
        old.check_same_data(replace(split, val=split.val[1:]), files_digest(split, data), data, tmp_path)
