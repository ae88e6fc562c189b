"""Does memory stay flat and the folder scan stay cheap as a dataset grows?

    python benchmarks/bench_scale.py [--sizes 1000 25000]
    python benchmarks/bench_scale.py --sizes --photos 25000     # real-sized JPEGs: a first and a second run
    python benchmarks/bench_scale.py --sizes --store-rows 1000000 [--store-epochs 3]

--photos N: N photo-sized JPEGs (500x375, 2 classes), trained with the defaults twice with an
empty feature cache of its own: the first run, then a second that changes only --lr (the
features come from the cache). Wall time, peak RSS, accuracy and cache use of each.

--store-rows N: the head training over a feature table of N simulated images
(efficientnet_lite0's 2,064 features, 2 classes), kept in a file as a run does when the
features pass --feature-memory-gb: the time to write it, each candidate head's training time,
and this process's peak RSS (the table is 4 GB at a million rows).

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
from finetune.reading import scan_dataset
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


def make_photos(root: Path, n: int) -> None:
    """500x375 JPEGs of smooth random scenes; the classes differ in the orientation of their
    dominant gradient and texture (a task a backbone's features separate, not a trivial one)."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:375, 0:500].astype(np.float32)
    for label in range(2):
        folder = root / f"class{label}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n // 2):
            angle = rng.uniform(-0.6, 0.6) + (0.0 if label == 0 else np.pi / 2)
            freq = rng.uniform(0.01, 0.05)
            wave = np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * freq * 2 * np.pi + rng.uniform(0, 6.3))
            colour = rng.uniform(40, 215, 3)
            img = colour + 40 * wave[..., None] + rng.normal(0, 12, (375, 500, 3))
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(folder / f"{i:06d}.jpg", quality=85)


def photo_runs(tmp: Path, n: int, folder: Path | None = None) -> dict:
    data = folder or tmp / f"photos{n}"
    started = time.perf_counter()
    if not (data / "class1" / f"{n // 2 - 1:06d}.jpg").exists():  # (a folder given again is reused as it is)
        make_photos(data, n)
    made = time.perf_counter() - started
    env = {**os.environ, "FINETUNE_CACHE_DIR": str(tmp / "cache")}
    out = {"images": n, "image_size": "500x375", "make_s": round(made, 1)}
    for name, extra in (("first", []), ("second", ["--lr", "0.003"])):
        wall, rss, summary = child_peak_rss_mb([sys.executable, "-m", "finetune", "train", str(data), "--arch", "efficientnet_lite0",
                                                "--runs-dir", str(tmp / "runs"), "--json", "--quiet", *extra], env)
        out[name] = {"options": " ".join(extra), "wall_s": round(wall, 1), "peak_rss_mb": round(rss),
                     "best_val_acc": summary["best_val_acc"], "num_train": summary["num_train"],
                     "learning_curve": summary["recipe"]["learning_curve"], "views": summary["recipe"]["views_computed"],
                     "head": summary["recipe"]["head"], "feature_cache": summary["feature_cache"]}
        print(json.dumps({name: out[name]}), file=sys.stderr)
    out["second_over_first"] = round(out["second"]["wall_s"] / out["first"]["wall_s"], 3)
    return out


def store_run(tmp: Path, rows: int, epochs: int) -> dict:
    """Head training over a simulated feature table in a file (store.DiskRows), in this process."""
    import resource

    import torch

    from finetune.data import DatasetSplit
    from finetune.features import FeatureSet
    from finetune.models import build_classifier, get_arch
    from finetune.recipe import choose_head
    from finetune.stages import make_loss
    from finetune.store import DiskRows

    dim, classes, n_val = 2064, 2, rows // 5
    gen = torch.Generator().manual_seed(0)
    centres = torch.randn(classes, dim, generator=gen)
    def table(n: int) -> tuple[DiskRows, torch.Tensor]:
        t = DiskRows.create(n, 1, dim, tmp / "store")
        labels = torch.randint(0, classes, (n,), generator=gen)
        step = 16_384
        for start in range(0, n, step):
            y = labels[start:start + step]
            x = (centres[y] * 0.3 + torch.randn(len(y), dim, generator=gen)).to(torch.float16)
            os.pwrite(t.file.fileno(), x.numpy().tobytes(), start * t.row_bytes())
        return t, labels
    started = time.perf_counter()
    train, train_y = table(rows)
    val, val_y = table(n_val)
    write_s = time.perf_counter() - started
    spec = get_arch("efficientnet_lite0")
    model = build_classifier(spec, classes, multi_layer=True)
    cfg = TrainConfig(epochs=epochs, batch_size=256, head_features="auto")
    split = DatasetSplit(classes=["a", "b"], train=[], val=[], layout="class folders")
    started = time.perf_counter()
    choice, scores, _ = choose_head(FeatureSet(train, train_y, val, val_y), model, split, spec.preprocessing(None),
                                 make_loss(cfg, [rows // 2, rows // 2], torch.device("cpu")), cfg, torch.device("cpu"), 1)
    heads_s = time.perf_counter() - started
    return {"rows": rows, "val_rows": n_val, "dim": dim, "table_gb": round(rows * dim * 2 / 1e9, 2), "write_s": round(write_s, 1),
            "epochs": epochs, "candidates": len(scores), "heads_s": round(heads_s, 1),
            "s_per_epoch": round(heads_s / (epochs * len(scores)), 1), "val_acc": [round(s["val_acc"], 4) for s in scores],
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}


def child_peak_rss_mb(cmd: list[str], env: dict | None = None) -> tuple[float, float, dict]:
    """Run cmd in a fresh process (via a wrapper) and return (wall s, its peak RSS MB, its JSON)."""
    wrapper = ("import json,resource,subprocess,sys,time;t=time.perf_counter();"
               "o=subprocess.run(sys.argv[1:],capture_output=True,text=True);"
               "print(json.dumps({'wall':time.perf_counter()-t,'rss':resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,"
               "'rc':o.returncode,'out':o.stdout,'err':o.stderr[-2000:]}))")
    res = json.loads(subprocess.run([sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True, env=env).stdout)
    if res["rc"] != 0:
        raise SystemExit(res["err"])
    return res["wall"], res["rss"] / 1024, json.loads(res["out"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="*", default=[1000, 25000])
    ap.add_argument("--photos", type=int, help="also: a folder of this many 500x375 JPEGs, first and second run")
    ap.add_argument("--photos-dir", type=Path, help="where to make the --photos folder (kept; reused when it is there)")
    ap.add_argument("--store-rows", type=int, help="also: head training over a simulated feature table of this many rows")
    ap.add_argument("--store-epochs", type=int, default=3)
    args = ap.parse_args()
    rows, extra = [], {}
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        if args.store_rows:
            extra["store"] = store_run(Path(tmp), args.store_rows, args.store_epochs)
            print(json.dumps(extra["store"]), file=sys.stderr)
        if args.photos:
            extra["photos"] = photo_runs(Path(tmp), args.photos, args.photos_dir)
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
    print(json.dumps({"date": time.strftime("%Y-%m-%d"), "cores": os.cpu_count(), "runs": rows, **extra}, indent=1))


if __name__ == "__main__":
    main()
