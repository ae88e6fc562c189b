"""A 4-class scan folder the size of issue 12's medical set, made from chest_xray: for timing.

    python benchmarks/make_scans.py ../shared/datasets/chest_xray /tmp/scans

Issue 12's medical set (4 classes, 5,712 training and 1,311 test images, 224x224 grayscale
scans saved as RGB JPEGs, `Training/` and `Testing/`) is not here, but its size sets the
time of a default run: this folder has its layout and counts. Each chest X-ray gives two
images, itself and itself turned a quarter, and the classes are the X-ray's class with or
without the turn (so 4). The accuracy on it says little (the turn is easy to see); what a
run costs on it is what it is for. (An X-ray and its turned copy may fall one in train and one
in val, which flatters val: the stages the recipe plans on it may differ from the real set's.)
Training images come from chest_xray's train and val folders, test images from its test
folder; each class's share follows its source. Seeded: the same folder every time.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from PIL import Image

TRAIN, TEST = 5_712, 1_311
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def sources(root: Path, splits: tuple[str, ...]) -> list[tuple[str, Path]]:
    """(class, path) of every image in these splits of an ImageFolder tree, sorted."""
    return sorted((p.parent.name, p) for split in splits for p in (root / split).glob("*/*")
                  if p.suffix.lower() in IMAGE_SUFFIXES)


def write(pairs: list[tuple[str, Path]], count: int, out: Path, rng: random.Random) -> int:
    """`count` images from `pairs`, each source as itself and turned (classes CLASS and CLASS_turned)."""
    made = [(label, path, turned) for label, path in pairs for turned in (False, True)]
    rng.shuffle(made)
    written = 0
    for label, path, turned in made:
        if written == count:
            break
        try:
            with Image.open(path) as im:
                image = im.convert("RGB")
        except (OSError, Image.DecompressionBombError):  # (chest_xray has a few unreadable files: they are left out)
            continue
        if turned:
            image = image.transpose(Image.Transpose.ROTATE_90)
        folder = out / f"{label}_turned" if turned else out / label
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"{path.parent.parent.name}-{path.stem}.jpg", quality=92)  # (train and val may share names)
        written += 1
    return written


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("chest_xray", type=Path)
    ap.add_argument("out", type=Path)
    args = ap.parse_args()
    if args.out.exists():
        raise SystemExit(f"{args.out} exists: give a new folder.")
    rng = random.Random(0)
    train = write(sources(args.chest_xray, ("train", "val")), TRAIN, args.out / "Training", rng)
    test = write(sources(args.chest_xray, ("test",)), TEST, args.out / "Testing", rng)
    print(f"{args.out}: Training {train} images, Testing {test}, 4 classes")


if __name__ == "__main__":
    main()
