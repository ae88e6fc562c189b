"""Labels from a CSV file: many downloaded datasets are one image folder plus `labels.csv`
(`path,label`, `filename,class`, `image_id,dx`, sometimes with a `split` column).

Paths are looked up in DATA (as written, or without their extension, as `image_id` columns
often are), beside the CSV, or, for a bare file name, in whichever sub-folder of DATA holds the
one file of that name (HAM10000's images lie in two part folders). Rows that name no file, rows
without a label, and files listed twice are skipped with the reason; a file listed under two
labels is not used at all (its label is in doubt). Images in DATA that no row names are counted
in a note.
"""

from __future__ import annotations

import csv
import functools
import io
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from .data import DatasetSplit, Sample
from .digests import DigestMemo
from .errors import DataError, UsageError
from .images import JPEG2000_EXTENSIONS, is_candidate_image
from .layout import split_role
from .scan import drop_duplicates, held_out, list_images, look_alike_classes, stratified_split

# (in order of preference: a header with `id` and `fname` means the file by `fname`)
PATH_COLUMNS = ("path", "filepath", "file_path", "filename", "file_name", "fname", "file", "image", "image_path", "img_path",
                "image_name", "img", "image_id", "id", "name")
LABEL_COLUMNS = ("label", "class", "class_name", "category", "target", "labels", "dx", "diagnosis", "species")
# (fastai's `is_valid` and its kin hold True/False: true marks a validation row)
SPLIT_COLUMNS = ("split", "set", "subset", "partition", "is_valid", "is_val")  # (not `valid`: it may mean "usable")
TRUE_WORDS = frozenset({"true", "1", "yes"})
FALSE_WORDS = frozenset({"false", "0", "no"})
# Excel writes `sep=;` as a CSV's first line to say which delimiter it used
DELIMITER_LINE = re.compile(r'"?sep=([^\r\n"])"?[ \t]*(\r?\n|$)', re.IGNORECASE)


@dataclass
class LabelledRows:
    rows: dict[str, list[tuple[Path, str]]]  # split role -> (image file, label); rows without a split are "train"
    columns: tuple[str, str, str | None]  # the path, label and split columns used
    notes: list[str] = field(default_factory=list)  # what was seen and not used (images no row names)


def read_labels_csv(data: Path, csv_path: Path, columns: str | None, skipped: list[dict]) -> LabelledRows:
    if not csv_path.is_file():
        raise DataError(f"{csv_path}: no such labels file. Pass a CSV with a path and a label column to --labels.")
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            text = f.read()
        declared, text = declared_delimiter(text)
        # (skipinitialspace: in `"a.png", "red"` the space is no part of the value, and the quotes are not either)
        reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=declared or delimiter_of(text.split("\n", 1)[0]),
                                skipinitialspace=True)
        header = reader.fieldnames or []
        path_col, label_col, split_col = pick_columns(header, columns, csv_path)
        skipped_lines = 1 if declared else 0  # (the `sep=` line: line numbers are the file's, as an editor shows them)
        lines = [(reader.line_num + skipped_lines, row) for row in reader]
    except (UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{csv_path}: not a readable CSV file ({e}). Save it as UTF-8 CSV with a header row.") from None
    find = FileFinder(data, csv_path.parent)
    true_role = split_for_true(split_col) if split_col else None
    named: set[str] = set()  # (absolute paths of the files rows name: the others in DATA are noted)
    first_line: dict[Path, tuple[int, str, str]] = {}
    doubtful: set[Path] = set()
    rows: dict[str, list[tuple[Path, str]]] = {}
    for n, row in lines:
        where = f"{csv_path.name} line {n}"
        value, label = (row.get(path_col) or "").strip(), (row.get(label_col) or "").strip()
        role = row_split(row.get(split_col) if split_col else None, where, csv_path, true_role)
        try:
            path = find(value) if value else None
        except AmbiguousName as e:
            named.update(os.path.abspath(p) for p in e.paths)
            skipped.append({"path": value, "reason": ambiguity_reason(e.paths, where, data)})
            continue
        if path is None:
            skipped.append({"path": value or where, "reason": f"listed in {where} but no such image file in {data}"})
            continue
        named.add(os.path.abspath(path))
        if not label:
            skipped.append({"path": str(path), "reason": f"a row without a label in {where}: that row not used"})
            continue
        if path in first_line:
            line0, label0, _ = first_line[path]
            if label0 == label:
                skipped.append({"path": str(path), "reason": f"listed again in {where} (first on line {line0}): used once"})
            else:
                doubtful.add(path)
                skipped.append({"path": str(path), "reason": f"labelled {label0} on line {line0} and {label} in {where}: label in doubt, not used"})
            continue
        first_line[path] = (n, label, role)
    for path, (_, label, role) in first_line.items():
        if path not in doubtful:
            rows.setdefault(role, []).append((path, label))
    unlisted = [p for p in find.images if os.path.abspath(p) not in named]
    return LabelledRows(rows, (path_col, label_col, split_col), [unlisted_note(unlisted, data, csv_path)] if unlisted else [])


def declared_delimiter(text: str) -> tuple[str | None, str]:
    """The delimiter an Excel `sep=;` first line declares, and the text after that line; (None,
    text) where there is no such line."""
    declaration = DELIMITER_LINE.match(text)
    return (declaration.group(1), text[declaration.end():]) if declaration else (None, text)


def unlisted_note(unlisted: list[Path], data: Path, csv_path: Path) -> str:
    """A CSV that covers only part of DATA is seldom meant to: say how many images no row names."""
    n, example = len(unlisted), Path(os.path.relpath(unlisted[0], data)).as_posix()
    return (f"{n:,} image{'s' if n != 1 else ''} in {data.name}/ {'are' if n != 1 else 'is'} in no row of "
            f"{csv_path.name} (not used; e.g. {example})")


def ambiguity_reason(paths: list[Path], where: str, data: Path) -> str:
    if len({p.parent for p in paths}) == 1:  # (a.jpg and a.png side by side, named `a`)
        return f"{where} names {' and '.join(p.name for p in paths)} alike: write the extension in the CSV"
    places = ", ".join(Path(os.path.relpath(p, data)).as_posix() for p in paths[:3])
    return (f"{where} names a file found at {len(paths)} places in {data.name}/ ({places}{', ...' if len(paths) > 3 else ''}): "
            f"not used; write its folder in the CSV")


def delimiter_of(header: str) -> str:
    """The header line's separator: commas, unless they make one column and semicolons (which a
    spreadsheet writes where the comma is the decimal mark) or tabs make more. Read as CSV, so a
    quoted column name holding a semicolon ("species; common name") is no separator."""
    for delimiter in (",", ";", "\t"):
        if len(next(csv.reader([header], delimiter=delimiter), [])) > 1:
            return delimiter
    return ","


def pick_columns(header: list[str], columns: str | None, csv_path: Path) -> tuple[str, str, str | None]:
    """The path, label and (optional) split columns: as named, or found among the usual names."""
    if columns:
        named = [c.strip() for c in columns.split(",")]
        if len(named) not in (2, 3) or not all(named):
            raise UsageError(f"--label-columns '{columns}': give PATH,LABEL or PATH,LABEL,SPLIT column names.")
        found = [header_column(c, header) for c in named]
        missing = [c for c, h in zip(named, found) if h is None]
        if missing:
            raise DataError(f"{csv_path}: no column {missing[0]!r} (its columns: {', '.join(header)}).")
        return found[0], found[1], found[2] if len(found) == 3 else None
    by_name = {usual_spelling(h): h for h in header}
    find = lambda names: next((by_name[n] for n in names if n in by_name), None)  # noqa: E731
    path_col, label_col = find(PATH_COLUMNS), find(LABEL_COLUMNS)
    if path_col is None or label_col is None:
        what = "the image paths" if path_col is None else "the labels"
        raise DataError(f"{csv_path}: cannot tell which column holds {what} (its columns: {', '.join(header) or 'none'}); "
                        f"name them with --label-columns PATH,LABEL[,SPLIT].")
    return path_col, label_col, find(SPLIT_COLUMNS)


def header_column(name: str, header: list[str]) -> str | None:
    """The header's column a --label-columns name means: as written, else ignoring the spaces
    around header names (`Label ` in `Image Path, Label `: no spelling on the command line has
    them), else in any letter case; None where no column, or more than one, matches."""
    if name in header:
        return name
    for key in (str.strip, lambda h: h.strip().casefold()):
        matches = [h for h in header if key(h) == key(name)]
        if len(matches) == 1:
            return matches[0]
    return None


def usual_spelling(column: str) -> str:
    """A header name as the usual names are spelled: `Image Path` and `image-path` are image_path."""
    return re.sub(r"[\s\-]+", "_", column.strip().lower())


def split_for_true(column: str) -> str | None:
    """The split a true value in a True/False split column puts its row in: val, as fastai's
    `is_valid` means (or test, for a column named like `is_test`); None for a column named
    for training (`is_train`: what its false rows are is anyone's guess)."""
    role = split_role(column.strip())
    return "val" if role is None else None if role == "train" else role


def row_split(value: str | None, where: str, csv_path: Path, true_role: str | None = None) -> str:
    if value is None or not value.strip():
        return "train"
    role = split_role(value.strip()) or boolean_split(value.strip(), true_role)
    if role is None:
        raise DataError(f"{csv_path}: split '{value.strip()}' in {where} is not train, val or test (nor a name like them: "
                        f"training, valid, testing, ...; nor True/False in a column like is_valid). Fix the CSV or name "
                        f"another split column with --label-columns.")
    return role


def boolean_split(value: str, true_role: str | None) -> str | None:
    """True/False in a split column (fastai's `is_valid`): true puts the row in `true_role`, false in train."""
    if true_role is None:
        return None
    word = value.lower()
    return true_role if word in TRUE_WORDS else "train" if word in FALSE_WORDS else None


class AmbiguousName(Exception):
    """A name that fits several files: a.jpg and a.png named `a`, or a file name found in two sub-folders."""

    def __init__(self, paths: list[Path]):
        super().__init__(paths)
        self.paths = paths


class FileFinder:
    """Finds the file a CSV row names: relative to DATA, without its extension, beside the CSV,
    or, for a bare file name, wherever under DATA the one file of that name is."""

    def __init__(self, data: Path, csv_folder: Path):
        self.data, self.csv_folder = data, csv_folder
        self.images = images = list_images(data) if data.is_dir() else []
        self.by_rel = {Path(os.path.relpath(p, data)).as_posix(): p for p in images}
        self.by_stem: dict[str, Path] = {}
        self.others: dict[str, list[Path]] = {}  # a stem's other files (not JPEG 2000 originals): a name without extension is ambiguous
        # (where a JPEG 2000 original sits beside its JPEG copy, a name without its extension means the copy)
        for rel, p in sorted(self.by_rel.items(), key=lambda item: (item[1].suffix.lower() in JPEG2000_EXTENSIONS, item[0])):
            stem = rel.rsplit(".", 1)[0]
            if stem in self.by_stem and p.suffix.lower() not in JPEG2000_EXTENSIONS:
                self.others.setdefault(stem, []).append(p)
            self.by_stem.setdefault(stem, p)

    def __call__(self, value: str) -> Path | None:
        """The file `value` names; None where there is none. AmbiguousName where, without its
        extension, it names two files (a.jpg and a.png): which one is meant cannot be told."""
        rel = Path(value).as_posix().removeprefix("./")
        stem = rel.rsplit(".", 1)[0] if is_candidate_image(Path(rel)) else rel  # img.jpg may be stored as img.JPG
        if rel in self.by_rel:
            return self.by_rel[rel]
        if rel in self.by_stem:  # (named without its extension)
            if rel in self.others:
                raise AmbiguousName([self.by_stem[rel], *self.others[rel]])
            return self.by_stem[rel]
        if stem in self.by_stem:  # (its extension in another case, or another spelling: .jpg for .jpeg)
            files = [self.by_stem[stem], *self.others.get(stem, [])]
            alike = [p for p in files if p.suffix.lower() == Path(rel).suffix.lower()]
            if not alike and len(files) > 1:  # (f.gif named, f.jpg and f.png there)
                raise AmbiguousName(files)
            return alike[0] if alike else files[0]
        # Beside the CSV (an absolute path: as written), never where the command happens to run.
        if (self.csv_folder / value).is_file():
            return self.csv_folder / value
        if "\\" in value:  # a CSV written on Windows (imgs\a.png); a file may hold a backslash in its name here
            return self(value.replace("\\", "/"))
        if "/" not in rel:  # (a folder in the path says where the file is: not looked for elsewhere)
            return self.anywhere(rel)
        return None

    def anywhere(self, name: str) -> Path | None:
        """The one image under DATA, in any sub-folder, whose file name is `name` (with or without
        its extension); None where there is none, AmbiguousName where there are several."""
        by_name, by_stem = self.names
        if name in by_name:
            files = by_name[name]
        else:
            stem = name.rsplit(".", 1)[0] if is_candidate_image(Path(name)) else name
            files = by_stem.get(stem, [])
            alike = [p for p in files if p.suffix.lower() == Path(name).suffix.lower()]
            # (a JPEG 2000 original beside its JPEG copy: the name without its extension means the copy)
            files = alike or [p for p in files if p.suffix.lower() not in JPEG2000_EXTENSIONS] or files
        if len(files) > 1:
            raise AmbiguousName(files)
        return files[0] if files else None

    @functools.cached_property
    def names(self) -> tuple[dict[str, list[Path]], dict[str, list[Path]]]:
        """Every image under DATA by its file name, and by its stem: made once, from the listing
        already made, on the first row that needs it (50,000 rows: one pass)."""
        by_name: dict[str, list[Path]] = {}
        by_stem: dict[str, list[Path]] = {}
        for p in self.images:
            by_name.setdefault(p.name, []).append(p)
            by_stem.setdefault(p.name.rsplit(".", 1)[0], []).append(p)
        return by_name, by_stem


def scan_labelled(data: Path, csv_path: Path, columns: str | None, val_split: float | None, seed: int,
                  memo: DigestMemo | None = None) -> DatasetSplit:
    """The labelled images a CSV names, split as its split column says (val split off train when it has none)."""
    if not data.is_dir():
        raise DataError(f"{data}: no such folder. With --labels, DATA is the folder the CSV's paths are in.")
    skipped: list[dict] = []
    found = read_labels_csv(data, csv_path, columns, skipped)
    train_rows = found.rows.get("train", [])
    classes = sorted({label for _, label in train_rows})
    if len(classes) < 2:
        example = f", e.g. {skipped[0]['path']}: {skipped[0]['reason']}" if skipped else ""
        raise DataError(f"{csv_path}: need training rows of at least 2 labels with their image files found, "
                        f"found {len(classes)} ({len(skipped)} rows skipped{example}). Fix the paths or --label-columns.")
    for role in ("val", "test"):
        unknown = sorted({label for _, label in found.rows.get(role, [])} - set(classes))
        if unknown:
            raise DataError(f"{csv_path}: {role} rows labelled {', '.join(unknown[:3])}, which no training row has. "
                            f"Give every label training rows, or drop those rows.")
    index = {c: i for i, c in enumerate(classes)}
    samples = {role: sorted((Sample(p, index[label]) for p, label in rows), key=lambda s: str(s.path))
               for role, rows in found.rows.items()}
    samples.setdefault("train", [])
    leakage = drop_duplicates(samples, classes, skipped, memo)
    train, val = samples["train"], samples.get("val")
    if val is None:
        train, val = stratified_split(train, len(classes), val_split, seed)
        if not val:
            raise DataError(f"{csv_path}: too few images to hold any out for validation; add rows.")
    split = DatasetSplit(classes, train, val, "labels CSV", skipped, test=samples.get("test", []), leakage=leakage,
                         notes=[*found.notes, *look_alike_classes(classes)])
    parts = [f"train = {len(train) + (0 if 'val' in samples else len(val)):,} rows ({len(classes)} classes)"]
    parts += [f"{role} = {len(samples[role]):,} rows" for role in ("val", "test") if role in samples]
    cols = ", ".join(c.strip() for c in found.columns if c)
    split.read_as = f"{csv_path.name} (columns {cols}): " + ", ".join(parts) + (
        "" if "val" in samples else f"; val = {held_out(val_split, len(val), len(train) + len(val))} (seed {seed})")
    return split
