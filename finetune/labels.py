"""Labels from a CSV file: many downloaded datasets are one image folder plus `labels.csv`
(`path,label`, `filename,class`, `image_id,dx`, sometimes with a `split` column).

Paths are looked up in DATA (as written, or without their extension, as `image_id` columns
often are) or, failing that, beside the CSV. Rows that name no file, rows without a label,
and files listed twice are skipped with the reason; a file listed under two labels is not
used at all (its label is in doubt).
"""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass
from pathlib import Path

from .data import DatasetSplit, Sample
from .digests import DigestMemo
from .errors import DataError, UsageError
from .images import JPEG2000_EXTENSIONS, is_candidate_image
from .layout import split_role
from .scan import drop_duplicates, held_out, list_images, look_alike_classes, stratified_split

PATH_COLUMNS = ("path", "filepath", "file_path", "filename", "file_name", "file", "image", "image_path", "image_name",
                "img", "image_id", "id", "name")
LABEL_COLUMNS = ("label", "class", "class_name", "category", "target", "labels", "dx", "diagnosis", "species")
SPLIT_COLUMNS = ("split", "set", "subset", "partition")


@dataclass
class LabelledRows:
    rows: dict[str, list[tuple[Path, str]]]  # split role -> (image file, label); rows without a split are "train"
    columns: tuple[str, str, str | None]  # the path, label and split columns used


def read_labels_csv(data: Path, csv_path: Path, columns: str | None, skipped: list[dict]) -> LabelledRows:
    if not csv_path.is_file():
        raise DataError(f"{csv_path}: no such labels file. Pass a CSV with a path and a label column to --labels.")
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            text = f.read()
        reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter_of(text.split("\n", 1)[0]))
        header = reader.fieldnames or []
        path_col, label_col, split_col = pick_columns(header, columns, csv_path)
        lines = [(n, row) for n, row in enumerate(reader, start=2)]
    except (UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{csv_path}: not a readable CSV file ({e}). Save it as UTF-8 CSV with a header row.") from None
    find = FileFinder(data, csv_path.parent)
    first_line: dict[Path, tuple[int, str, str]] = {}
    doubtful: set[Path] = set()
    rows: dict[str, list[tuple[Path, str]]] = {}
    for n, row in lines:
        where = f"{csv_path.name} line {n}"
        value, label = (row.get(path_col) or "").strip(), (row.get(label_col) or "").strip()
        role = row_split(row.get(split_col) if split_col else None, where, csv_path)
        try:
            path = find(value) if value else None
        except AmbiguousName as e:
            names = " and ".join(p.name for p in e.paths)
            skipped.append({"path": value, "reason": f"{where} names {names} alike: write the extension in the CSV"})
            continue
        if path is None:
            skipped.append({"path": value or where, "reason": f"listed in {where} but no such image file in {data}"})
            continue
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
    return LabelledRows(rows, (path_col, label_col, split_col))


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
        missing = [c for c in named if c not in header]
        if missing:
            raise DataError(f"{csv_path}: no column {missing[0]!r} (its columns: {', '.join(header)}).")
        return named[0], named[1], named[2] if len(named) == 3 else None
    by_name = {h.strip().lower(): h for h in header}
    find = lambda names: next((by_name[n] for n in names if n in by_name), None)  # noqa: E731
    path_col, label_col = find(PATH_COLUMNS), find(LABEL_COLUMNS)
    if path_col is None or label_col is None:
        what = "the image paths" if path_col is None else "the labels"
        raise DataError(f"{csv_path}: cannot tell which column holds {what} (its columns: {', '.join(header) or 'none'}); "
                        f"name them with --label-columns PATH,LABEL[,SPLIT].")
    return path_col, label_col, find(SPLIT_COLUMNS)


def row_split(value: str | None, where: str, csv_path: Path) -> str:
    if value is None or not value.strip():
        return "train"
    role = split_role(value.strip())
    if role is None:
        raise DataError(f"{csv_path}: split '{value.strip()}' in {where} is not train, val or test (nor a name like them: "
                        f"training, valid, testing, ...). Fix the CSV or name another split column with --label-columns.")
    return role


class AmbiguousName(Exception):
    def __init__(self, paths: list[Path]):
        super().__init__(paths)
        self.paths = paths


class FileFinder:
    """Finds the file a CSV row names: relative to DATA, without its extension, or beside the CSV."""

    def __init__(self, data: Path, csv_folder: Path):
        self.data, self.csv_folder = data, csv_folder
        images = list_images(data) if data.is_dir() else []
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
        return None


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
                         notes=look_alike_classes(classes))
    parts = [f"train = {len(train) + (0 if 'val' in samples else len(val)):,} rows ({len(classes)} classes)"]
    parts += [f"{role} = {len(samples[role]):,} rows" for role in ("val", "test") if role in samples]
    cols = ", ".join(c for c in found.columns if c)
    split.read_as = f"{csv_path.name} (columns {cols}): " + ", ".join(parts) + (
        "" if "val" in samples else f"; val = {held_out(val_split, len(val), len(train) + len(val))} (seed {seed})")
    return split
