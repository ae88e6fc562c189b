"""Every training recipe on every dataset given: one JSON row each.

    python benchmarks/bench_recipes.py DATA [DATA ...] [--arch efficientnet_lite0] [--recipes NAME ...] [--finetune] [--fp32]

Recipes: the default (auto), each head kind forced, the tail stage forced off (auto+tail0) and
on (auto+tail4), the default at smaller input sizes (auto@224, auto@256; asked by name), and
with --finetune the default plus two whole-network epochs. --fp32: the tool runs as on a CPU
without native bf16 (most laptops; this project's AMD machine), even where this one has it.

Each recipe is a `finetune train` run (a fresh process, defaults plus the recipe's options),
so the figures are what a user gets on a first run (--no-cache: no features from earlier
runs): best val accuracy, test accuracy (when DATA has a test split), wall time including
start-up, peak RSS, the tail stage's plan, and the head's and each later epoch's val accuracy. Rows go to
stdout as JSON lines, as each run ends; nothing is written into DATA.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RECIPES = {
    "auto": [],  # the default: views from the data size, the head chosen on val
    "final-4views": ["--head-features", "final", "--views", "4"],  # the default before the adaptive recipe
    "final-plain": ["--head-features", "final", "--views", "1"],
    "multi-plain": ["--head-features", "multi", "--views", "1"],
    "multi-4views": ["--head-features", "multi", "--views", "4"],
}
TAIL = {"auto+tail0": ["--tail-epochs", "0"], "auto+tail4": ["--tail-epochs", "4"]}  # the head alone; the tail whatever the head's fit
FINETUNE = {"auto+finetune2": ["--finetune-epochs", "2"]}
SIZES = {"auto@224": ["--img-size", "224"], "auto@256": ["--img-size", "256"]}  # Lite0's default is 288
# The tool with bf16 reported absent, so that every pass runs in fp32 (device.autocast_dtype).
FP32_TOOL = "import finetune.device as d; d._cpu_has_bf16 = lambda: False; from finetune.cli import app; app(prog_name='finetune')"


def run(cmd: list[str]) -> tuple[float, float, dict]:
    """cmd in a fresh process: (wall s, its peak RSS in MB, its JSON output)."""
    wrapper = ("import json,resource,subprocess,sys,time;t=time.perf_counter();"
               "o=subprocess.run(sys.argv[1:],capture_output=True,text=True);"
               "print(json.dumps({'wall':time.perf_counter()-t,'rss':resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,"
               "'rc':o.returncode,'out':o.stdout,'err':o.stderr[-2000:]}))")
    res = json.loads(subprocess.run([sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True).stdout)
    if res["rc"] != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{res['err']}")
    return res["wall"], res["rss"] / 1024, json.loads(res["out"])


def torch_has_cuda() -> bool:
    """Asked in a child process: this script itself does not import torch."""
    return subprocess.run([sys.executable, "-c", "import torch, sys; sys.exit(torch.cuda.is_available())"]).returncode == 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data", type=Path, nargs="+")
    ap.add_argument("--arch", default="efficientnet_lite0")
    ap.add_argument("--recipes", nargs="+", choices=[*RECIPES, *TAIL, *FINETUNE, *SIZES], help="default: all but fine-tuning")
    ap.add_argument("--finetune", action="store_true", help="also the default plus 2 whole-network epochs (slow on a CPU)")
    ap.add_argument("--fp32", action="store_true", help="run as on a CPU without native bf16")
    args = ap.parse_args()
    if args.fp32 and torch_has_cuda():
        raise SystemExit("--fp32 stands for a CPU without bf16; this machine has a GPU, which the runs would use.")
    recipes = {**RECIPES, **TAIL, **FINETUNE, **SIZES}
    names = args.recipes or [*RECIPES, *TAIL, *(FINETUNE if args.finetune else [])]
    for data in args.data:
        for name in names:
            with tempfile.TemporaryDirectory() as runs:
                tool = ["-c", FP32_TOOL] if args.fp32 else ["-m", "finetune"]
                cmd = [sys.executable, *tool, "train", str(data), "--arch", args.arch, "--runs-dir", runs,
                       "--json", "--quiet", "--no-cache", *recipes[name]]
                wall, rss, summary = run(cmd)
                with open(Path(summary["run_dir"]) / "metrics.csv") as f:
                    history = list(csv.DictReader(f))
            row = {"date": time.strftime("%Y-%m-%d"), "cores": os.cpu_count(), "dataset": data.name, "recipe": name,
                   "precision": "fp32" if args.fp32 else "native",
                   "options": " ".join(recipes[name]), "best_val_acc": summary["best_val_acc"], "test_acc": summary["test_acc"],
                   "num_train": summary["num_train"], "num_test": summary["num_test"], "head": summary["recipe"]["head"],
                   "wall_s": round(wall, 1), "peak_rss_mb": round(rss),
                   "feature_pass": summary["recipe"].get("feature_pass"),
                   "tail": summary["recipe"]["tail"], "best_stage": history[summary["best_epoch"] - 1]["stage"],
                   # the head's best val accuracy, then each later epoch's: a later stage must start from it, not below
                   "head_best_val_acc": max((float(r["val_acc"]) for r in history if r["stage"] == "head"), default=None),
                   "tail_val_accs": [float(r["val_acc"]) for r in history if r["stage"] == "tail"],
                   "finetune_val_accs": [float(r["val_acc"]) for r in history if r["stage"] == "finetune"]}
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
