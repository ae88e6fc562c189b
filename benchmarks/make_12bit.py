"""An ImageFolder tree copied as 16-bit greyscale PNGs holding 12-bit values, as medical exports are.

    python benchmarks/make_12bit.py ../shared/datasets/chest_xray /tmp/chest12

X-rays, CT and MRI slices exported from DICOM are often 16-bit PNGs or TIFFs whose values only
reach 4,095 (12 bits). This copies each image of a tree (same folders, same names, .png) as
such a file: its greyscale values times 16. What the tool makes of them can then be compared
with the 8-bit originals (BENCHMARKS.md, "Greyscale deeper than 8 bits").
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("source", type=Path)
    ap.add_argument("out", type=Path)
    args = ap.parse_args()
    if args.out.exists():
        raise SystemExit(f"{args.out} exists: give a new folder.")
    made = 0
    for path in sorted(args.source.rglob("*")):
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        try:
            with Image.open(path) as im:
                grey = np.asarray(im.convert("L"), dtype=np.uint16)
        except (OSError, Image.DecompressionBombError):  # (unreadable files are left out)
            continue
        target = (args.out / path.relative_to(args.source)).with_suffix(".png")
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(grey * 16).save(target)  # (uint16 -> mode I;16)
        made += 1
    print(f"{args.out}: {made} images, 16-bit PNGs of 12-bit values")


if __name__ == "__main__":
    main()
