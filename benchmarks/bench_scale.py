"""Does memory stay flat and the folder scan stay cheap as a dataset grows?

    python benchmarks/bench_scale.py [--sizes 1000 25000]

Makes synthetic ImageFolders (2 classes, 160x120 JPEGs) of each size in a temporary
folder, then for each: times the folder scan (listing + split), times decoding every image
once (what the bad-file check costs), runs `finetune check` (which reads and decodes every
image as train would, in one process per core), and runs `finetune train` (efficientnet_lite0,
--img-size 64 --views 1 --epochs 5 to keep the run short) measuring its peak RSS.
Prints JSON. finetune keeps no decoded images in memory: only the backbone features
(views x feature_dim x 2 bytes per training image).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from finetune.config import TrainConfig
from finetune.scan import scan_dataset
from finetune.images import load_rgb


def make_folder(root: Path, n: int) -> None:
    rng = np.random.default_rng(0)
    for label, colour in enumerate(((200, 60, 60), (60, 60, 200))):
        folder = root / f"class{label}"
        folder.mkdir(parents=True)
        base = np.clip(np.array(colour) + rng.normal(0, 30, (120, 160, 3)), 0, 255).astype(np.uint8)
        for i in range(n // 2):
            img = np.roll(base, i % 160, axis=1)  # cheap variety
            # No two files alike (finetune uses identical files once): a little noise of the image's own.
            img = np.clip(img + np.random.default_rng(i).integers(-8, 9, img.shape), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(folder / f"{i:06d}.jpg", quality=80)


def child_peak_rss_mb(cmd: list[str]) -> tuple[float, float, dict]:
    """Run cmd in a fresh process (via a wrapper) and return (wall s, its peak RSS MB, its JSON)."""
    wrapper = ("import json,resource,subprocess,sys,time;t=time.perf_counter();"
               "o=subprocess.run(sys.argv[1:],capture_output=True,text=True);"
               "print(json.dumps({'wall':time.perf_counter()-t,'rss':resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,"
               "'rc':o.returncode,'out':o.stdout,'err':o.stderr[-2000:]}))")
    res = json.loads(subprocess.run([sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True).stdout)
    if res["rc"] != 0:
        raise SystemExit(res["err"])
    return res["wall"], res["rss"] / 1024, json.loads(res["out"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 25000])
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sizes:
            data = Path(tmp) / f"n{n}"
            started = time.perf_counter()
            make_folder(data, n)
            made = time.perf_counter() - started
            started = time.perf_counter()
            split = scan_dataset(data, 0.2, 0)
            scan_s = time.perf_counter() - started
            paths = [s.path for s in split.train + split.val]
            started = time.perf_counter()
            for p in paths:
                load_rgb(p, TrainConfig().max_pixels)
            decode_s = time.perf_counter() - started
            check_wall, check_rss, check = child_peak_rss_mb([
                sys.executable, "-m", "finetune", "check", str(data), "--arch", "efficientnet_lite0", "--json", "--quiet"])
            wall, rss, summary = child_peak_rss_mb([
                sys.executable, "-m", "finetune", "train", str(data), "--arch", "efficientnet_lite0", "--img-size", "64",
                "--views", "1", "--epochs", "5", "--runs-dir", str(Path(tmp) / "runs"), "--json", "--quiet"])
            rows.append({"images": n, "make_s": round(made, 1), "scan_s": round(scan_s, 2),
                         "decode_all_once_s": round(decode_s, 1), "decode_img_per_s": round(len(paths) / decode_s),
                         "check_wall_s": round(check_wall, 1), "check_peak_rss_mb": round(check_rss), "check_ok": check["ok"],
                         "check_skipped": len(check["skipped"]),
                         "train_wall_s": round(wall, 1), "train_peak_rss_mb": round(rss), "best_val_acc": summary["best_val_acc"]})
            print(json.dumps(rows[-1]), file=sys.stderr)
    print(json.dumps({"date": time.strftime("%Y-%m-%d"), "cores": os.cpu_count(), "runs": rows}, indent=1))


if __name__ == "__main__":
    main()
