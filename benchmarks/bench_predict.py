"""Prediction throughput: `finetune predict` on a folder vs the model's pure batched forward pass.

    python benchmarks/bench_predict.py ../shared/datasets/hymenoptera_data --model runs/train/model.safetensors [--min-images 500]

The folder is made of copies of DATA's images (repeated until there are at least
--min-images), in a temporary folder; DATA is only read. (Copies, not links: predict reads
each real file once, so links to one file would count once.) Pure forward: the same model,
batch size, precision, memory format and CPU chunking on random input already in memory, the
model's BatchNorms folded as predict folds them (and, for comparison, the model file's module as it is).
Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from finetune import PredictConfig, load_model, predict
from finetune.prediction import inference_net
from finetune.scan import list_images
from finetune.device import autocast, autocast_dtype, forward_in_chunks, pick_device, to_model_input


def copy_folder(data: Path, target: Path, min_images: int) -> int:
    images = list_images(data)
    n = 0
    while n < min_images:
        for src in images:
            shutil.copyfile(src, target / f"{n:06d}{src.suffix.lower()}")
            n += 1
    return n


def pure_forward(model, img_size: int, batch_size: int, device, seconds: float = 15.0) -> float:
    amp = autocast_dtype(device)
    model = model.to(device).to(memory_format=torch.channels_last).eval()
    batch = torch.randint(0, 256, (batch_size, 3, img_size, img_size), dtype=torch.uint8)
    done, started = 0, None
    with torch.inference_mode():
        for i in range(10_000):
            with autocast(device, amp):
                forward_in_chunks(model, to_model_input(batch, device), device, amp).float().cpu()
            if i == 0:  # warm-up batch not timed
                started = time.perf_counter()
                continue
            done += batch_size
            if time.perf_counter() - started > seconds:
                break
    return done / (time.perf_counter() - started)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data", type=Path)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--min-images", type=int, default=500)
    ap.add_argument("--batch-size", type=int, default=PredictConfig().batch_size)
    args = ap.parse_args()
    loaded = load_model(args.model)
    device = pick_device("auto")
    unfolded = pure_forward(loaded.model, loaded.preprocessing.img_size, args.batch_size, device)
    forward = pure_forward(inference_net(loaded, device), loaded.preprocessing.img_size, args.batch_size, device)
    with tempfile.TemporaryDirectory() as tmp:
        n = copy_folder(args.data, Path(tmp), args.min_images)
        cfg = PredictConfig(model=args.model, batch_size=args.batch_size)
        started = time.perf_counter()
        count = sum(1 for p in predict(loaded, [tmp], cfg) if p.error is None)
        in_process = count / (time.perf_counter() - started)
        started = time.perf_counter()
        out = subprocess.run([sys.executable, "-m", "finetune", "predict", tmp, "--model", str(args.model), "--format", "jsonl", "--quiet"],
                             capture_output=True, text=True)
        cli_wall = time.perf_counter() - started
        lines = out.stdout.count("\n")
    print(json.dumps({
        "date": time.strftime("%Y-%m-%d"), "device": str(device), "cores": os.cpu_count(), "images": n, "predicted": count,
        "img_size": loaded.preprocessing.img_size, "batch_size": args.batch_size,
        "pure_forward_unfolded_img_per_s": round(unfolded, 1),  # the model file's module as it is
        "pure_forward_img_per_s": round(forward, 1), "predict_img_per_s": round(in_process, 1),  # BatchNorm folded, as predict runs it
        "ratio": round(in_process / forward, 3),
        "cli_wall_s": round(cli_wall, 1), "cli_lines": lines, "cli_img_per_s_incl_startup": round(lines / cli_wall, 1),
    }, indent=1))


if __name__ == "__main__":
    main()
