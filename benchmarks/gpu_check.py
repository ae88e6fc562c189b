"""Everything that needs a GPU, in one run, for a session that is lent one.

    python3 benchmarks/gpu_check.py DATA [--out DIR] [--finetune-epochs 5] [--skip-tests] [--budget-s 420] [--tests-s 150]

The steps come in the order of what a GPU session is for, each in what --budget-s has left
(a run that would overrun it is stopped, its process group killed), and DIR/gpu_check.json is
written after every run, so that a session stopped early keeps what finished:

1. speed: the pure compute rates (synthetic batches already on the device, same batch size,
   precision and memory format, cuDNN's autotuning off as the tool runs: the feature pass's
   forward; a training step as timm trains, BatchNorm training; as the tool fine-tunes, BatchNorm
   frozen, folded or not), fine-tuning's loader pace with the tool's workers and with every core
   but one, then `finetune train` with defaults on DATA and on the textures
   (made here by make_textures.py in seconds: images unlike ImageNet's, with a test split, so the
   tail, the planned fine-tuning and the test split run on CUDA), and where DATA's defaults planned
   no fine-tuning, DATA with --finetune-epochs N: wall time, each epoch's val accuracy, the plan,
   against the pure compute time of the same passes.
2. predict: benchmarks/bench_predict.py on DATA (at least 1,000 images) with the model of 1.
3. tests: the test suite on the GPU (CUDA paths of train/predict/evaluate/export), except the
   distributed tests, which start 2 processes (one GPU each), for --tests-s at most. Failures are
   listed one line each; tests that compare runs to the last bit may differ on a GPU.
4. devices: sample_data/shapes with --arch efficientnet_lite0 --finetune-epochs 2, run plainly
   twice (the GPU's own run-to-run noise) and once with --devices 1 (torchrun, NCCL, DDP);
   their metrics.csv are compared. On a one-GPU machine --devices 2 must stop with one line.
   (It passed on the first GPU session: it comes after the figures still missing.)
5. profile: `finetune train DATA` with defaults under cProfile (gpu_profile.py: the top functions in
   the JSON, nobench.prof in DIR), with an empty feature cache: where a first run's time goes.

Prints one JSON object and writes it to DIR/gpu_check.json (with each step's stderr tail).
BENCHMARKS.md says how to call it on the device machine and what to carry there.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from finetune.config import TrainConfig  # noqa: E402
from finetune.device import autocast, autocast_dtype, pick_device, to_model_input  # noqa: E402
from finetune.models import build_classifier, get_arch  # noqa: E402
from finetune.weights import resolve_pretrained  # noqa: E402

COMPARED = ["epoch", "stage", "train_loss", "train_acc", "val_loss", "val_acc", "lr"]


class Budget:
    """What is left of --budget-s: every run gets at most that, less a margin for writing the report."""

    def __init__(self, seconds: float, margin: float = 15.0):
        self.deadline, self.margin = time.perf_counter() + seconds, margin

    def left(self) -> float:
        return self.deadline - time.perf_counter() - self.margin


BUDGET = Budget(420.0)  # (main sets it from --budget-s)


def run(cmd: list[str], timeout: float = 300, env: dict | None = None) -> tuple[subprocess.CompletedProcess, float]:
    """cmd in its own process group, for `timeout` s or what the budget has left, whichever is less:
    at the limit the whole group is killed (torchrun's ranks, loader workers), returncode -9."""
    limit = min(timeout, BUDGET.left())
    if limit < 10:
        return subprocess.CompletedProcess(cmd, -9, "", f"not run: {max(limit, 0):.0f} s left of --budget-s"), 0.0
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        err += f"\n[stopped after {limit:.0f} s: --budget-s or the run's own limit]"
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err), time.perf_counter() - started


def train_cmd(data: Path, runs: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "finetune", "train", str(data), "--arch", "efficientnet_lite0",
            "--runs-dir", str(runs), "--json", "--quiet", *extra]


def metrics_rows(summary: dict) -> list[dict]:
    with open(Path(summary["run_dir"]) / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def max_difference(a: list[dict], b: list[dict]) -> float | None:
    """Largest difference of the compared numeric columns; None when the epochs differ."""
    if len(a) != len(b) or any(x["stage"] != y["stage"] for x, y in zip(a, b)):
        return None
    return max(abs(float(x[k]) - float(y[k])) for x, y in zip(a, b) for k in COMPARED if k != "stage")


def check_tests(result: dict, save, seconds: float) -> None:
    """The suite in `seconds` at most, one line per failure; in parallel where pytest-xdist is
    installed (pyproject's `-n auto` is overridden: `-o addopts=`). At the limit pytest gets a
    Ctrl-C, so that it still prints the failures so far, then its process group is killed."""
    seconds = min(seconds, BUDGET.left() - 20)  # (at the limit pytest gets up to 20 s to print its failures)
    if seconds < 30:
        result["skipped"] = f"{seconds:.0f} s left of --budget-s"
        return
    parallel = ["-n", str(min(8, os.cpu_count() or 1))] if importlib.util.find_spec("xdist") else []
    cmd = [sys.executable, "-m", "pytest", "-o", "addopts=", *parallel, "-q", "--tb=line", "-rf",
           "--ignore=tests/test_distributed.py"]
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=seconds)
        timed_out = False
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(proc.pid, signal.SIGINT)
        try:
            out, _ = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
    result.update({"returncode": proc.returncode, "timed_out": timed_out, "wall_s": round(time.perf_counter() - started, 1),
                   "tail": out[-3000:]})


def check_devices(result: dict, save, tmp: Path) -> None:
    data = ROOT / "sample_data" / "shapes"
    common = ["--finetune-epochs", "2", "--seed", "0"]
    runs = {}
    for name, extra in (("plain_a", []), ("plain_b", []), ("devices_1", ["--devices", "1"])):
        out, wall = run(train_cmd(data, tmp / name, *common, *extra))
        runs[name] = {"returncode": out.returncode, "wall_s": round(wall, 1), "stderr_tail": out.stderr[-1500:]}
        result[name] = dict(runs[name])
        save()
        if out.returncode == 0:
            runs[name]["summary"] = json.loads(out.stdout)
    if all("summary" in r for r in runs.values()):
        rows = {name: metrics_rows(r["summary"]) for name, r in runs.items()}
        result["best_val_acc"] = {name: r["summary"]["best_val_acc"] for name, r in runs.items()}
        result["plain_vs_plain_max_diff"] = max_difference(rows["plain_a"], rows["plain_b"])
        result["plain_vs_devices_1_max_diff"] = max_difference(rows["plain_a"], rows["devices_1"])
        result["devices_1_identical_to_plain"] = [[r[k] for k in COMPARED] for r in rows["plain_a"]] == \
                                                 [[r[k] for k in COMPARED] for r in rows["devices_1"]]
    if torch.cuda.device_count() == 1:
        out, _ = run(train_cmd(data, tmp / "two", "--devices", "2"))
        result["devices_2_on_one_gpu"] = {"returncode": out.returncode, "stderr": out.stderr[-600:], "stdout": out.stdout[-300:]}


def pure_rates(arch: str, batch_size: int, views: int, device: torch.device, seconds: float = 5.0) -> dict:
    """Images/s of the backbone forward (feature pass) and of a full training step, on synthetic data."""
    spec = get_arch(arch)
    state, _ = resolve_pretrained(spec, None)
    pp = spec.preprocessing(None)
    model = build_classifier(spec, 2, state).to(device).to(memory_format=torch.channels_last)
    amp = autocast_dtype(device)
    feature_batch = max(1, batch_size // views) * views
    x_feat = torch.randint(0, 256, (feature_batch, 3, pp.img_size, pp.img_size), dtype=torch.uint8, device=device)
    x_train = torch.randint(0, 256, (batch_size, 3, pp.img_size, pp.img_size), dtype=torch.uint8, device=device)
    y = torch.randint(0, 2, (batch_size,), device=device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def timed(step, n_per_step: int) -> float:
        for _ in range(3):  # warm-up: kernels chosen, memory allocated
            step()
        sync(device)
        done, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            step()
            done += n_per_step
            if done % (20 * n_per_step) == 0:
                sync(device)
        sync(device)
        return done / (time.perf_counter() - started)

    def forward():
        with torch.inference_mode(), autocast(device, amp):
            model.features(to_model_input(x_feat, device))

    def train_step():
        with autocast(device, amp):
            loss = torch.nn.functional.cross_entropy(model(to_model_input(x_train, device)).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    model.eval()
    fwd = timed(forward, feature_batch)
    model.train()
    train = timed(train_step, batch_size)
    folded, unfolded = frozen_batchnorm_rates(model, pp.img_size, batch_size, device)
    return {"img_size": pp.img_size, "forward_img_per_s": round(fwd, 1), "train_step_img_per_s": round(train, 1),
            "finetune_folded_img_per_s": round(folded, 1), "finetune_unfolded_img_per_s": round(unfolded, 1),
            "feature_batch": feature_batch, "train_batch": batch_size}


def frozen_batchnorm_rates(model, img_size: int, batch_size: int, device: torch.device) -> tuple[float, float]:
    """Training images/s of fine-tuning's passes (BatchNorm frozen) with its statistics folded into the
    convolutions, as the tool trains, and unfolded: forward and backward passes of a constant batch,
    no optimizer step. Folding halved a CPU's BatchNorm cost; on a GPU its extra ops per step might
    cost more than it saves."""
    from finetune.fold import folded_while_frozen, probe_images
    from finetune.stages import fastest_pass, freeze_batchnorm

    x = torch.full((batch_size, 3, img_size, img_size), 0.5, device=device).contiguous(memory_format=torch.channels_last)
    amp = autocast_dtype(device)

    def step() -> None:
        with autocast(device, amp):
            logits = model(x)
        logits.float().logsumexp(1).mean().backward()

    def rate() -> float:
        model.train()
        freeze_batchnorm(model)
        seconds = fastest_pass(step, device)
        model.zero_grad(set_to_none=True)
        return batch_size / seconds

    with folded_while_frozen(model, lambda: model(probe_images(img_size, device))):
        folded = rate()
    return folded, rate()


def loader_rates(data: Path, cfg: TrainConfig, seconds: float = 3.0) -> dict:
    """Images/s that fine-tuning's loader decodes and augments alone (3 s or an epoch, its workers' start
    included) with the tool's workers and with every core but one."""
    from finetune.cpus import usable_cores
    from finetune.data import default_workers, make_loader
    from finetune.reading import scan_dataset
    from finetune.stages import finetune_train_images

    split = scan_dataset(data, cfg.val_split, cfg.seed)
    pp = get_arch("efficientnet_lite0").preprocessing(None)

    def rate(workers: int) -> float:
        loader = make_loader(finetune_train_images(split, pp, cfg, light=False), cfg.batch_size, workers, seed=cfg.seed)
        done, started = 0, time.perf_counter()
        for indices, _batch, failed in loader:
            done += len(indices) + len(failed)
            if time.perf_counter() - started >= seconds:
                break
        return done / max(time.perf_counter() - started, 1e-9)

    counts = sorted({default_workers(), max(1, usable_cores() - 1)})
    return {f"workers_{n}": round(rate(n), 1) for n in counts}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def check_speed(result: dict, save, data: Path, tmp: Path, finetune_epochs: int) -> None:
    cfg = TrainConfig()
    device = pick_device("auto")  # (on CUDA: cuDNN's autotuning off, as the tool runs)
    rates = result["pure"] = pure_rates("efficientnet_lite0", cfg.batch_size, 4, device)
    save()
    result["loader"] = loader_rates(data, cfg)
    save()
    textures = tmp / "textures"
    made, _ = run([sys.executable, str(ROOT / "benchmarks" / "make_textures.py"), str(textures)], timeout=120)
    plan = [("defaults", data, [])]
    if made.returncode == 0:
        plan.append(("textures_defaults", textures, []))
    else:
        result["textures_not_made"] = made.stderr[-800:]
    result["runs"] = {}
    for name, where, extra in plan:
        result["runs"][name] = speed_run(where, tmp / name, extra, rates)
        save()
    if not (result["runs"]["defaults"].get("finetune_plan") or {}).get("epochs"):  # what fine-tuning would give
        name = f"finetune_{finetune_epochs}"
        result["runs"][name] = speed_run(data, tmp / name, ["--finetune-epochs", str(finetune_epochs)], rates)
        save()


def speed_run(data: Path, runs: Path, extra: list[str], rates: dict) -> dict:
    """`finetune train DATA` with these options: its figures against the pure compute time of its passes."""
    out, wall = run(train_cmd(data, runs, *extra), timeout=600)
    if out.returncode != 0:
        return {"returncode": out.returncode, "wall_s": round(wall, 1), "stderr_tail": out.stderr[-1500:]}
    summary = json.loads(out.stdout)
    rows = metrics_rows(summary)
    n_train, n_val = summary["num_train"], summary["num_val"]
    feature_images = n_train * summary["recipe"]["views_computed"] + n_val + summary["num_test"]
    ft_rows = [r for r in rows if r["stage"] == "finetune"]
    pure_features = feature_images / rates["forward_img_per_s"]
    pure_finetune = len(ft_rows) * (n_train / rates["train_step_img_per_s"] + n_val / rates["forward_img_per_s"])
    ft_seconds = sum(float(r["seconds"]) for r in ft_rows)
    return {
        "best_val_acc": summary["best_val_acc"], "test_acc": summary["test_acc"], "wall_s": round(wall, 1),
        "reported_seconds": summary["seconds"], "model": summary["model"], "device": summary["device"],
        "epochs": summary["epochs"], "best_epoch": summary["best_epoch"], "num_train": n_train,
        "feature_pass": summary["recipe"].get("feature_pass"),
        "pure_compute_s": round(pure_features + pure_finetune, 2),
        "ratio_reported_to_pure": round(summary["seconds"] / (pure_features + pure_finetune), 2),
        "finetune_epoch_seconds": round(ft_seconds, 2) if ft_rows else None,
        "finetune_ratio_to_pure": round(ft_seconds / pure_finetune, 2) if ft_rows else None,
        "finetune_images_per_s": [float(r["images_per_s"]) for r in ft_rows],
        "val_acc_per_epoch": [(r["stage"], float(r["val_acc"])) for r in rows],
        "head": summary["recipe"]["head"], "tail_plan": summary["recipe"].get("tail"),
        "finetune_plan": summary["recipe"].get("finetune"),
    }


def check_predict(result: dict, save, data: Path, model: str) -> None:
    out, wall = run([sys.executable, str(ROOT / "benchmarks" / "bench_predict.py"), str(data), "--model", model, "--min-images", "1000"])
    result.update(json.loads(out.stdout) if out.returncode == 0 else {"returncode": out.returncode, "stderr_tail": out.stderr[-1500:]})


def check_profile(result: dict, save, data: Path, tmp: Path, out: Path) -> None:
    """`finetune train DATA` with defaults under cProfile (gpu_profile.py), an empty feature cache of its
    own: where a first run's time goes on this machine. The .prof file goes to --out."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu_profile.py"), str(out), "--", "train", str(data),
           "--arch", "efficientnet_lite0", "--runs-dir", str(tmp / "runs"), "--json", "--quiet"]
    proc, wall = run(cmd, env={**os.environ, "FINETUNE_CACHE_DIR": str(tmp / "cache")})
    result.update({"returncode": proc.returncode, "wall_s": round(wall, 1), "top": proc.stderr[-6000:]})


def main() -> None:
    global BUDGET
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data", type=Path, help="an ImageFolder dataset, e.g. hymenoptera_data")
    ap.add_argument("--out", type=Path, default=Path("."))
    ap.add_argument("--finetune-epochs", type=int, default=5, help="for DATA where its defaults plan no fine-tuning")
    ap.add_argument("--skip-tests", action="store_true")
    ap.add_argument("--budget-s", type=float, default=420.0, help="the whole check's seconds: each run gets what is left")
    ap.add_argument("--tests-s", type=float, default=150.0, help="the test suite's seconds at most")
    args = ap.parse_args()
    BUDGET = Budget(args.budget_s)
    # Each run below is a new Python process: on the device machine (2026-11-28) each compiled 4.7 s of
    # source, its packages holding no bytecode; kept here, only the first compiles.
    os.environ.setdefault("PYTHONPYCACHEPREFIX", str(Path(tempfile.gettempdir()) / "finetune-pyc"))
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"date": time.strftime("%Y-%m-%d %H:%M"), "python": sys.version.split()[0], "torch": torch.__version__,
              "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, "cores": os.cpu_count(),
              "data": str(args.data)}

    def save() -> None:
        (args.out / "gpu_check.json").write_text(json.dumps(report, indent=1))

    def step(name: str, fn, *fn_args) -> None:
        """fn fills report[name] as it goes (save() after each of its runs): a run stopped by the
        session's time limit leaves the ones before it in the file."""
        started = time.perf_counter()
        report[name] = {}
        try:
            fn(report[name], save, *fn_args)
        except Exception as e:  # one broken step must not cost the others' results
            report[name]["error"] = f"{type(e).__name__}: {e}"
        report[name + "_step_s"] = round(time.perf_counter() - started, 1)
        save()
        print(f"[{name} done in {report[name + '_step_s']} s]", file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        step("speed", check_speed, args.data.resolve(), Path(tmp) / "speed", args.finetune_epochs)
        model = report["speed"].get("runs", {}).get("defaults", {}).get("model")
        if model:
            step("predict", check_predict, args.data.resolve(), model)
        if not args.skip_tests:
            step("tests", check_tests, args.tests_s)
        step("devices", check_devices, Path(tmp) / "devices")
        step("profile", check_profile, args.data.resolve(), Path(tmp) / "profile", args.out)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
