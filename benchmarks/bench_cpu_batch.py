"""Inference throughput by batch size: why CPU inference runs in chunks sized by CPU_CHUNK_PIXELS.

    python benchmarks/bench_cpu_batch.py [--arch efficientnet_lite0] [--sizes 4 8 16 32 64 128]

Backbone features on random input already in memory, with the precision and memory
format finetune uses on this device; each size timed for --seconds after a warm-up.
Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from finetune.device import autocast, autocast_dtype, pick_device
from finetune.models import build_classifier, get_arch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="efficientnet_lite0")
    ap.add_argument("--sizes", type=int, nargs="+", default=[4, 8, 16, 32, 64, 128])
    ap.add_argument("--seconds", type=float, default=5.0)
    args = ap.parse_args()
    device = pick_device("auto")
    spec = get_arch(args.arch)
    model = build_classifier(spec, 2).to(device).eval().to(memory_format=torch.channels_last)
    amp = autocast_dtype(device)
    size = spec.img_size
    rows = []
    for batch in args.sizes:
        x = torch.rand(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), autocast(device, amp):
            model.features(x)  # warm-up
            done, started = 0, time.perf_counter()
            while time.perf_counter() - started < args.seconds:
                model.features(x)
                done += batch
            if device.type == "cuda":
                torch.cuda.synchronize()
        rows.append({"batch": batch, "img_per_s": round(done / (time.perf_counter() - started), 1)})
    print(json.dumps({"date": time.strftime("%Y-%m-%d"), "device": str(device), "cores": os.cpu_count(), "arch": args.arch,
                      "img_size": size, "precision": str(amp), "runs": rows}, indent=1))


if __name__ == "__main__":
    main()
