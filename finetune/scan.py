"""Listing the labelled images of a folder, as train, evaluate and check read it: the layout
(layout.py), each class folder's images (every real file once; symlinks are never followed in
a circle or into another class), files with identical bytes, and the train/val split."""

from __future__ import annotations

import os
import random
import unicodedata
from collections import deque
from dataclasses import replace
from pathlib import Path

from .config import DEFAULT_VAL_FRACTION, MIN_CAPPED_VAL, VAL_CAP
from .data import DatasetSplit, Sample
from .digests import DigestMemo, file_digests, is_unreadable
from .errors import DataError
from .images import DICOM_REASON, file_head, is_candidate_image, is_dicom, suffix_by_content
from .layout import Layout, holds_images, is_hidden, sub_folders

IMBALANCE_RATIO = 3.0  # largest class / smallest class at which training warns


UNREADABLE_FOLDER = "a folder that may not be read (permission denied): make it readable"


class TreeReader:
    """Lists the images under class folders so that every real file is read once and no
    symbolic link leads the walk in a circle, or into another class's folder (whose images
    would get this class's label). What is not taken goes to `skipped` with the reason."""

    def __init__(self, class_folders: list[Path], skipped: list[dict]):
        self.class_roots = {os.path.realpath(p) for p in class_folders}
        self.seen_dirs: set[str] = set()
        self.seen_files: dict[str, Path] = {}
        self.skipped = skipped
        self.links: deque[tuple[Path, str, str]] = deque()  # (link, the folder it is in, its class folder), followed last

    def images(self, folder: Path) -> list[Path]:
        found: list[Path] = []
        real = os.path.realpath(folder)
        if real in self.seen_dirs:  # (val/cat a link to train/cat: its images are not val's; said, not passed over)
            self.skipped.append({"path": str(folder), "reason": f"a folder already read ({real}): its images are read there"})
        else:
            self._walk(folder, real, real, found)
            # Links after every real entry: a file reached both ways is listed where it really is
            # (cat/dogs_link -> ../dog sorts before dog/, and predict listed dog's images under it).
            while self.links:
                self._follow(*self.links.popleft(), found)
        return found

    def _walk(self, folder: Path, real: str, class_root: str, found: list[Path]) -> None:
        self.seen_dirs.add(real)
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except PermissionError:
            if real == class_root:  # (the folder asked for: the caller says so)
                raise
            self.skipped.append({"path": str(folder), "reason": UNREADABLE_FOLDER})
            return
        for entry in entries:
            if is_hidden(entry.name):
                continue
            path = Path(entry.path)
            if entry.is_symlink():
                self.links.append((path, real, class_root))
            elif entry.is_dir():
                inner = os.path.join(real, entry.name)
                if inner in self.seen_dirs:  # (reached through a link by an earlier call)
                    self.skipped.append({"path": str(path), "reason": f"a folder already read ({inner})"})
                else:
                    self._walk(path, inner, class_root, found)
            elif entry.is_file():
                # (a file that is not a link is where its folder really is: no realpath, which
                # lstats every component; listing 25,000 files took 0.38 s with it, 0.12 s without)
                self._take_file(path, os.path.join(real, entry.name), found)
            else:  # (a FIFO or a device would block the decoder)
                self.skipped.append({"path": str(path), "reason": _not_a_file_reason(path)})

    def _follow(self, path: Path, here: str, class_root: str, found: list[Path]) -> None:
        """A symbolic link in folder `here`: its folder walked or its file taken, unless it leads in a
        circle, into another class's folder or to what was read already."""
        is_dir = path.is_dir()  # (each is a stat of the link's target: once)
        if not (is_dir or path.is_file()):
            self.skipped.append({"path": str(path), "reason": _not_a_file_reason(path)})
            return
        target = os.path.realpath(path)
        reason = self._refuse_link(target, here, class_root)
        if reason is None and is_dir and target in self.seen_dirs:
            reason = f"a folder already read ({target})"
        if reason is not None:
            self.skipped.append({"path": str(path), "reason": reason})
        elif is_dir:
            self._walk(path, target, class_root, found)
        else:
            self._take_file(path, target, found)

    def _refuse_link(self, target: str, here: str, class_root: str) -> str | None:
        """Why a symbolic link (to a folder or a file) in folder `here` is not followed, if it is not."""
        if here == target or here.startswith(target + os.sep):
            return f"symbolic link to a folder above it ({target}): a loop, not entered"
        inside_other = [r for r in self.class_roots if r != class_root and (target == r or target.startswith(r + os.sep))]
        if inside_other:
            return f"symbolic link into another class folder ({inside_other[0]}): its images are read there"
        return None

    def _take_file(self, path: Path, real: str, found: list[Path]) -> None:
        """`real`: the file's real path."""
        if not is_candidate_image(path):
            self.skipped.append({"path": str(path), "reason": not_an_image_reason(path)})
            return
        if real in self.seen_files:
            self.skipped.append({"path": str(path), "reason": f"the same file as {self.seen_files[real]} (a link): read once"})
            return
        self.seen_files[real] = path
        found.append(path)


def _not_a_file_reason(path: Path) -> str:
    """Why an entry that is neither a folder nor a regular file (after links) is not read."""
    if not os.path.exists(path):
        return "broken symbolic link"
    return "symbolic link to something not a regular file" if path.is_symlink() else "not a regular file"


def not_an_image_reason(path: Path) -> str:
    """Why a file is not read; for DICOM, or an image whose name has no extension, what to do instead."""
    head = file_head(path)  # (read once for both)
    if is_dicom(path, head):
        return DICOM_REASON
    suffix = suffix_by_content(path, head) if not path.suffix else None  # (not a camera's RAW file: TIFF inside, not one)
    if suffix is not None:  # (it said "not an image file" of a photo saved without its extension)
        return f"an image ({suffix[1:].upper()}) whose name does not end in an image extension: not read; rename it to end in {suffix}"
    return "not an image file"


def list_images(folder: Path, skipped: list[dict] | None = None) -> list[Path]:
    """Every image file below `folder`, sorted, each real file once (for predict); the files
    not read go to `skipped` ({path, reason}) where it is given."""
    # (sorted again: a link's file is listed after the real entries, where it was reached)
    return sorted(TreeReader([], skipped if skipped is not None else []).images(folder), key=str)


def files_not_read(skipped: list[dict], folder: Path) -> str:
    """', only N files it does not read (e.g. NAME: REASON)' for the skipped files under `folder`;
    '' where there are none: what an error about a folder without images adds."""
    inside = [s for s in skipped if Path(s["path"]).is_relative_to(folder)]
    if not inside:
        return ""
    return (f", only {len(inside)} file{'s' if len(inside) != 1 else ''} it does not read (e.g. "
            f"{Path(inside[0]['path']).name}: {inside[0]['reason']})")


def read_split(data: Path, found: Layout, val_split: float | None, seed: int, memo: DigestMemo | None = None) -> DatasetSplit:
    train_root = found.splits["train"]
    classes = [p.name for p in sub_folders(train_root)]
    if len(classes) < 2:
        have = f"only '{classes[0]}'" if classes else "none"
        inside = f" If the classes are inside {train_root / classes[0]}, give that folder as DATA" if (
            found.kind == "class folders" and classes and len(sub_folders(train_root / classes[0])) >= 2) else ""
        beside = loose_images([train_root]) if inside else []
        if beside:  # (an image beside a wrapper folder kept it from being looked through)
            inside += f" (the image beside it, {Path(beside[0]['path']).name}, kept it from being looked into)"
        raise DataError(f"{train_root}: need at least 2 class folders (e.g. {train_root}/cats/, {train_root}/dogs/), found "
                        f"{have}.{inside}{'.' if inside else ''}")
    for role in ("val", "test"):
        if role in found.splits:
            require_known_classes(found.splits[role], classes, train_root, exact=role == "val")
    skipped: list[dict] = loose_images([found.root, *found.splits.values()])
    reader = TreeReader([root / c for root in found.splits.values() for c in classes], skipped)
    samples = {role: [Sample(p, label) for label, c in enumerate(classes) if (root / c).is_dir() for p in reader.images(root / c)]
               for role, root in found.splits.items()}
    require_every_class(samples["train"], classes, train_root, skipped)
    leakage = drop_duplicates(samples, classes, skipped, memo)
    train, val = samples["train"], samples.get("val")
    if val is None:
        train, val = stratified_split(train, len(classes), val_split, seed)
        if not val:
            raise DataError(f"{data}: too few images to hold any out for validation; add images or a {data}/val folder.")
    split = DatasetSplit(classes, train, val, found.kind, skipped, test=samples.get("test", []), leakage=leakage,
                         notes=[*found.notes, *look_alike_classes(classes), *hidden_class_folders(train_root),
                                *numbers_in_text_order(classes)])
    split.read_as = describe_reading(data, found, split, val_split, seed)
    return split


def numbers_in_text_order(classes: list[str]) -> list[str]:
    """A note where the classes are numbers that sort otherwise as text (0, 1, 10, 2): their index
    in the model is their place as text, as torchvision's ImageFolder orders them; a script that
    takes class 2 for index 2 would be wrong."""
    if not all(c.isdigit() for c in classes) or sorted(classes, key=int) == classes:
        return []
    shown = ", ".join(classes[:6]) + (", ..." if len(classes) > 6 else "")
    return [f"the classes are numbers, ordered as text ({shown}), as torchvision's ImageFolder orders them: a class's "
            f"index is its place in that order, not its number (predict's output names the class)"]


def hidden_class_folders(root: Path) -> list[str]:
    """Notes on folders beside the classes whose names start with '.', holding images: hidden, so
    not read (as macOS and git keep their own there), which their owner may not know."""
    hidden = [p for p in root.iterdir() if p.name.startswith(".") and p.is_dir() and _holds_images_if_readable(p)]
    return [f"{p.name}/ holds images but is hidden (its name starts with '.'): not read as a class; rename it to "
            f"train on it" for p in sorted(hidden)]


def look_alike_pairs(names: list[str], others: list[str], advice: str) -> str:
    """'; classes 'café' and 'café' differ only in ...: ADVICE' for each name of `others` that prints
    like one of `names` (a message's tail), '' for none."""
    return "".join(f"; {note}" for a in names for b in others for note in look_alike_classes([a, b], advice))


def _holds_images_if_readable(folder: Path) -> bool:
    try:
        return holds_images(folder)
    except OSError:  # (another user's .Trash-1000: not ours to read, nor to stop on)
        return False


def look_alike_classes(classes: list[str], advice: str = "they are {n} classes; give them one name if they are one") -> list[str]:
    """A note for each group of class names that differ only in case, in Unicode form ('Dog' and
    'dog'; 'café' typed on Linux and on a Mac, which stores é as e and an accent) or in spaces
    ('cat ' with a trailing space, a no-break space): they print alike and are separate classes,
    which is seldom what was meant."""
    groups: dict[str, list[str]] = {}
    for c in classes:
        groups.setdefault(" ".join(unicodedata.normalize("NFC", c).casefold().split()), []).append(c)
    notes = []
    for alike in (g for g in groups.values() if len(g) > 1):
        composed = {unicodedata.normalize("NFC", c) for c in alike}
        spaced = {" ".join(c.split()) for c in composed}
        ways = [way for way, differs in (("case", len(spaced) > 1),
                                         ("spaces", len({c.casefold() for c in composed}) > len({c.casefold() for c in spaced})),
                                         ("how their letters are encoded", any(c not in composed for c in alike))) if differs]
        notes.append(f"classes {' and '.join(repr(c) for c in alike)} differ only in {' and '.join(ways)}: "
                     f"{advice.format(n=len(alike))}")
    return notes


LOOSE_REASON = "not in a class folder: not used (move it into its class's folder)"


def loose_images(folders: list[Path]) -> list[dict]:
    """Images lying in DATA or a split folder beside the class folders: no label says what they
    are, so they are listed as not used rather than passed over in silence."""
    unique = {os.path.realpath(f): f for f in folders}
    return [{"path": str(p), "reason": LOOSE_REASON} for folder in unique.values() for p in sorted(folder.iterdir())
            if not is_hidden(p.name) and p.is_file() and is_candidate_image(p)]


def require_known_classes(root: Path, classes: list[str], train_root: Path, exact: bool) -> None:
    """val and test may hold fewer classes than train (a class with no val image is noted, as an
    empty class folder was), but none the model cannot know; val's missing classes are named
    beside such a one (a typo: `fox` for `dog`)."""
    have = [p.name for p in sub_folders(root)]
    missing = sorted(set(classes) - set(have)) if exact else []
    extra = sorted(set(have) - set(classes))
    if extra:
        detail = "; ".join(x for x in (f"missing in {root.name}: {', '.join(map(visible, missing))}" if missing else "",
                                       f"not in train: {', '.join(map(visible, extra))}") if x)
        # (names that print alike: 'café' from a Mac and from Linux; 'Dog' and 'dog')
        alike = look_alike_pairs(missing or classes, extra, "give both folders one name")
        raise DataError(f"{root}: {root.name} class folders differ from {train_root} ({detail}{alike}). "
                        f"Make them hold the same class folders.")


def describe_reading(data: Path, found: Layout, split: DatasetSplit, val_split: float | None, seed: int) -> str:
    """One line that says how the folder was read, e.g. `train = Training (4 classes, 5,712
    images), test = Testing (1,311); val = 20% of train (seed 0)`."""
    def where(folder: Path) -> str:
        rel = os.path.relpath(folder, data)
        return f"the class folders of {data.name or data}" if rel == "." else rel

    train_total = len(split.train) + (0 if "val" in found.splits else len(split.val))
    parts = [f"train = {where(found.splits['train'])} ({len(split.classes)} classes, {train_total:,} images)"]
    if "val" in found.splits:
        parts.append(f"val = {where(found.splits['val'])} ({len(split.val):,})")
    if "test" in found.splits:
        parts.append(f"test = {where(found.splits['test'])} ({len(split.test):,})")
    line = ", ".join(parts)
    if "val" not in found.splits:
        line += f"; val = {held_out(val_split, len(split.val), train_total)} (seed {seed})"
    return line


def held_out(val_split: float | None, n_val: int, total: int) -> str:
    """How val was split off train, for the reading line: "20% of train", or the capped default's count."""
    if val_split is None and total * DEFAULT_VAL_FRACTION > VAL_CAP:
        return f"{n_val:,} of train ({DEFAULT_VAL_FRACTION:.0%} up to {VAL_CAP:,} images)"
    return f"{DEFAULT_VAL_FRACTION if val_split is None else val_split:.0%} of train"


def drop_duplicates(samples: dict[str, list[Sample]], classes: list[str], skipped: list[dict],
                    memo: DigestMemo | None = None, known: dict[Path, str] | None = None) -> list[dict]:
    """Files with identical bytes: within one split the first copy is kept (copies under two
    labels are all dropped: the label is in doubt); across splits they are kept, and returned
    as leakage pairs (a val or test image that is also a training image inflates its accuracy).
    `memo`: the hashes remembered from the last run on these files (digests.py); `known`: hashes
    just taken (file_digests)."""
    digests = file_digests([s.path for group in samples.values() for s in group], memo, known)
    first: dict[str, tuple[str, Sample]] = {}
    dropped: dict[Path, str] = {}
    leakage: list[dict] = []
    for role in ("train", "val", "test"):
        for s in samples.get(role, []):
            digest = digests[s.path]
            if is_unreadable(digest) or digest not in first:
                first.setdefault(digest, (role, s))
                continue
            role0, s0 = first[digest]
            if role0 != role:
                leakage.append({"path": str(s.path), "split": role, "same_as": str(s0.path), "same_as_split": role0})
            elif s0.label == s.label:
                dropped[s.path] = f"the same bytes as {s0.path}: used once"
            else:
                conflict = f"the same bytes as {s0.path} but labelled {classes[s.label]}, not {classes[s0.label]}: label in doubt, not used"
                dropped[s.path] = conflict
                dropped.setdefault(s0.path, f"the same bytes as {s.path} but labelled {classes[s0.label]}, not {classes[s.label]}: label in doubt, not used")
    # Empty files, known from their size: dropped before val is split off, where they would take
    # a class's val places and leave it none once their decoding failed (an empty JPEG of a camera
    # upload that never finished, say). Other unreadable files are found when decoded.
    dropped.update({s.path: EMPTY_REASON for group in samples.values() for s in group
                    if is_unreadable(digests[s.path]) and is_empty(s.path)})
    for role, group in samples.items():
        samples[role] = [replace(s, digest=digests[s.path]) for s in group if s.path not in dropped]
    skipped.extend({"path": str(p), "reason": reason} for p, reason in dropped.items())
    return leakage


EMPTY_REASON = "empty file (0 bytes)"


def is_empty(path: Path) -> bool:
    try:
        return os.stat(path).st_size == 0
    except OSError:
        return False  # (unreadable otherwise: its decoding says why)


def require_every_class(samples: list[Sample], classes: list[str], root: Path, skipped: list[dict] | None = None) -> None:
    """Every class folder has images; where one has none, the error says what its files are instead."""
    counts = count_per_class(samples, len(classes))
    empty = [classes[i] for i, n in enumerate(counts) if n == 0]
    if empty:
        folder = root / empty[0]
        raise DataError(f"{folder}: class folder has no images{files_not_read(skipped or [], folder)}. "
                        "Add images to it or remove the folder.")


def require_images_in_every_class(split: DatasetSplit) -> None:
    """After the bad files are dropped: every class still has training images, and val has some."""
    counts = count_per_class(split.train, len(split.classes))
    for name, n in zip(split.classes, counts):
        if n == 0:
            raise DataError(f"class '{name}' has no readable training images left after skipping bad files; add good images to it.")
    if not split.val:
        fix = {"split folders": "add good images to the val folder", "labels CSV": "add val rows of good images"}.get(
            split.layout, "add good images, or remove the bad ones (finetune check lists them)")
        raise DataError(f"no readable validation images left after skipping bad files; {fix}.")


def missing_val_note(split: DatasetSplit) -> str | None:
    """What to say of classes with no val image (a class of one image, or whose held-out images
    could not be read): val accuracy says nothing of them. None when every class has one."""
    counts = count_per_class(split.val, len(split.classes))
    unseen = [c for c, n in zip(split.classes, counts) if n == 0]
    if not unseen:
        return None
    one = len(unseen) == 1
    return (f"no val image of {', '.join(repr(c) for c in unseen)}: val accuracy says nothing of "
            f"{'that class' if one else 'those classes'}; add good images of {'it' if one else 'them'}")


def count_per_class(samples: list[Sample], num_classes: int) -> list[int]:
    return count_labels([s.label for s in samples], num_classes)


def count_labels(labels: list[int], num_classes: int) -> list[int]:
    counts = [0] * num_classes
    for label in labels:
        counts[label] += 1
    return counts


def imbalance_detail(classes: list[str], counts: list[int], listed: int = 6) -> str:
    """'cat 120, dog 30' for a few classes; for many, the largest and smallest two (48 names on one
    line said nothing). A name that does not print (a newline in it) is shown quoted."""
    named = [(shown_name(c), n) for c, n in zip(classes, counts)]
    if len(named) <= listed:
        return ", ".join(f"{c} {n:,}" for c, n in named)
    ranked = sorted(named, key=lambda cn: -cn[1])
    return (f"{len(named)} classes; largest {', '.join(f'{c} {n:,}' for c, n in ranked[:2])}; "
            f"smallest {', '.join(f'{c} {n:,}' for c, n in ranked[-2:])}")


def shown_name(name: str) -> str:
    return name if name.isprintable() else repr(name)


def visible(name: str) -> str:
    """A name as printed in a message, quoted where spaces at its ends or odd characters would not show."""
    return repr(name) if name != name.strip() else shown_name(name)


def is_imbalanced(counts: list[int]) -> bool:
    return min(counts) > 0 and max(counts) / min(counts) >= IMBALANCE_RATIO


def val_count(members: int, total: int, val_fraction: float | None) -> int:
    """How many of a class's `members` (of `total` images) go to val: `val_fraction` of them; by
    default (None) DEFAULT_VAL_FRACTION, but at most the class's share of VAL_CAP images (never
    under MIN_CAPPED_VAL of a class): val accuracy on 2,500 images is known to a few tenths of a
    point, and every image past that costs a backbone pass without telling more (issue 16)."""
    if val_fraction is not None:
        return round(members * val_fraction)
    return min(round(members * DEFAULT_VAL_FRACTION), max(MIN_CAPPED_VAL, round(VAL_CAP * members / max(1, total))))


def stratified_split(samples: list[Sample], num_classes: int, val_fraction: float | None, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Hold out `val_fraction` of each class (None: val_count's default), the same files for the
    same seed on every machine."""
    rng = random.Random(seed)
    train, val = [], []
    for label in range(num_classes):
        members = sorted((s for s in samples if s.label == label), key=lambda s: str(s.path))
        rng.shuffle(members)
        n_val = val_count(len(members), len(samples), val_fraction)
        if len(members) >= 2:
            n_val = min(max(n_val, 1), len(members) - 1)  # keep at least one image on each side
        else:
            n_val = 0
        val.extend(members[:n_val])
        train.extend(members[n_val:])
    return sorted(train, key=lambda s: str(s.path)), sorted(val, key=lambda s: str(s.path))


def limit_per_class(samples: list[Sample], limit: int | None, seed: int) -> list[Sample]:
    """At most `limit` samples of each class, a seeded random choice (quick trials)."""
    if limit is None:
        return samples
    rng = random.Random(seed)
    by_class: dict[int, list[Sample]] = {}
    for s in samples:
        by_class.setdefault(s.label, []).append(s)
    kept = [s for members in by_class.values() for s in (rng.sample(members, limit) if len(members) > limit else members)]
    return sorted(kept, key=lambda s: str(s.path))
