"""Distributed training through torchrun: 2 CPU processes with the gloo backend."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from finetune.cli import app
from finetune.launcher import outcome_of_failures, strip_devices_option, torchrun_args

from conftest import CLASS_COLOURS, make_image, make_train_val, tree_hashes

runner = CliRunner()
ARGS = ["--arch", "efficientnet_lite0", "--img-size", "64", "--epochs", "3", "--views", "2", "--finetune-epochs", "2",
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
    assert summary["epochs"] == 5 and summary["num_train"] == 21 and summary["num_val"] == 17
    assert "distributed: 2 processes (gloo)" not in ddp_run["stderr"]  # --quiet on rank 0, silence elsewhere


def test_bad_file_is_checked_and_reported_once(ddp_run):
    summary = json.loads(ddp_run["stdout"])
    assert [s["path"] for s in summary["skipped"]] == [str(ddp_run["data"] / "train" / "cat" / "broken.jpg")]
    assert ddp_run["stderr"].count("skipped ") == 1
    assert tree_hashes(ddp_run["data"]) == ddp_run["before"]


def test_val_accuracy_is_over_the_whole_val_set(ddp_run):
    summary = json.loads(ddp_run["stdout"])
    assert len((Path(summary["run_dir"]) / "metrics.csv").read_text().splitlines()) == 1 + 5
    report = runner.invoke(app, ["evaluate", str(ddp_run["data"]), "--model", summary["model"], "--json", "--workers", "0"])
    evaluated = json.loads(report.stdout)
    assert evaluated["num_images"] == 17
    assert evaluated["accuracy"] == summary["best_val_acc"] == round(15 / 17, 4)


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


def run_with_fault(tmp_path, fault: str, *extra: str) -> subprocess.CompletedProcess:
    data = tmp_path / "data"
    if not data.exists():
        make_train_val(data, 6, 3)
    env = {**clean_env(), "PYTHONPATH": str(FAULTS), "FINETUNE_TEST_FAULT": fault}
    cmd = [sys.executable, "-m", "finetune", "train", str(data), *ARGS, "--runs-dir", str(tmp_path / "runs"), "--devices", "2", *extra]
    # A session of its own: the Ctrl-C fault signals the whole process group, as a terminal does,
    # and a hang can be ended with every rank in it.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"fault {fault}: the run did not end within 180 s (a rank left waiting for another?)")
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error")]


def test_ctrl_c_stops_every_rank_then_resume_finishes(tmp_path):
    out = run_with_fault(tmp_path, "ctrl-c")
    assert out.returncode == 130, out.stderr[-3000:]
    run_dir = tmp_path / "runs" / "train"
    assert error_lines(out.stderr) == [f"error: training interrupted; the best model so far is in {run_dir / 'model.safetensors'}. "
                                       f"Continue with: finetune train --resume {run_dir}"]
    assert "Traceback" not in out.stderr and out.stdout == ""
    assert len((run_dir / "metrics.csv").read_text().splitlines()) == 1 + 3 + 1  # head epochs, then one fine-tune epoch

    resumed = subprocess.run([sys.executable, "-m", "finetune", "train", "--resume", str(run_dir), "--devices", "2", "--json"],
                             capture_output=True, text=True, env=clean_env(), timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads(resumed.stdout)
    assert summary["epochs"] == 5 and [row.split(",")[1] for row in (run_dir / "metrics.csv").read_text().splitlines()[1:]] \
        == ["head"] * 3 + ["finetune"] * 2


@pytest.mark.parametrize("fault, code, message", [
    ("oom-rank1", 1, "error (rank 1): the GPU ran out of memory at --batch-size 8; start again with --batch-size 4."),
    ("kill-rank1", 137, "error: rank 1 was killed by SIGKILL (the system may have run out of memory), so every rank was "
                        "stopped; the run folder keeps its last completed epoch: finetune train --resume RUN_FOLDER continues it."),
])
def test_a_rank_failing_mid_training_stops_every_rank_with_one_message(tmp_path, fault, code, message):
    out = run_with_fault(tmp_path, fault)
    assert out.returncode == code, out.stderr[-3000:]
    assert error_lines(out.stderr) == [message]
    assert "Traceback" not in out.stderr and out.stdout == ""
    assert not (tmp_path / "runs" / "train" / "results.json").exists()


def test_a_rank_whose_batches_all_fail_does_not_stall_the_others(tmp_path):
    # Rank 1 skips every fine-tuning batch (its files "vanished"): DDP's join keeps rank 0's
    # gradient all-reduces from waiting for it, and the run ends normally.
    out = run_with_fault(tmp_path, "undecodable-rank1")
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout)
    assert summary["epochs"] == 5 and summary["skipped"] == []


def failure(exitcode: int, recorded: int | None = None, message: str = "x"):
    """A stand-in for torchrun's ProcessFailure: what the launcher reads of one rank's end."""
    data = {} if recorded is None else {"message": {"message": message}, "finetune_exit_code": recorded}
    return SimpleNamespace(exitcode=exitcode, timestamp=0, error_file_data=data)


@pytest.mark.parametrize("failures, code, says", [
    # rank 1 failed with our error, then was killed by torchrun while it exited; rank 0 lost its peer
    ({0: failure(75), 1: failure(-15, recorded=1)}, 1, None),
    ({0: failure(-15), 1: failure(130, recorded=130)}, 130, None),
    ({0: failure(2, recorded=2), 1: failure(2, recorded=2)}, 2, None),   # the same error on every rank
    ({0: failure(-15), 1: failure(-9)}, 137, "rank 1 was killed by SIGKILL (the system may have run out of memory)"),
    ({0: failure(75), 1: failure(-6)}, 134, "rank 1 was killed by SIGABRT,"),
    ({0: failure(75), 1: failure(75)}, 1, "the ranks of this run lost contact with each other"),
    ({0: failure(75, recorded=75), 1: failure(-15)}, 143, "rank 1 was killed by SIGTERM"),
    ({0: failure(75, recorded=75, message="PeerStopped: rank 0 lost contact with the other ranks (NCCL error 2)"),
      1: failure(75)}, 1, "rank 0 lost contact with the other ranks (NCCL error 2); the run folder keeps"),
    ({0: failure(75), 1: failure(1)}, 1, None),  # a traceback: that rank has said why
])
def test_the_launcher_reports_the_rank_that_caused_the_end(failures, code, says):
    outcome = outcome_of_failures(failures)
    assert outcome.exit_code == code
    assert (outcome.message is None) if says is None else says in outcome.message
