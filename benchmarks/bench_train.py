"""Classic transfer-learning recipe vs `finetune train` defaults, on one dataset, in one run.

    python benchmarks/bench_train.py ../shared/datasets/hymenoptera_data [--arch efficientnet_lite0]

The classic recipe (the PyTorch transfer-learning tutorial): whole-network fine-tuning,
batch 4, SGD lr 1e-3 momentum 0.9, StepLR(7, 0.1), 25 epochs, RandomResizedCrop(224) +
horizontal flip; val Resize(256) + CenterCrop(224); best val accuracy over the epochs.
`finetune train` runs as a subprocess with default settings (plus --arch/--weights), so its
wall time includes start-up. Prints one JSON object; nothing is written into DATA.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torchvision import datasets, transforms


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), platform.processor())
    gpu = f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return f"{os.cpu_count()} cores, {cpu}{gpu}"


def classic_recipe(data: Path, arch: str, weights: str | None, epochs: int, workers: int) -> dict:
    from finetune.models import build_classifier, get_arch
    from finetune.weights import resolve_pretrained

    spec = get_arch(arch)
    state, _ = resolve_pretrained(spec, Path(weights) if weights else None)
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    image_sets = {
        "train": datasets.ImageFolder(data / "train", transforms.Compose([
            transforms.RandomResizedCrop(224), transforms.RandomHorizontalFlip(), transforms.ToTensor()])),
        "val": datasets.ImageFolder(data / "val", transforms.Compose([
            transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor()])),
    }
    loaders = {k: torch.utils.data.DataLoader(v, batch_size=4, shuffle=k == "train", num_workers=workers) for k, v in image_sets.items()}
    model = build_classifier(spec, len(image_sets["train"].classes), state).to(device)  # normalises inside
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=7, gamma=0.1)
    criterion = nn.CrossEntropyLoss()
    best = last = 0.0
    started = time.perf_counter()
    for _ in range(epochs):
        model.train()
        for x, y in loaders["train"]:
            x, y = x.to(device), y.to(device)
            optimizer.zero_grad()
            criterion(model(x), y).backward()
            optimizer.step()
        scheduler.step()
        model.eval()
        correct = 0
        with torch.no_grad():
            for x, y in loaders["val"]:
                correct += (model(x.to(device)).argmax(1).cpu() == y).sum().item()
        last = correct / len(image_sets["val"])
        best = max(best, last)
    return {"best_val_acc": round(best, 4), "final_val_acc": round(last, 4), "wall_s": round(time.perf_counter() - started, 1),
            "train_images_per_s": round(epochs * len(image_sets["train"]) / (time.perf_counter() - started), 1)}


def finetune_defaults(data: Path, arch: str, weights: str | None, extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as runs:
        cmd = [sys.executable, "-m", "finetune", "train", str(data), "--arch", arch, "--runs-dir", runs, "--json", "--quiet", *extra]
        if weights:
            cmd += ["--weights", weights]
        started = time.perf_counter()
        out = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - started
        if out.returncode != 0:
            raise SystemExit(f"finetune train failed:\n{out.stderr}")
        summary = json.loads(out.stdout)
        metrics = (Path(summary["run_dir"]) / "metrics.csv").read_text()
    rss_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"command": " ".join(cmd[1:]), "best_val_acc": summary["best_val_acc"], "wall_s": round(wall, 1),
            "reported_seconds": summary["seconds"], "num_train": summary["num_train"], "device": summary["device"],
            "peak_rss_mb": round(rss_mb), "train_images_per_s": round(summary["num_train"] / wall, 1),
            "metrics_epochs": metrics.count("\n") - 1}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data", type=Path)
    ap.add_argument("--arch", default="efficientnet_lite0")
    ap.add_argument("--weights", help="state dict for the arch (for ResNets offline: timing only)")
    ap.add_argument("--classic-epochs", type=int, default=25)
    ap.add_argument("--workers", type=int, default=2, help="loader workers for the classic recipe")
    ap.add_argument("--skip-classic", action="store_true", help="only run finetune (no ratio)")
    ap.add_argument("finetune_args", nargs="*", help="extra args for finetune train, after --")
    args = ap.parse_args()
    result = {"date": time.strftime("%Y-%m-%d"), "machine": machine(), "dataset": str(args.data), "arch": args.arch,
              "torch": torch.__version__}
    result["finetune"] = finetune_defaults(args.data, args.arch, args.weights, args.finetune_args)
    if not args.skip_classic:
        result["classic"] = classic_recipe(args.data, args.arch, args.weights, args.classic_epochs, args.workers)
        result["ratio_wall"] = round(result["finetune"]["wall_s"] / result["classic"]["wall_s"], 4)
        result["speedup"] = round(result["classic"]["wall_s"] / result["finetune"]["wall_s"], 1)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
