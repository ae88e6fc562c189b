"""A synthetic dataset whose classes differ in texture, not in object category.

    python benchmarks/make_textures.py OUT [--train 200] [--val 60] [--test 60] [--size 160] [--seed 0]

Four classes of band-pass noise that differ only in their grain (the spatial frequency band)
and the direction of the grain: `fine`, `coarse` (isotropic, fine vs coarse grain),
`streaks_a`, `streaks_b` (medium grain, oriented at about 30 and 120 degrees). Each image
draws its frequency, bandwidth, contrast, brightness and colour tint at random, and the
frequency ranges of `fine` and `coarse` overlap, so the task is not trivial. Nothing like
it is in ImageNet: a stand-in for micrographs, materials and scans. Writes
OUT/{train,val,test}/<class>/*.jpg (JPEG quality 90). Deterministic for a seed.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = {
    # name: (frequency range in cycles/pixel, orientation in degrees or None)
    "fine": ((0.16, 0.30), None),
    "coarse": ((0.06, 0.18), None),
    "streaks_a": ((0.08, 0.16), 30.0),
    "streaks_b": ((0.08, 0.16), 120.0),
}


def texture(rng: np.random.Generator, size: int, band: tuple[float, float], angle: float | None) -> np.ndarray:
    fy, fx = np.meshgrid(np.fft.fftfreq(size), np.fft.fftfreq(size), indexing="ij")
    radius = np.hypot(fx, fy)
    centre = rng.uniform(*band)
    width = centre * rng.uniform(0.15, 0.35)
    mask = np.exp(-0.5 * ((radius - centre) / width) ** 2)
    if angle is not None:
        theta = np.deg2rad(angle + rng.normal(0, 8))
        direction = np.abs(np.cos(np.arctan2(fy, fx) - theta))  # 1 along the grain's frequency axis
        mask *= direction ** 12
    noise = np.fft.fft2(rng.normal(size=(size, size)))
    img = np.real(np.fft.ifft2(noise * mask))
    img = (img - img.mean()) / (img.std() + 1e-8)
    contrast, brightness = rng.uniform(25, 60), rng.uniform(90, 170)
    tint = rng.uniform(0.75, 1.25, size=3)
    rgb = np.clip(brightness * tint + contrast * img[..., None], 0, 255)
    return rgb.astype(np.uint8)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--train", type=int, default=200)
    ap.add_argument("--val", type=int, default=60)
    ap.add_argument("--test", type=int, default=60)
    ap.add_argument("--size", type=int, default=160)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    for split, n in (("train", args.train), ("val", args.val), ("test", args.test)):
        for name, (band, angle) in CLASSES.items():
            folder = args.out / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(texture(rng, args.size, band, angle)).save(folder / f"{name}_{i:04d}.jpg", quality=90)
    print(f"{args.out}: {len(CLASSES)} classes, {args.train}/{args.val}/{args.test} images per class (train/val/test)")


if __name__ == "__main__":
    main()
