"""Which folders of DATA are splits and which are classes.

People bring folders laid out in many ways: `train/` + `val/`, `Training/` + `Testing/`,
`seg_train/` + `seg_test/`, all of it inside one wrapper folder (as zips extract), or just
one folder per class. Names say a lot, and the structure says the rest: split folders hold
class folders, class folders hold images. Where the two disagree the reading stops with a
message saying what was seen and how to state the layout (`--layout`), because a folder
misread (say, "Training" and "Testing" taken as two classes) trains a meaningless model that
still reports a good-looking accuracy.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from .errors import DataError, UsageError
from .images import is_candidate_image

SPLIT_NAMES = {
    "train": ("train", "training", "trn", "trainval"),  # (trainval: PASCAL VOC's train + val, trained on)
    "val": ("val", "valid", "validation", "dev"),
    "test": ("test", "testing", "eval", "holdout"),
}
# Folders and files that systems keep beside people's own: macOS's zips, Windows, and NAS boxes
# (Synology's @eaDir holds a thumbnail folder per photo, QNAP's .@__thumb is hidden anyway).
IGNORED_NAMES = frozenset({"__MACOSX", "__pycache__", "Thumbs.db", "desktop.ini", "@eaDir", "#recycle", "@Recycle",
                           "#snapshot", "$RECYCLE.BIN", "System Volume Information"})
MAX_WRAPPERS = 6  # DATA/archive/dataset/train/... : folders holding one folder and no images are looked through
ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".7z", ".rar")
LAYOUT_HELP = "auto | classes | train=DIR[,val=DIR][,test=DIR] (folders relative to DATA)"


@dataclass
class Layout:
    root: Path  # where the split or class folders are: DATA, or a wrapper folder inside it
    splits: dict[str, Path]  # "train" (always), "val", "test": each a folder of class folders
    kind: str  # "split folders" or "class folders"
    notes: list[str] = field(default_factory=list)  # folders seen but not used, and why


def is_hidden(name: str) -> bool:
    return name.startswith(".") or name in IGNORED_NAMES


def sub_folders(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if p.is_dir() and not is_hidden(p.name)), key=lambda p: p.name)


def holds_images(folder: Path) -> bool:
    """Image files directly inside (not in sub-folders)."""
    return any(p.is_file() and not is_hidden(p.name) and is_candidate_image(p) for p in folder.iterdir())


def word_role(word: str) -> str | None:
    """The split a word names, also run together with 'set' or a number (`trainset`, `train2017`,
    `val2014`), as COCO-style and many Kaggle datasets name them."""
    return next((role for role in SPLIT_NAMES if split_word_with(WORD_SUFFIX, role, word)), None)


# After a split's word: in a word of a folder's name (trusted only with the structure of splits), and
# as a whole name (trusted alone: `testset`, `val2017`; not `test1`, `test2`, which may be classes).
WORD_SUFFIX = r"(sets?|data)?\d*"
NAME_SUFFIX = r"(sets?|(19|20)\d\d)?"


def split_word_with(suffix: str, role: str, text: str) -> bool:
    return re.fullmatch(rf"({'|'.join(SPLIT_NAMES[role])}){suffix}", text.lower()) is not None


def split_role(name: str) -> str | None:
    """'train', 'val' or 'test' when a folder's name says so: any letter case, alone or joined
    to other words by _ - . or a space (`Training`, `seg_train`, `train-set`, `Test Set`, `trainset`)."""
    words = [w for w in re.split(r"[_\-.\s]+", name.lower()) if w]
    roles = {role for w in words if (role := word_role(w)) is not None}
    return roles.pop() if len(roles) == 1 else None


def is_split_name(name: str, role: str) -> bool:
    """The name is the split's word, alone or run together with `set` or a year (`test`, `testset`,
    `val2017`); not `test1`, `test2`, which may be classes."""
    return split_word_with(NAME_SUFFIX, role, name)


def folder_role(folder: Path) -> str | None:
    """The split a folder is, by its name; a name that only contains a split word (`test_tubes`,
    `test1`) counts only when the folder also holds class folders, as splits do, and no images."""
    role = split_role(folder.name)
    if role is None or is_split_name(folder.name, role):
        return role
    return role if sub_folders(folder) and not holds_images(folder) else None


def find_layout(data: Path, layout: str = "auto") -> Layout:
    """How to read DATA: `auto` (names and structure), `classes` (DATA's folders are the
    classes, whatever their names), or explicit split folders `train=DIR,val=DIR,test=DIR`."""
    if not data.exists():
        raise DataError(f"{data}: no such folder. Give a folder of class folders (DATA/<class>/*.jpg) or DATA/train + DATA/val.")
    if not data.is_dir():
        if data.suffix.lower() in (".csv", ".tsv", ".txt"):  # (a labels file given as DATA)
            raise DataError(f"{data}: is a file, not a folder. For labels from a CSV: DATA is the folder its paths are in, "
                            f"and --labels {data} names the CSV.")
        if data.name.lower().endswith(ARCHIVE_SUFFIXES):
            raise DataError(f"{data}: an archive; unpack it (e.g. unzip {data.name}) and give the folder it makes as DATA.")
        raise DataError(f"{data}: is a file, not a folder. Give a folder of class folders (DATA/<class>/*.jpg).")
    if layout == "classes":
        return Layout(data, {"train": data}, "class folders")
    if layout != "auto":
        return Layout(data, explicit_splits(data, layout), "split folders")
    root = look_through_wrappers(data)
    notes = [f"{data.name}: read inside {root.relative_to(data)}/ (the only folder there)"] if root != data else []
    found = guess_layout(root)
    found.notes[:0] = notes
    return found


def explicit_splits(data: Path, spec: str) -> dict[str, Path]:
    splits: dict[str, Path] = {}
    for part in spec.split(","):
        role, sep, folder = part.strip().partition("=")
        if not sep or role not in SPLIT_NAMES or not folder or role in splits:
            raise UsageError(f"--layout '{spec}': expected {LAYOUT_HELP}.")
        splits[role] = data / folder
        if not splits[role].is_dir():
            raise DataError(f"{splits[role]}: no such folder (--layout {role}={folder}). Name folders inside {data}.")
        splits[role] = inside_split_wrapper(splits[role], role)
    if "train" not in splits:
        raise UsageError(f"--layout '{spec}': name the training folder too (train=DIR).")
    overlap = overlapping_splits(splits)
    if overlap:
        raise UsageError(f"--layout '{spec}': {overlap}; each split needs a folder of its own (leave val out to hold "
                         "out part of train).")
    return splits


def overlapping_splits(splits: dict[str, Path], with_train_only: bool = False) -> str | None:
    """How two splits' folders overlap, if any do (one folder, or one inside the other); only
    with train's, when asked."""
    roles = list(splits)
    for i, late in enumerate(roles):
        for early in roles[:i]:
            if with_train_only and "train" not in (early, late):
                continue
            a, b = splits[late].resolve(), splits[early].resolve()
            if a == b or os.path.samefile(a, b):  # (samefile: Train and train on a case-insensitive disk)
                return f"{late} is the same folder as {early} ({splits[early]})"
            if b in a.parents or a in b.parents:
                inner, outer = (late, early) if b in a.parents else (early, late)
                return f"{inner} is inside {outer} ({splits[outer]})"
    return None


def look_through_wrappers(data: Path) -> Path:
    """A folder holding exactly one folder and no images cannot be a folder of classes: the
    data is inside it (zips often extract to DATA/<name>/...)."""
    root = data
    for _ in range(MAX_WRAPPERS):
        inner = sole_folder(root)
        if inner is None or holds_images(inner):
            break
        root = inner
    return root


def sole_folder(folder: Path, inner: list[Path] | None = None) -> Path | None:
    """The one folder inside `folder`, where it holds just that (no images, no other folder);
    `inner`: its sub_folders, where the caller listed them already."""
    inner = sub_folders(folder) if inner is None else inner
    return inner[0] if len(inner) == 1 and not holds_images(folder) else None


WRAPPER_NAMES = ("images", "imgs", "img", "data", "dataset")


def inside_split_wrapper(split: Path, role: str) -> Path:
    """The folder of class folders of a split folder that holds one folder and no images, named
    as a wrapper is (Kaggle's `seg_train/seg_train/<class>`, `train/train/`, `train/images/`);
    else the split folder itself (a val/ holding a single class folder stays as it is)."""
    inner = sole_folder(split)
    if inner is None or holds_images(inner):
        return split
    name = inner.name.lower()
    return inner if name == split.name.lower() or word_role(name) == role or name in WRAPPER_NAMES else split


def unlabelled_images(folder: Path) -> bool:
    """Images and no class folders, directly or inside one wrapper folder (`seg_pred/seg_pred/`)."""
    inner = sub_folders(folder)
    wrapped = sole_folder(folder, inner)
    if wrapped is not None:
        folder, inner = wrapped, sub_folders(wrapped)
    return not inner and holds_images(folder)


def guess_layout(root: Path) -> Layout:
    folders = sub_folders(root)
    by_role: dict[str, list[Path]] = {}
    for f in folders:
        if (role := folder_role(f)) is not None:
            by_role.setdefault(role, []).append(f)
    if not by_role:
        if looks_like_splits(folders):
            names = [f.name for f in folders]
            shared = sorted(set.intersection(*({p.name for p in sub_folders(f)} for f in folders)))
            if all(split_role(name) for name in shared):  # (cat/train, cat/test, dog/train, ...: classes first)
                raise DataError(
                    f"{root}: its folders {', '.join(names[:4])}{', ...' if len(names) > 4 else ''} each hold split folders "
                    f"({', '.join(shared)}): the splits are inside the classes. finetune reads them the other way round: "
                    f"move the images to {root.name}/{min(shared, key=lambda n: split_role(n) != 'train')}/<class>/... (one "
                    f"folder per split, each holding the class "
                    f"folders); --layout classes would mix the splits.")
            raise DataError(
                f"{root}: its folders {', '.join(names)} each hold the same folders ({', '.join(shared[:4])}"
                f"{', ...' if len(shared) > 4 else ''}), as split folders do, but are not named like splits. If they are "
                f"splits, rename them (train/, val/, test/) or pass --layout train={names[0]},test={names[1]}; if they are "
                f"classes with sub-folders, pass --layout classes.")
        return Layout(root, {"train": root}, "class folders")
    return split_layout(root, folders, by_role)


def looks_like_splits(folders: list[Path]) -> bool:
    """Whatever the names: two or more folders, no images directly in them, each holding the
    same (at least two) sub-folders. That is a train/test layout; classes rarely look like it."""
    if len(folders) < 2 or any(holds_images(f) for f in folders):
        return False
    names = [{p.name for p in sub_folders(f)} for f in folders]
    shared = set.intersection(*names)
    return len(shared) >= 2 and all(len(shared) >= 0.5 * len(n) for n in names)


def split_layout(root: Path, folders: list[Path], by_role: dict[str, list[Path]]) -> Layout:
    """Folders named like splits: check they are splits, and what else lies beside them."""
    for role, found in by_role.items():
        if len(found) > 1:
            raise DataError(f"{root}: {', '.join(f.name for f in found)} would all be the {role} split; keep one, or "
                            f"pass --layout {LAYOUT_HELP}.")
    others = [f for f in folders if not any(f in fs for fs in by_role.values())]
    if "train" not in by_role:
        named = next(iter(by_role.values()))[0]
        if others:
            raise DataError(f"{named}: a '{named.name}' folder next to class folders, but no {root / 'train'} folder. Put the "
                            f"class folders into {root / 'train'}, or pass --layout classes if '{named.name}' really is a class.")
        raise DataError(f"{root}: split folders ({', '.join(f.name for fs in by_role.values() for f in fs)}) but none to "
                        f"train on; add a train/ folder or pass --layout train=DIR,...")
    train = by_role["train"][0]
    if not sub_folders(train):
        names = ", ".join(f.name for f in folders)
        raise DataError(f"{train}: named like a split folder, but it holds no class folders. If {names} are your classes, "
                        f"pass --layout classes; if they are splits, put each class's images into its own folder ({train}/<class>/).")
    layout = Layout(root, {"train": inside_split_wrapper(train, "train")}, "split folders")
    for role in ("val", "test"):
        if role in by_role:
            folder = by_role[role][0]
            if sub_folders(folder):
                layout.splits[role] = inside_split_wrapper(folder, role)
            else:
                layout.notes.append(f"{folder.name}/ holds no class folders (images without labels?): not used")
    for role, folder in layout.splits.items():  # (Kaggle's seg_train/seg_train/<class>, train/images/<class>)
        if folder != by_role[role][0]:
            layout.notes.append(f"{role}: read inside {folder.relative_to(root)}/ (the only folder in {by_role[role][0].name}/)")
    overlap = overlapping_splits(layout.splits, with_train_only=True)
    if overlap:  # (val/ a link to train/: every val image a training image; val and test one folder: evaluate reads one)
        raise DataError(f"{root}: {overlap}; each split needs a folder of its own (remove the link, or leave val out to "
                        f"hold out part of train).")
    for other in others:
        if unlabelled_images(other):  # (Kaggle's Intel scenes: seg_pred/seg_pred/*.jpg, to predict on)
            layout.notes.append(f"{other.name}/ holds images but no class folders (unlabelled?): not used")
            continue
        if holds_images(other) or sub_folders(other):
            raise DataError(f"{other}: a folder of images beside the split folders ({', '.join(p.name for p in layout.splits.values())}) "
                            f"that is not one of them. Move it into a split, or out of {root}; or pass --layout {LAYOUT_HELP}.")
        layout.notes.append(f"{other.name}/ holds no images: not used")
    return layout
