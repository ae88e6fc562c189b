"""Labels CSVs as downloaded datasets and spreadsheets write them: fastai's `is_valid` column and
`fname` header, quoted fields after ", ", spaces around header names, Excel's `sep=;` line,
images named by id in sub-folders (HAM10000), and images no row names."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from finetune.cli import app
from finetune.errors import DataError
from finetune.labels import AmbiguousName, FileFinder
from finetune.reading import scan_dataset

from conftest import make_image

runner = CliRunner()
COLOURS = {"red": (220, 40, 40), "green": (40, 200, 40)}


def read(data: Path, **kw):
    return scan_dataset(data, 0.2, 0, **kw)


def colour_images(folder: Path, n: int = 8, prefix: str = "img", ext: str = ".png", seed: int = 0) -> list[tuple[str, str]]:
    """n images, red and green in turn: (file name, label) each. (Another seed for other bytes:
    files with the same bytes are used once.)"""
    named = []
    for i in range(n):
        label = "red" if i % 2 else "green"
        make_image(folder / f"{prefix}_{i}{ext}", COLOURS[label], seed=seed + i)
        named.append((f"{prefix}_{i}{ext}", label))
    return named


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def used(split) -> list[str]:
    return sorted(s.path.name for s in split.train + split.val + split.test)


# 1. fastai's is_valid column

@pytest.mark.parametrize("column, true, false", [("is_valid", "True", "False"), ("Is_Valid", "TRUE", "FALSE"),
                                                 ("is_val", "1", "0"), ("is_valid", "yes", "no")])
def test_a_true_false_valid_column_is_the_split_column_by_itself(tmp_path, column, true, false):
    images = colour_images(tmp_path / "images")
    held = {name for i, (name, _) in enumerate(images) if i >= 6}  # (one of each label)
    lines = [f"name,label,{column}"] + [f"{name},{label},{true if name in held else false}" for name, label in images]
    split = read(tmp_path / "images", labels=write_lines(tmp_path / "labels.csv", lines))
    assert sorted(s.path.name for s in split.val) == sorted(held) and len(split.train) == 6
    assert split.read_as == f"labels.csv (columns name, label, {column}): train = 6 rows (2 classes), val = 2 rows"


def test_a_column_named_valid_alone_is_not_taken_for_the_split(tmp_path):
    images = colour_images(tmp_path / "images")  # (its yes/no may say an image is usable: its "yes" rows are not val)
    lines = ["name,label,valid"] + [f"{name},{label},yes" for name, label in images]
    split = read(tmp_path / "images", labels=write_lines(tmp_path / "labels.csv", lines))
    assert split.read_as.startswith("labels.csv (columns name, label): train = 8 rows (2 classes); val = ")


def test_a_true_false_column_named_with_label_columns_is_read_as_fastai_means_it(tmp_path):
    images = colour_images(tmp_path / "images")
    lines = ["fname,cls,chosen,is_test"] + [f"{name},{label},{i >= 6},{i < 2}" for i, (name, label) in enumerate(images)]
    labels = write_lines(tmp_path / "labels.csv", lines)
    split = read(tmp_path / "images", labels=labels, label_columns="fname,cls,chosen")
    assert sorted(s.path.name for s in split.val) == ["img_6.png", "img_7.png"] and len(split.train) == 6
    split = read(tmp_path / "images", labels=labels, label_columns="fname,cls,is_test")  # (true: what the name says)
    assert sorted(s.path.name for s in split.test) == ["img_0.png", "img_1.png"] and len(split.train) + len(split.val) == 6
    shown = runner.invoke(app, ["check", str(tmp_path / "images"), "--labels", str(labels), "--label-columns",
                                "name,label,is_valid", "--json", "--workers", "0"])
    assert "no column 'name'" in shown.output  # (the names given must be the file's)
    shown = runner.invoke(app, ["check", str(tmp_path / "images"), "--labels", str(labels), "--label-columns",
                                "fname,cls,chosen", "--json", "--workers", "0"])
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.stdout)["counts"]["val"] == {"green": 1, "red": 1}


def test_a_split_column_with_other_words_still_says_which_values_it_takes(tmp_path):
    images = colour_images(tmp_path / "images")
    lines = ["name,label,is_valid"] + [f"{name},{label},maybe" for name, label in images]
    with pytest.raises(DataError, match=r"split 'maybe' in labels.csv line 2 is not train, val or test .*True/False"):
        read(tmp_path / "images", labels=write_lines(tmp_path / "labels.csv", lines))


# 2. path column spellings

@pytest.mark.parametrize("header", ["fname", "img_path", "Image Path", "file-name"])
def test_the_usual_spellings_of_a_path_column_are_found(tmp_path, header):
    images = colour_images(tmp_path / "images")
    lines = [f"id,{header},label"] + [f"{i},{name},{label}" for i, (name, label) in enumerate(images)]
    split = read(tmp_path / "images", labels=write_lines(tmp_path / "labels.csv", lines))
    assert used(split) == sorted(name for name, _ in images) and split.classes == ["green", "red"]
    assert f"(columns {header}, label)" in split.read_as


# 3. quotes after ", "

def test_quoted_fields_after_a_comma_and_a_space_lose_their_quotes(tmp_path):
    images = colour_images(tmp_path / "data" / "images")
    lines = ['"filename", "label"'] + [f'"images/{name}", "{label}"' for name, label in images]
    split = read(tmp_path / "data", labels=write_lines(tmp_path / "labels.csv", lines))
    assert split.classes == ["green", "red"] and used(split) == sorted(name for name, _ in images) and split.skipped == []


# 4. spaces around header names

def test_label_columns_find_header_names_written_with_spaces_around(tmp_path):
    images = colour_images(tmp_path / "images")
    labels = write_lines(tmp_path / "labels.csv", ["Image Path, Label "] + [f"{name},{label}" for name, label in images])
    split = read(tmp_path / "images", labels=labels, label_columns="Image Path,Label")
    assert split.classes == ["green", "red"] and len(used(split)) == 8
    assert split.read_as.startswith("labels.csv (columns Image Path, Label): ")
    assert read(tmp_path / "images", labels=labels, label_columns="image path,label").classes == ["green", "red"]
    shown = runner.invoke(app, ["check", str(tmp_path / "images"), "--labels", str(labels), "--label-columns",
                                "Image Path,Label", "--json", "--workers", "0"])
    assert shown.exit_code == 0, shown.output


# 5. Excel's sep= line

@pytest.mark.parametrize("declaration, delimiter", [("sep=;", ";"), ('"sep=,"', ","), ("sep=\t", "\t")])
def test_an_excel_sep_line_declares_the_delimiter_and_is_not_the_header(tmp_path, declaration, delimiter):
    images = colour_images(tmp_path / "images")
    lines = [declaration, f"filename{delimiter}label"] + [f"{name}{delimiter}{label}" for name, label in images]
    lines.append(f"missing.png{delimiter}red")
    split = read(tmp_path / "images", labels=write_lines(tmp_path / "labels.csv", lines))
    assert split.classes == ["green", "red"] and len(used(split)) == 8
    assert split.skipped == [{"path": "missing.png", "reason": "listed in labels.csv line 11 but no such image file in "
                                                               f"{tmp_path / 'images'}"}]  # (the file's line number)


# 6. images named by id, in sub-folders (HAM10000)

def test_images_named_by_id_are_found_in_the_sub_folders_they_were_shipped_in(tmp_path):
    data = tmp_path / "HAM"
    images = colour_images(data / "HAM10000_images_part_1", 4, prefix="ISIC_000", ext=".jpg")
    images += colour_images(data / "HAM10000_images_part_2", 4, prefix="ISIC_001", ext=".jpg", seed=100)
    lines = ["lesion_id,image_id,dx"] + [f"HAM_{i},{name.removesuffix('.jpg')},{label}" for i, (name, label) in enumerate(images)]
    lines[-1] = lines[-1].replace("ISIC_001_3", "ISIC_001_3.jpg")  # (named with its extension too)
    split = read(data, labels=write_lines(data / "HAM10000_metadata.csv", lines))
    assert used(split) == sorted(name for name, _ in images) and split.skipped == [] and split.notes == []
    assert {s.path.parent.name for s in split.train + split.val} == {"HAM10000_images_part_1", "HAM10000_images_part_2"}


def test_a_name_found_in_several_sub_folders_is_skipped_saying_where(tmp_path):
    data = tmp_path / "data"
    images = colour_images(data / "a", 6)
    make_image(data / "b" / "img_0.png", COLOURS["red"], seed=50)  # (another img_0, elsewhere)
    lines = ["image_id,label"] + [f"{name.removesuffix('.png')},{label}" for name, label in images]
    split = read(data, labels=write_lines(tmp_path / "labels.csv", lines))
    assert used(split) == [f"img_{i}.png" for i in range(1, 6)]
    assert split.skipped == [{"path": "img_0", "reason": "labels.csv line 2 names a file found at 2 places in data/ "
                                                         "(a/img_0.png, b/img_0.png): not used; write its folder in the CSV"}]


def test_a_bare_name_is_looked_for_in_sub_folders_only_where_data_and_the_csv_folder_lack_it(tmp_path):
    data = tmp_path / "data"
    make_image(data / "sub" / "x.jpg", COLOURS["red"])
    make_image(data / "sub" / "y.jpg", COLOURS["red"])
    make_image(data / "sub" / "y.jp2", COLOURS["red"])  # (a JPEG 2000 original beside its copy)
    make_image(data / "z.png", COLOURS["red"])
    make_image(data / "other" / "z.png", COLOURS["green"])
    make_image(tmp_path / "beside.png", COLOURS["green"])
    make_image(data / "sub" / "beside.png", COLOURS["green"])
    find = FileFinder(data, tmp_path)
    assert find("x") == find("x.JPG") == find("./x.jpg") == data / "sub" / "x.jpg"
    assert find("y") == data / "sub" / "y.jpg" and find("y.jp2") == data / "sub" / "y.jp2"
    assert find("z.png") == data / "z.png" and find("beside.png") == tmp_path / "beside.png"
    assert find("z") == data / "z.png" and find("elsewhere/x.jpg") is None and find("w") is None
    make_image(data / "a" / "q.png", COLOURS["red"])
    make_image(data / "b" / "q.png", COLOURS["red"])
    with pytest.raises(AmbiguousName):
        FileFinder(data, tmp_path)("q")


def test_many_rows_of_bare_names_are_looked_up_in_one_index(tmp_path, monkeypatch):
    data = tmp_path / "data"
    for part in ("part_1", "part_2"):
        (data / part).mkdir(parents=True)
        for i in range(50):
            make_image(data / part / f"{part}_{i}.png", COLOURS["red"], size=(2, 2))
    find = FileFinder(data, tmp_path)
    listed = []  # (the index is made once, from the listing made already: not a scan per row)
    real_images = find.images
    monkeypatch.setattr(find, "images", type("Spy", (list,), {"__iter__": lambda self: (listed.append(1), iter(real_images))[1]})(real_images))
    found = [find(f"part_{1 + (i // 50) % 2}_{i % 50}") for i in range(1_000)]
    assert all(found) and len({p for p in found}) == 100 and len(listed) == 1


# 7. images no row names

def test_images_that_no_row_names_are_counted_in_a_note(tmp_path):
    images = colour_images(tmp_path / "images", 8)
    colour_images(tmp_path / "images" / "extra", 3, prefix="unlabelled", seed=100)
    lines = ["filename,label"] + [f"{name},{label}" for name, label in images[:6]]
    lines += [f"{images[6][0]},", "img_7,red", "img_7.png,green"]  # (named without a label; labels in doubt: named all the same)
    labels = write_lines(tmp_path / "labels.csv", lines)
    split = read(tmp_path / "images", labels=labels)
    assert split.notes == ["3 images in images/ are in no row of labels.csv (not used; e.g. extra/unlabelled_0.png)"]
    shown = runner.invoke(app, ["check", str(tmp_path / "images"), "--labels", str(labels), "--json", "--workers", "0",
                                "--arch", "efficientnet_lite0"])  # (its weights are here: no note of missing ones)
    assert json.loads(shown.stdout)["notes"] == split.notes
    lines = ["filename,label"] + [f"{name},{label}" for name, label in images]
    lines += ["extra/unlabelled_0.png,red", "extra/unlabelled_1.png,green"]
    assert "1 image in images/ is in no row" in read(tmp_path / "images", labels=write_lines(labels, lines)).notes[0]
