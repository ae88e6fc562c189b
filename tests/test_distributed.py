"""Distributed training through torchrun: 2 CPU processes with the gloo backend."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from finetune.cli import app
from finetune.distributed import record_rank_error
from finetune.errors import GpuOutOfMemory
from finetune.launcher import RankRecord, decide_outcome, read_records, strip_devices_option, torchrun_args

from conftest import CLASS_COLOURS, make_image, make_train_val, tree_hashes

runner = CliRunner()
ARGS = ["--device", "cpu", "--arch", "efficientnet_lite0", "--img-size", "64", "--epochs", "3", "--views", "2", "--tail-epochs", "2", "--finetune-epochs", "2",
        "--workers", "0", "--batch-size", "8", "--json", "--quiet"]


def clean_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    return env


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    data = make_train_val(root / "data", 7, 5)
    for i in range(2):  # dog-coloured images filed as cats: accuracy below 1 that depends on every shard
        make_image(data / "val" / "cat" / f"odd_{i}.jpg", CLASS_COLOURS["dog"], seed=77 + i)
    (data / "train" / "cat" / "broken.jpg").write_bytes(b"junk")
    before = tree_hashes(data)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "-m", "finetune", "train", str(data), "--runs-dir", str(root / "runs"), *ARGS]
    out = subprocess.run(cmd, capture_output=True, text=True, env=clean_env(), timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return {"root": root, "data": data, "stdout": out.stdout, "stderr": out.stderr, "before": before}


def test_one_json_object_one_run_folder(ddp_run):
    lines = [line for line in ddp_run["stdout"].splitlines() if line.strip()]
    assert len(lines) == 1  # only rank 0 reports
    summary = json.loads(lines[0])
    assert [p.name for p in (ddp_run["root"] / "runs").iterdir()] == ["train"]
    assert summary["epochs"] == 7 and summary["num_train"] == 21 and summary["num_val"] == 17  # head 3, tail 2, fine-tune 2
    cache = summary["feature_cache"]  # counted over both ranks (each computes or reads its share)
    assert cache["hits"] + cache["computed"] == summary["num_train"] + summary["num_val"]
    assert "distributed: 2 processes (gloo)" not in ddp_run["stderr"]  # --quiet on rank 0, silence elsewhere


def test_bad_file_is_checked_and_reported_once(ddp_run):
    summary = json.loads(ddp_run["stdout"])
    assert [s["path"] for s in summary["skipped"]] == [str(ddp_run["data"] / "train" / "cat" / "broken.jpg")]
    assert ddp_run["stderr"].count("skipped ") == 1
    assert tree_hashes(ddp_run["data"]) == ddp_run["before"]


def test_val_accuracy_is_over_the_whole_val_set(ddp_run):
    summary = json.loads(ddp_run["stdout"])
    assert len((Path(summary["run_dir"]) / "metrics.csv").read_text().splitlines()) == 1 + 7
    report = runner.invoke(app, ["evaluate", str(ddp_run["data"]), "--model", summary["model"], "--json", "--workers", "0"])
    evaluated = json.loads(report.stdout)
    assert evaluated["num_images"] == 17
    assert evaluated["accuracy"] == summary["best_val_acc"] == 15 / 17  # not rounded in JSON


def test_model_predicts(ddp_run):
    summary = json.loads(ddp_run["stdout"])
    result = runner.invoke(app, ["predict", str(ddp_run["data"] / "val" / "dog"), "--model", summary["model"], "--format", "jsonl", "--workers", "0"])
    assert result.exit_code == 0 and len(result.stdout.splitlines()) == 5


def test_devices_option_builds_the_torchrun_command():
    argv = ["data", "--devices", "2", "--epochs", "3", "--devices=4"]
    assert strip_devices_option(argv) == ["data", "--epochs", "3"]
    assert torchrun_args(2, ["data"]) == ["--standalone", "--nproc-per-node=2", "-m", "finetune", "train", "data"]


def test_devices_one_matches_the_plain_run(tmp_path):
    data = make_train_val(tmp_path / "data", 4, 2)
    common = [str(data), *ARGS, "--finetune-epochs", "1"]
    plain = subprocess.run([sys.executable, "-m", "finetune", "train", *common, "--runs-dir", str(tmp_path / "a")],
                           capture_output=True, text=True, env=clean_env(), timeout=300)
    launched = subprocess.run([sys.executable, "-m", "finetune", "train", *[a for a in common if a != "--quiet"],
                               "--runs-dir", str(tmp_path / "b"), "--devices", "1"],
                              capture_output=True, text=True, env=clean_env(), timeout=300)
    assert plain.returncode == 0 and launched.returncode == 0, launched.stderr[-2000:]
    assert "distributed: 1 process (gloo)" in launched.stderr  # the DDP path, as on several devices
    metrics = [(tmp_path / run / "train" / "metrics.csv").read_text().splitlines() for run in ("a", "b")]
    strip = lambda rows: [",".join(r.split(",")[:7]) for r in rows]  # drop timing columns
    assert strip(metrics[0]) == strip(metrics[1])


@pytest.mark.parametrize("args, code, message", [
    (["missing"], 1, "no such folder"),
    (["data", "--epochs", "0"], 2, "--epochs must be at least 1"),
])
def test_a_failing_start_stops_every_rank_with_one_message(tmp_path, args, code, message):
    make_train_val(tmp_path / "data", 2, 1)
    cmd = [sys.executable, "-m", "finetune", "train", str(tmp_path / args[0]), *ARGS, *args[1:],
           "--runs-dir", str(tmp_path / "runs"), "--devices", "2"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=clean_env(), timeout=300)
    assert out.returncode == code
    assert out.stderr.count("error") == 1 and message in out.stderr and "Traceback" not in out.stderr
    assert out.stdout == "" and not (tmp_path / "runs").exists()


# --- one rank failing, or Ctrl-C, ends every rank with one clear message ---------------------
# The faults are put into the ranks by tests/ddp_faults/sitecustomize.py.

FAULTS = Path(__file__).parent / "ddp_faults"


def run_with_fault(tmp_path, fault: str, *extra: str, report: Path | None = None) -> subprocess.CompletedProcess:
    data = tmp_path / "data"
    if not data.exists():
        make_train_val(data, 6, 3)
    env = {**clean_env(), "PYTHONPATH": str(FAULTS), "FINETUNE_TEST_FAULT": fault}
    if report is not None:
        env["FINETUNE_TEST_REPORT"] = str(report)
    cmd = [sys.executable, "-m", "finetune", "train", str(data), *ARGS, "--runs-dir", str(tmp_path / "runs"), "--devices", "2", *extra]
    # A session of its own: the Ctrl-C fault signals the launcher's process group, as a terminal does.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        kill_processes_mentioning(str(tmp_path))  # torchrun starts each rank in a session of its own
        proc.communicate()
        pytest.fail(f"fault {fault}: the run did not end within 180 s (a rank left waiting for another?)")
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def kill_processes_mentioning(text: str) -> None:
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and text in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                os.kill(int(entry.name), signal.SIGKILL)
        except OSError:  # gone meanwhile, or not ours
            pass


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error")]


def test_ctrl_c_stops_every_rank_at_the_same_step_then_resume_finishes(tmp_path):
    report = tmp_path / "report"
    report.mkdir()
    out = run_with_fault(tmp_path, "ctrl-c", "--finetune-epochs", "3", report=report)
    assert out.returncode == 130, out.stderr[-3000:]
    run_dir = tmp_path / "runs" / "train"
    assert error_lines(out.stderr) == [f"error: training interrupted; the model kept so far is in {run_dir / 'model.safetensors'}. "
                                       f"Continue with: finetune train --resume {run_dir} --devices 2"]
    assert "Traceback" not in out.stderr and out.stdout == ""
    steps = [int((report / f"steps.rank{r}").read_text()) for r in (0, 1)]
    assert steps[0] == steps[1] >= 3  # both ranks stopped at the same step (2 steps per epoch here)
    finished_epochs = len((run_dir / "metrics.csv").read_text().splitlines()) - 1
    assert 3 + 2 + 1 <= finished_epochs < 3 + 2 + 3  # head 3, tail 2, then within fine-tuning

    resumed = subprocess.run([sys.executable, "-m", "finetune", "train", "--resume", str(run_dir), "--devices", "2", "--json"],
                             capture_output=True, text=True, env=clean_env(), timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads(resumed.stdout)
    assert summary["epochs"] == 8 and [row.split(",")[1] for row in (run_dir / "metrics.csv").read_text().splitlines()[1:]] \
        == ["head"] * 3 + ["tail"] * 2 + ["finetune"] * 3


@pytest.mark.parametrize("fault, code, message", [
    ("oom-rank1", 1, "error (rank 1): the GPU ran out of memory at --batch-size 8; start again with --batch-size 4."),
    ("kill-rank1", 137, "error: rank 1 was killed by SIGKILL (the system may have run out of memory), so every rank was "
                        "stopped; continue with: finetune train --resume RUN_FOLDER --devices 2"),
])
def test_a_rank_failing_mid_training_stops_every_rank_with_one_message(tmp_path, fault, code, message):
    out = run_with_fault(tmp_path, fault)
    assert out.returncode == code, out.stderr[-3000:]
    assert error_lines(out.stderr) == [message.replace("RUN_FOLDER", str(tmp_path / "runs" / "train"))]
    assert "Traceback" not in out.stderr and out.stdout == ""
    assert not (tmp_path / "runs" / "train" / "results.json").exists()


def test_the_ranks_end_with_their_launcher_even_when_it_is_killed(tmp_path):
    # SIGKILL cannot be passed on: the ranks trained on to the end, orphans holding the run's lock.
    # (run_with_fault waits for the ranks too: they hold its output pipes.)
    out = run_with_fault(tmp_path, "kill-launcher", "--finetune-epochs", "6")
    assert out.returncode == -signal.SIGKILL
    assert not (tmp_path / "runs" / "train" / "results.json").exists()
    assert (tmp_path / "runs" / "train" / "config.json").exists()  # (the ranks had started training)


@pytest.mark.parametrize("when", ["start", "finetune"])
def test_the_launcher_stopped_by_sigterm_names_the_run_folder_or_removes_it(tmp_path, when):
    # The ranks, stopped by the signal passed on, write nothing: the message said "RUN_FOLDER", and a
    # run stopped before its first epoch left a folder holding only its config.
    out = run_with_fault(tmp_path, f"term-launcher-{when}")
    run_dir = tmp_path / "runs" / "train"
    assert out.returncode == 143, out.stderr[-3000:]
    if when == "start":
        assert error_lines(out.stderr) == ["error: training was stopped by SIGTERM; it stopped before it kept an epoch "
                                           "to resume from (its run folder removed); start it again to continue."]
        assert not run_dir.exists()
    else:
        assert error_lines(out.stderr) == [f"error: training was stopped by SIGTERM; continue with: finetune train "
                                           f"--resume {run_dir} --devices 2"]
    assert "Traceback" not in out.stderr and out.stdout == ""


def test_a_batch_that_fails_on_one_rank_is_skipped_by_every_rank(tmp_path):
    # Rank 1's first fine-tuning batch of each epoch fails to decode entirely ("vanished"
    # files): every rank skips that step, so both take the same optimizer steps and none waits.
    report = tmp_path / "report"
    report.mkdir()
    out = run_with_fault(tmp_path, "first-batch-fails-rank1", report=report)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout)["epochs"] == 7
    # 18 training images, 9 per rank: batches of 8 and 1 per epoch, the first one skipped; 2 epochs
    assert [(report / f"steps.rank{r}").read_text() for r in (0, 1)] == ["2", "2"]


def record(rank: int, code: int, message: str = "x", rank_specific: bool = False) -> RankRecord:
    return RankRecord(rank, code, message, rank_specific)


LOST = "rank 0 lost contact with the other ranks (Connection closed by peer)"


@pytest.mark.parametrize("records, exit_codes, signum, code, says, rank", [
    # rank 1 failed with our error and was then killed by torchrun while it exited; rank 0 lost its peer
    ({0: record(0, 75, LOST), 1: record(1, 1, "the GPU ran out of memory", True)}, {0: 75, 1: -15}, None,
     1, "the GPU ran out of memory", 1),
    # Ctrl-C: both ranks stopped at the same step; rank 0's message says where the model is
    ({0: record(0, 130, "interrupted; model in M"), 1: record(1, 130, "interrupted")}, {}, signal.SIGINT,
     130, "interrupted; model in M", None),
    ({0: record(0, 2, "bad option"), 1: record(1, 2, "bad option")}, {0: 2, 1: 2}, None, 2, "bad option", None),
    ({}, {}, signal.SIGINT, 130, "training interrupted; a run folder with a completed epoch can be continued", None),
    ({0: record(0, 0, "finished"), 1: record(1, 130, "interrupted")}, {}, signal.SIGINT, 0, None, None),  # too late to stop it
    ({}, {}, signal.SIGTERM, 143, "training was stopped by SIGTERM", None),
    ({0: record(0, 75, LOST)}, {0: 75, 1: -9}, None, 137, "rank 1 was killed by SIGKILL (the system may have run out of memory)", None),
    ({}, {0: -15, 1: -6}, None, 134, "rank 1 was killed by SIGABRT,", None),
    ({}, {0: -15, 1: 3}, None, 3, "rank 1 stopped with exit code 3 (its output above may say why), so every rank was stopped", None),
    ({0: record(0, 75, LOST), 1: record(1, 75, "rank 1 lost contact")}, {0: 75, 1: 75}, None, 1, LOST + "; a run folder with", None),
    ({}, {}, None, 0, None, None),
])
def test_the_launcher_names_the_one_cause(records, exit_codes, signum, code, says, rank):
    outcome = decide_outcome(records, exit_codes, signum)
    assert outcome.exit_code == code and outcome.rank == rank
    assert (outcome.message is None) if says is None else outcome.message.startswith(says) or says in outcome.message


def test_the_launchers_advice_names_the_run_folder(tmp_path):
    from finetune.launcher import RESUME_HINT, LaunchOutcome, with_run_folder
    from finetune.resume import STATE_FILENAME

    stopped = LaunchOutcome(143, f"training was stopped by SIGTERM; {RESUME_HINT}")
    started, resumable = tmp_path / "started", tmp_path / "resumable"
    for folder in (started, resumable):
        folder.mkdir()
        (folder / "config.json").write_text("{}")
    (resumable / STATE_FILENAME).write_bytes(b"state")
    assert with_run_folder(stopped, resumable, 2, resumed=False).message == \
        f"training was stopped by SIGTERM; continue with: finetune train --resume {resumable} --devices 2"
    assert with_run_folder(stopped, started, 2, resumed=True).message.endswith("before it kept an epoch to resume from; start it again to continue.")
    assert started.exists()  # (a folder given to --resume is never removed)
    assert with_run_folder(stopped, started, 2, resumed=False).message.endswith("(its run folder removed); start it again to continue.")
    assert not started.exists()
    assert with_run_folder(stopped, None, 2, resumed=False).message.endswith("before its run folder was made; start it again.")
    own = LaunchOutcome(1, "the GPU ran out of memory", rank=1)
    assert with_run_folder(own, resumable, 2, resumed=False) == own


def test_the_launchers_advice_for_a_run_with_a_model_and_no_state(tmp_path):
    from finetune.launcher import RESUME_HINT, LaunchOutcome, with_run_folder

    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"model")  # (it said: stopped before its first epoch)
    told = with_run_folder(LaunchOutcome(143, f"training was stopped by SIGTERM; {RESUME_HINT}"), tmp_path, 2, resumed=False)
    assert told.message.endswith(f"its model is in {tmp_path / 'model.safetensors'}; its training state was not saved yet, "
                                 "so it cannot be resumed; start it again to train further.")
    assert (tmp_path / "model.safetensors").exists()


def test_records_are_read_back_from_torchruns_error_files(tmp_path, monkeypatch):
    error_file = tmp_path / "run_x" / "attempt_0" / "1" / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
    monkeypatch.setenv("RANK", "1")
    record_rank_error(GpuOutOfMemory("the GPU ran out of memory"))
    (tmp_path / "run_x" / "attempt_0" / "0").mkdir()
    (tmp_path / "run_x" / "attempt_0" / "0" / "error.json").write_text('{"message": "torchrun\'s own"}')
    assert read_records(tmp_path) == {1: RankRecord(1, 1, "the GPU ran out of memory", True)}
    assert json.loads(error_file.read_text())["message"]["message"] == "GpuOutOfMemory: the GPU ran out of memory"


def test_a_ranks_error_file_appears_whole_or_not_at_all(tmp_path, monkeypatch):
    """torchrun stops the other ranks as soon as one fails: a file cut short then was read by its
    agent as JSON, which failed with a traceback of its own."""
    import os

    from finetune import files

    error_file = tmp_path / "attempt_0" / "0" / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
    monkeypatch.setenv("RANK", "0")
    flushed, real_fsync = [], os.fsync

    def fsync(fd):  # the moment the bytes are written out: the target must not be there yet
        flushed.append(error_file.exists())
        real_fsync(fd)

    monkeypatch.setattr(files.os, "fsync", fsync)
    record_rank_error(GpuOutOfMemory("the GPU ran out of memory"))
    assert flushed == [False] and json.loads(error_file.read_text())["finetune"]["rank"] == 0


def test_torchruns_own_failure_is_one_line_not_a_traceback(monkeypatch):
    import torch.distributed.run

    from finetune.launcher import launch

    def agent_fails(args):  # as its agent did reading an error file cut short (527f0fb fixed that cause)
        raise json.JSONDecodeError("Expecting value", "", 0)

    monkeypatch.setattr(torch.distributed.run, "main", agent_fails)
    outcome = launch(2, ["data"])
    assert outcome.exit_code == 1
    assert outcome.message.startswith("torchrun failed while running the ranks (JSONDecodeError: Expecting value")
