"""Make sample_data/shapes: a small ImageFolder the project ships for trying finetune.

Four classes of drawn patterns that an ImageNet backbone tells apart easily (grids look like
crossword puzzles, rings like coils/targets, stripes like radiators/shades, dots like polka
dots), each drawn with random colours, sizes, rotation and noise so the task is not trivial.
Deterministic: running it again rewrites the same files.

    python sample_data/generate.py            # writes sample_data/shapes/{train,val}/<class>/*.jpg
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SIZE = 128
COUNTS = {"train": 30, "val": 10}
OUT = Path(__file__).resolve().parent / "shapes"


def _colour(rng: random.Random, dark: bool) -> tuple[int, int, int]:
    lo, hi = (0, 90) if dark else (150, 255)
    return tuple(rng.randint(lo, hi) for _ in range(3))


def grid(rng: random.Random) -> Image.Image:
    cells, cell = rng.randint(7, 13), 0
    cell = SIZE * 1.5 / cells
    im = Image.new("RGB", (int(SIZE * 1.5),) * 2, _colour(rng, dark=False))
    d = ImageDraw.Draw(im)
    ink = _colour(rng, dark=True)
    for i in range(cells):
        for j in range(cells):
            box = [j * cell, i * cell, (j + 1) * cell, (i + 1) * cell]
            d.rectangle(box, fill=ink if rng.random() < 0.2 else None, outline=ink, width=2)
    return im


def rings(rng: random.Random) -> Image.Image:
    big = int(SIZE * 1.5)
    im = Image.new("RGB", (big, big), _colour(rng, dark=False))
    d = ImageDraw.Draw(im)
    cx, cy = rng.randint(big // 3, 2 * big // 3), rng.randint(big // 3, 2 * big // 3)
    step = rng.randint(6, 14)
    a, b = _colour(rng, dark=True), _colour(rng, dark=False)
    for k, r in enumerate(range(big, 0, -step)):
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=a if k % 2 else b)
    return im


def stripes(rng: random.Random) -> Image.Image:
    big = int(SIZE * 1.5)
    im = Image.new("RGB", (big, big), _colour(rng, dark=False))
    d = ImageDraw.Draw(im)
    width = rng.randint(4, 12)
    ink = _colour(rng, dark=True)
    for x in range(0, big, 2 * width):
        d.rectangle([x, 0, x + width - 1, big], fill=ink)
    return im.rotate(rng.uniform(0, 180), resample=Image.BILINEAR, fillcolor=ink)


def dots(rng: random.Random) -> Image.Image:
    big = int(SIZE * 1.5)
    im = Image.new("RGB", (big, big), _colour(rng, dark=False))
    d = ImageDraw.Draw(im)
    r, gap = rng.randint(3, 8), rng.randint(14, 26)
    ink = _colour(rng, dark=True)
    for i, y in enumerate(range(0, big + gap, gap)):
        for x in range(-gap, big + gap, gap):
            ox = x + (gap // 2 if i % 2 else 0)
            d.ellipse([ox - r, y - r, ox + r, y + r], fill=ink)
    return im


CLASSES = {"grids": grid, "rings": rings, "stripes": stripes, "dots": dots}


def finish(im: Image.Image, rng: random.Random) -> Image.Image:
    """Random crop/rotation, slight blur and sensor-like noise, down to SIZE."""
    im = im.rotate(rng.uniform(-15, 15), resample=Image.BILINEAR, expand=False)
    w = im.width
    side = rng.randint(int(w * 0.6), w)
    x, y = rng.randint(0, w - side), rng.randint(0, w - side)
    im = im.crop((x, y, x + side, y + side)).resize((SIZE, SIZE), Image.BILINEAR)
    im = im.filter(ImageFilter.GaussianBlur(rng.uniform(0, 0.8)))
    noise = np.random.default_rng(rng.randint(0, 2**31)).normal(0, 8, (SIZE, SIZE, 3))
    return Image.fromarray(np.clip(np.asarray(im, dtype=np.float64) + noise, 0, 255).astype(np.uint8))


def main() -> None:
    rng = random.Random(20261127)
    if OUT.exists():
        shutil.rmtree(OUT)
    for split, count in COUNTS.items():
        for name, draw in CLASSES.items():
            folder = OUT / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                finish(draw(rng), rng).save(folder / f"{name}_{i:03d}.jpg", quality=85)
    total = sum(f.stat().st_size for f in OUT.rglob("*.jpg"))
    print(f"wrote {sum(1 for _ in OUT.rglob('*.jpg'))} images, {total / 1e6:.2f} MB, to {OUT}")


if __name__ == "__main__":
    import argparse

    # (--help prints this; the script takes no options: it rewrote the folder when asked for help)
    argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=f"Writes {OUT} anew.").parse_args()
    main()
