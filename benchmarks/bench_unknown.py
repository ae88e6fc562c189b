"""The unknown rule: how many images of other datasets a model flags as unknown, against how
many of its own val (or test) images.

    python benchmarks/bench_unknown.py --model runs/hym --own ../shared/datasets/hymenoptera_data/val \\
        --foreign chest=../shared/datasets/chest_xray/test --foreign shapes=sample_data/shapes [--limit 400]

Each folder is searched recursively; at most --limit images of each are used (a seeded
sample). Prints one JSON row per folder: images, flagged unknown, the share flagged, and for
`own` the accuracy on the kept images (their parent folder is the true class). Targets
(issue 14): at least 90% of foreign images flagged, at most 5% of own images.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

from finetune import PredictConfig, load_model, predict
from finetune.scan import list_images


def sample(folder: Path, limit: int, seed: int = 0) -> list[Path]:
    images = list_images(folder)
    random.Random(seed).shuffle(images)
    return sorted(images[:limit])


def measure(model, name: str, folder: Path, limit: int, cfg: PredictConfig, own: bool) -> dict:
    started = time.perf_counter()
    rows = [p for p in predict(model, sample(folder, limit), cfg) if p.error is None]
    flagged = sum(p.unknown for p in rows)
    out = {"set": name, "folder": str(folder), "images": len(rows), "flagged": flagged,
           "flagged_share": flagged / len(rows) if rows else None, "seconds": round(time.perf_counter() - started, 1)}
    if own:
        kept = [p for p in rows if not p.unknown]
        out["accuracy_kept"] = sum(p.top_k[0]["label"] == Path(p.path).parent.name for p in kept) / len(kept) if kept else None
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="model file or run folder")
    parser.add_argument("--own", type=Path, required=True, help="the model's own held-out images (val or test), DIR/<class>/*")
    parser.add_argument("--foreign", action="append", default=[], help="NAME=FOLDER of images of no class the model knows")
    parser.add_argument("--limit", type=int, default=400)
    parser.add_argument("--workers", type=int, default=None)
    args = parser.parse_args()
    model = load_model(args.model)
    cfg = PredictConfig(workers=args.workers)
    rows = [measure(model, "own", args.own, args.limit, cfg, own=True)]
    for item in args.foreign:
        name, _, folder = item.partition("=")
        rows.append(measure(model, name, Path(folder), args.limit, cfg, own=False))
    for row in rows:
        print(json.dumps({"model": str(model.path), "threshold": model.distance_threshold, **row}))


if __name__ == "__main__":
    main()
