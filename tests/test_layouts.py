"""Any folder a user brings: layouts by name and structure, a test split, symlinks,
identical files, labels from a CSV, and `finetune check`."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from finetune.cli import app
from finetune.errors import DataError, UsageError
from finetune.reading import scan_dataset

from conftest import FAST_TRAIN_ARGS, make_class_tree, make_image, tree_hashes

runner = CliRunner()
CLASSES = ("cat", "dog")


def splits(root: Path, train: str, held_out: dict[str, int], n_train: int = 5) -> Path:
    make_class_tree(root / train, n_train, classes=CLASSES)
    for i, (name, n) in enumerate(held_out.items()):
        make_class_tree(root / name, n, classes=CLASSES, seed=1000 * (i + 1))
    return root


def read(data: Path, **kw):
    return scan_dataset(data, 0.2, 0, **kw)


@pytest.mark.parametrize("train, held_out, expected", [
    ("Training", {"Testing": 2}, "train = Training (2 classes, 10 images), test = Testing (4); val = 20% of train (seed 0)"),
    ("train", {"test": 3}, "train = train (2 classes, 10 images), test = test (6); val = 20% of train (seed 0)"),
    ("seg_train", {"seg_test": 2}, "train = seg_train (2 classes, 10 images), test = seg_test (4); val = 20% of train (seed 0)"),
    ("TRAIN", {"Valid": 2, "TEST": 1}, "train = TRAIN (2 classes, 10 images), val = Valid (4), test = TEST (2)"),
    ("train-set", {"dev": 2}, "train = train-set (2 classes, 10 images), val = dev (4)"),
])
def test_split_folders_are_read_by_name_in_any_case(tmp_path, train, held_out, expected):
    split = read(splits(tmp_path / "data", train, held_out))
    assert split.classes == list(CLASSES) and split.layout == "split folders"
    assert split.read_as == expected
    if any(split_name.lower().endswith(("test", "testing")) for split_name in held_out):
        assert split.test and not {s.path for s in split.test} & {s.path for s in split.train + split.val}


def test_splits_inside_wrapper_folders_as_zips_extract(tmp_path):
    data = tmp_path / "download"
    splits(data / "archive" / "dataset", "train", {"test": 2})
    (data / "archive" / "README.txt").write_text("from the web")
    split = read(data)
    assert split.read_as.startswith("train = archive/dataset/train (2 classes, 10 images), test = archive/dataset/test (4)")
    assert split.notes == ["download: read inside archive/dataset/ (the only folder there)"]


def test_training_and_testing_are_never_two_classes(tmp_path):
    """The reported failure: DATA/Training/<class> + DATA/Testing/<class> read as 2 classes."""
    data = splits(tmp_path / "data", "Training", {"Testing": 2})
    result = runner.invoke(app, ["train", str(data), "--runs-dir", str(tmp_path / "runs"), "--json", *FAST_TRAIN_ARGS])
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["classes"] == ["cat", "dog"] and summary["num_test"] == 4
    assert summary["read_as"] == "train = Training (2 classes, 10 images), test = Testing (4); val = 20% of train (seed 0)"


def test_classes_named_like_splits_stop_with_a_way_out(tmp_path):
    data = tmp_path / "data"
    make_class_tree(data, 4, classes=("train", "test"))  # two real classes: locomotives and test strips
    with pytest.raises(DataError, match="pass --layout classes"):
        read(data)
    split = read(data, layout="classes")
    assert split.classes == ["test", "train"] and split.layout == "class folders" and not split.test


def test_a_word_of_a_split_name_inside_a_class_name_is_still_a_class(tmp_path):
    data = make_class_tree(tmp_path / "data", 3, classes=("beakers", "flasks", "test_tubes"))
    split = read(data)
    assert split.classes == ["beakers", "flasks", "test_tubes"] and split.layout == "class folders"


def test_structure_says_splits_when_names_do_not(tmp_path):
    data = splits(tmp_path / "data", "part_a", {"part_b": 2})
    with pytest.raises(DataError, match=r"each hold the same folders \(cat, dog\).*--layout train=part_a,test=part_b"):
        read(data)
    split = read(data, layout="train=part_a,test=part_b")
    assert split.classes == ["cat", "dog"] and len(split.test) == 4
    result = runner.invoke(app, ["train", str(data), "--runs-dir", str(tmp_path / "runs"), *FAST_TRAIN_ARGS])
    assert result.exit_code == 1 and "--layout" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_classes_holding_split_folders_are_refused_with_the_way_round_said(tmp_path):
    data = tmp_path / "data"
    for c in CLASSES:  # (it said: pass --layout train=cat,test=dog, or --layout classes: both train on the wrong thing)
        make_class_tree(data / c, 2, classes=("train", "test"))
    with pytest.raises(DataError, match=r"its folders cat, dog each hold split folders \(test, train\): the splits are "
                                        r"inside the classes.*move the images to data/train/<class>/"):
        read(data)


def test_a_test_folder_without_class_folders_is_noted_not_used(tmp_path):
    data = tmp_path / "data"
    make_class_tree(data / "train", 4, classes=CLASSES)
    make_image(data / "test" / "unlabelled_1.jpg", (9, 9, 9))
    split = read(data)
    assert not split.test and split.notes == ["test/ holds no class folders (images without labels?): not used"]


@pytest.mark.parametrize("train, val, test, expected", [  # (each was read as classes named trainset/testset, ...)
    ("trainset", None, "testset", "train = trainset (2 classes, 10 images); val = 20% of train (seed 0)"),
    ("train2017", "val2017", "test2017", "train = train2017 (2 classes, 10 images), val = val2017 (4)"),
    ("trainval", None, "test", "train = trainval (2 classes, 10 images); val = 20% of train (seed 0)"),  # (PASCAL VOC)
])
def test_split_folders_named_with_set_or_a_year_are_splits(tmp_path, train, val, test, expected):
    data = splits(tmp_path / "data", train, {val: 2} if val else {})
    for i in range(3):  # (a flat folder of unlabelled images, as Kaggle and COCO ship their test split)
        make_image(data / test / f"{i}.jpg", (9, 9, 9), seed=i)
    split = read(data)
    assert split.classes == list(CLASSES) and split.read_as == expected
    assert split.notes == [f"{test}/ holds no class folders (images without labels?): not used"]


def test_a_split_folder_wrapping_its_class_folders_is_looked_through(tmp_path):
    data = tmp_path / "data"  # (Kaggle's Intel scenes: seg_train/seg_train/<class>, seg_test/seg_test/<class>)
    splits(data, "seg_train/seg_train", {"seg_test/seg_test": 2})
    split = read(data)
    assert split.classes == list(CLASSES) and len(split.test) == 4
    assert split.notes == ["train: read inside seg_train/seg_train/ (the only folder in seg_train/)",
                           "test: read inside seg_test/seg_test/ (the only folder in seg_test/)"]
    other = tmp_path / "other"
    splits(other, "train/images", {"val/images": 2})
    assert read(other).read_as == "train = train/images (2 classes, 10 images), val = val/images (4)"
    single = tmp_path / "single"  # (a val/ holding one class folder is not a wrapper: its class stays a class)
    splits(single, "train", {})
    make_class_tree(single / "val", 2, classes=("cat",))
    assert [s.path.parent.name for s in read(single).val] == ["cat", "cat"]


def test_a_wrapper_that_was_not_looked_through_is_named_with_the_way_on(tmp_path):
    data = tmp_path / "download"
    make_class_tree(data / "dataset", 2, classes=CLASSES)
    make_image(data / "preview.jpg", (1, 2, 3))  # (it said only "found only 'dataset'")
    with pytest.raises(DataError, match=r"found only 'dataset'\. If the classes are inside .*download/dataset, give that folder "
                                        r"as DATA \(the image beside it, preview\.jpg, kept it from being looked into\)\.$"):
        read(data)
    deep = tmp_path / "deep"
    make_class_tree(deep / "a" / "b" / "c" / "d" / "e", 2, classes=CLASSES)  # (five wrappers: "found only 'd'")
    assert read(deep).classes == list(CLASSES)
    archive = tmp_path / "photos.zip"
    archive.write_bytes(b"PK\x03\x04")
    with pytest.raises(DataError, match="photos.zip: an archive; unpack it \\(e.g. unzip photos.zip\\)"):
        read(archive)


def test_review_cases_of_split_names_links_and_unlabelled_folders(tmp_path):
    numbered = make_class_tree(tmp_path / "numbered", 2, classes=("test1", "test2"))  # (taken for two test splits)
    assert read(numbered).classes == ["test1", "test2"]
    shared = splits(tmp_path / "shared", "train", {"test": 2})
    os.symlink("test", shared / "val")  # (val and test one folder: evaluate reads it; it was refused)
    assert len(read(shared).val) == 4
    intel = tmp_path / "intel"  # (Kaggle's Intel scenes, with its unlabelled seg_pred/seg_pred/*.jpg)
    splits(intel, "seg_train/seg_train", {"seg_test/seg_test": 2})
    for i in range(3):
        make_image(intel / "seg_pred" / "seg_pred" / f"{i}.jpg", (5, 5, 5), seed=i)
    split = read(intel)
    assert len(split.test) == 4 and "seg_pred/ holds images but no class folders (unlabelled?): not used" in split.notes
    explicit = read(intel, layout="train=seg_train,test=seg_test")  # (explicit splits were not looked through)
    assert explicit.classes == list(CLASSES) and len(explicit.test) == 4


def test_classes_that_are_numbers_ordered_as_text_are_noted(tmp_path):
    data = make_class_tree(tmp_path / "data", 2, classes=("0", "1", "2", "10"))
    split = read(data)
    assert split.classes == ["0", "1", "10", "2"] and split.notes == [
        "the classes are numbers, ordered as text (0, 1, 10, 2), as torchvision's ImageFolder orders them: a class's "
        "index is its place in that order, not its number (predict's output names the class)"]
    assert read(make_class_tree(tmp_path / "few", 2, classes=("1", "2"))).notes == []


def test_a_nas_boxs_thumbnail_folders_are_not_classes_nor_images(tmp_path):
    data = make_class_tree(tmp_path / "data", 3, classes=CLASSES)
    for c in CLASSES:  # (Synology keeps a folder of thumbnails for each photo, beside it)
        make_image(data / c / "@eaDir" / f"{c}_0.jpg" / "SYNOPHOTO_THUMB_S.jpg", (1, 2, 3))
    make_image(data / "@eaDir" / "cat" / "SYNOPHOTO_THUMB_M.jpg", (1, 2, 3))
    split = read(data)
    assert split.classes == list(CLASSES) and len(split.train) + len(split.val) == 6


def test_a_val_folder_that_is_a_link_to_trains_is_refused_or_listed(tmp_path):
    data = splits(tmp_path / "data", "train", {})
    make_class_tree(data / "val", 2, classes=("dog",))
    os.symlink("../train/cat", data / "val" / "cat")  # (its "val" images would be training images: none are)
    split = read(data)
    assert not [s for s in split.val if s.path.parent.name == "cat"]
    assert {"path": str(data / "val" / "cat"), "reason": f"a folder already read ({os.path.realpath(data / 'train' / 'cat')}): "
                                                        "its images are read there"} in split.skipped
    whole = splits(tmp_path / "whole", "train", {})
    os.symlink("train", whole / "val")  # (it said "no readable validation images left after skipping bad files")
    with pytest.raises(DataError, match=f"val is the same folder as train \\({re.escape(str(whole / 'train'))}\\); each split"):
        read(whole)


def test_class_names_that_differ_in_spaces_are_noted_and_shown_quoted(tmp_path):
    data = make_class_tree(tmp_path / "data", 2, classes=("cat", "cat ", "dog\u00a0", "dog"))
    assert read(data).notes == ["classes 'cat' and 'cat ' differ only in spaces: they are 2 classes; give them one name if "
                                "they are one", "classes 'dog' and 'dog\\xa0' differ only in spaces: they are 2 classes; give "
                                "them one name if they are one"]
    make_class_tree(tmp_path / "s" / "train", 3, classes=("cat", "dog"))
    make_class_tree(tmp_path / "s" / "val", 2, classes=("cat ", "dog"))
    with pytest.raises(DataError, match="missing in val: cat; not in train: 'cat '; classes 'cat' and 'cat ' differ only in spaces"):
        read(tmp_path / "s")


def test_bad_explicit_layouts_are_usage_errors(tmp_path):
    data = splits(tmp_path / "data", "train", {"test": 2})
    result = runner.invoke(app, ["train", str(data), "--runs-dir", str(tmp_path / "runs"), "--layout", "train:x", *FAST_TRAIN_ARGS])
    assert result.exit_code == 2 and "--layout 'train:x'" in result.stderr
    with pytest.raises(DataError, match="no such folder"):
        read(data, layout="train=nope")


@pytest.mark.parametrize("spec, says", [
    ("train=train,test=train", "test is the same folder as train (" ),
    ("train=train,val=./train", "val is the same folder as train ("),
    ("train=train,val=train/cat", "val is inside train ("),
])
def test_an_explicit_layout_naming_one_folder_for_two_splits_is_refused(tmp_path, spec, says):
    # (test = train read as "test (0)", every image kept for training; val = train left no val image)
    data = splits(tmp_path / "data", "train", {"val": 2})
    with pytest.raises(UsageError, match=re.escape(f"--layout '{spec}': {says}")):
        read(data, layout=spec)


def test_images_outside_every_class_folder_are_listed_and_counted_by_kind(tmp_path):
    data = splits(tmp_path / "data", "train", {"val": 2})
    shutil.copy(data / "train" / "cat" / "cat_0.jpg", data / "stray.jpg")  # no class folder says what these are
    shutil.copy(data / "train" / "dog" / "dog_0.jpg", data / "train" / "stray.jpg")
    (data / "README.txt").write_text("not an image: not listed at the top level")
    (data / "train" / "cat" / "notes.txt").write_text("in a class folder: listed")
    split = read(data)
    reasons = {Path(s["path"]).relative_to(data).as_posix(): s["reason"] for s in split.skipped}
    assert reasons == {"stray.jpg": "not in a class folder: not used (move it into its class's folder)",
                       "train/stray.jpg": "not in a class folder: not used (move it into its class's folder)",
                       "train/cat/notes.txt": "not an image file"}
    shown = runner.invoke(app, ["check", str(data)])
    assert shown.exit_code == 0 and "skipped 3 files: 2 not in a class folder, 1 not an image file" in shown.stdout


@pytest.mark.parametrize("reason, kind", [
    ("the same bytes as /scans/DICOM_png/a.png: used once", "duplicates"),  # (a path may hold any kind's words)
    ("a folder already read (/data/train/cat)", "folders read once"),
    ("DICOM, not read: export the images as PNG, whose 16-bit greyscale is kept", "DICOM"),
    ("200x200 pixels is over the 10,000-pixel limit (possible decompression bomb)", "pixel limit"),
    ("cannot decode: image file is truncated", "could not be decoded"),
    ("labels.csv line 3 names a.jpg and a.png alike: write the extension in the CSV", "CSV names fitting several files"),
    ("labels.csv line 3 names a file found at 2 places in HAM/ (p1/a.jpg, p2/a.jpg): not used; write its folder in the CSV",
     "CSV names fitting several files"),  # (both were counted as "could not be decoded")
])
def test_checks_skip_summary_counts_each_reason_by_its_kind(reason, kind):
    from finetune.cli.output import _reason_kind

    assert _reason_kind(reason) == kind


def test_a_file_reached_by_a_link_and_by_its_own_folder_is_listed_where_it_is(tmp_path):
    # (cat/dogs_link -> ../dog sorts before dog/: predict listed the dogs under the link, as cats' files)
    from finetune.scan import list_images

    root = make_class_tree(tmp_path / "incoming", 2, classes=("cat", "dog"))
    os.symlink("../dog", root / "cat" / "dogs_link")
    os.symlink("../dog/dog_0.jpg", root / "cat" / "a_dog.jpg")
    skipped = []
    assert list_images(root, skipped) == [root / "cat" / "cat_0.jpg", root / "cat" / "cat_1.jpg",
                                          root / "dog" / "dog_0.jpg", root / "dog" / "dog_1.jpg"]
    assert skipped == [{"path": str(root / "cat" / "a_dog.jpg"), "reason": f"the same file as {root / 'dog' / 'dog_0.jpg'} (a link): read once"},
                       {"path": str(root / "cat" / "dogs_link"), "reason": f"a folder already read ({root / 'dog'})"}]


@pytest.mark.parametrize("target", ["..", "../.."])
def test_symlink_loops_read_no_file_twice_and_no_wrong_label(tmp_path, target):
    data = splits(tmp_path / "data", "train", {"val": 2})
    os.symlink(target, data / "train" / "dog" / "loop")
    split = read(data)
    paths = [s.path for s in split.train + split.val]
    assert len(paths) == len({os.path.realpath(p) for p in paths}) == 14
    assert all(("cat" in s.path.name) == (s.label == 0) for s in split.train + split.val)
    assert [s["path"] for s in split.skipped] == [str(data / "train" / "dog" / "loop")]
    assert "a loop, not entered" in split.skipped[0]["reason"]


def test_a_symlink_into_another_class_is_not_entered_but_one_elsewhere_is(tmp_path):
    data = splits(tmp_path / "data", "train", {"val": 2})
    os.symlink(data / "train" / "dog", data / "train" / "cat" / "dogs")
    extra = make_class_tree(tmp_path / "elsewhere", 2, classes=("more",), seed=77) / "more"
    os.symlink(extra, data / "train" / "cat" / "more")
    split = read(data)
    cats = [s for s in split.train + split.val if s.label == 0 and "/train/" in str(s.path)]
    assert len(cats) == 5 + 2 and all("dog_" not in s.path.name for s in cats)  # the two linked images are cats
    assert split.skipped[0]["reason"].startswith("symbolic link into another class folder")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes are POSIX")
def test_entries_that_are_no_regular_files_are_reported_each_for_what_it_is(tmp_path):
    data = splits(tmp_path / "data", "train", {"val": 2})
    cat = data / "train" / "cat"
    os.mkfifo(cat / "pipe.jpg")  # (opening it to decode would wait for a writer forever)
    os.symlink(cat / "pipe.jpg", cat / "to_pipe.jpg")
    os.symlink(cat / "gone.jpg", cat / "broken.jpg")
    reasons = {Path(s["path"]).name: s["reason"] for s in read(data).skipped}
    assert reasons == {"pipe.jpg": "not a regular file", "to_pipe.jpg": "symbolic link to something not a regular file",
                       "broken.jpg": "broken symbolic link"}


def test_identical_files_within_a_split_are_used_once_and_across_splits_reported(tmp_path):
    data = splits(tmp_path / "data", "train", {"val": 2, "test": 2})
    shutil.copy(data / "train" / "cat" / "cat_0.jpg", data / "train" / "cat" / "copy_of_cat_0.jpg")
    shutil.copy(data / "train" / "dog" / "dog_1.jpg", data / "train" / "cat" / "dog_1_as_cat.jpg")  # one file, two labels
    shutil.copy(data / "train" / "dog" / "dog_2.jpg", data / "test" / "dog" / "leaked.jpg")
    split = read(data)
    reasons = {Path(s["path"]).name: s["reason"] for s in split.skipped}
    assert reasons["copy_of_cat_0.jpg"].endswith("used once")
    assert "label in doubt" in reasons["dog_1_as_cat.jpg"] and "label in doubt" in reasons["dog_1.jpg"]
    assert len(split.train) == 10 - 1 and len(split.test) == 5  # the leaked file is kept, and reported
    assert split.leakage == [{"path": str(data / "test" / "dog" / "leaked.jpg"), "split": "test",
                              "same_as": str(data / "train" / "dog" / "dog_2.jpg"), "same_as_split": "train"}]


def write_csv(path: Path, rows: list[list[str]]) -> Path:
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    return path


def test_labels_from_a_csv_with_a_split_column(tmp_path):
    images = tmp_path / "images"
    rows = [["image_id", "dx", "set"]]
    for i in range(12):
        colour = (220, 40, 40) if i % 2 else (40, 200, 40)
        make_image(images / f"img_{i}.jpg", colour, seed=i)
        rows.append([f"img_{i}", "red" if i % 2 else "green", "test" if i >= 10 else "train"])
    rows.append(["img_0", "green", "train"])  # listed twice, same label
    rows.append(["img_3", "green", "train"])  # listed twice, another label
    rows.append(["missing_9", "red", "train"])
    rows.append(["img_4", "", "train"])  # listed twice, the second time without a label
    labels = write_csv(tmp_path / "labels.csv", rows)
    split = read(images, labels=labels)
    assert split.classes == ["green", "red"] and split.layout == "labels CSV" and len(split.test) == 2
    assert split.read_as == "labels.csv (columns image_id, dx, set): train = 9 rows (2 classes), test = 2 rows; val = 20% of train (seed 0)"
    why = {s["path"]: s["reason"] for s in split.skipped}
    assert why[str(images / "img_0.jpg")].endswith("used once") and "label in doubt" in why[str(images / "img_3.jpg")]
    assert "no such image file" in why["missing_9"] and why[str(images / "img_4.jpg")].startswith("a row without a label in labels.csv line 17")
    assert all(s.path.name != "img_3.jpg" for s in split.train + split.val + split.test)
    out = runner.invoke(app, ["train", str(images), "--labels", str(labels), "--runs-dir", str(tmp_path / "runs"), "--json", *FAST_TRAIN_ARGS])
    assert out.exit_code == 0, out.stderr
    assert json.loads(out.stdout)["num_test"] == 2


def test_a_csv_name_without_its_extension_means_the_jpeg_beside_a_jpeg2000_original(tmp_path):
    from PIL import Image

    from finetune.labels import FileFinder

    images = tmp_path / "images"
    make_image(images / "img_1.jpg", (220, 40, 40), seed=1)
    Image.open(images / "img_1.jpg").save(images / "img_1.jp2")  # (sorts before img_1.jpg)
    find = FileFinder(images, tmp_path)
    assert find("img_1") == images / "img_1.jpg" and find("img_1.JPG") == images / "img_1.jpg"
    assert find("img_1.jp2") == images / "img_1.jp2"


def test_a_csv_written_on_windows_finds_its_files_and_one_finding_none_says_why(tmp_path):
    make_class_tree(tmp_path / "images", 2)
    rows = [["filename", "label"]] + [[f"{c}\\{c}_{i}.jpg", c] for c in ("cat", "dog") for i in range(2)]  # cat\cat_0.jpg
    split = read(tmp_path / "images", labels=write_csv(tmp_path / "win.csv", rows))
    assert split.classes == ["cat", "dog"] and len(split.train) + len(split.val) == 4 and split.skipped == []
    rows = [["filename", "label"]] + [[f"elsewhere/{c}_{i}.jpg", c] for c in ("cat", "dog") for i in range(2)]
    with pytest.raises(DataError) as refused:
        read(tmp_path / "images", labels=write_csv(tmp_path / "moved.csv", rows))
    assert (f"found 0 (4 rows skipped, e.g. elsewhere/cat_0.jpg: listed in moved.csv line 2 but no such image file in "
            f"{tmp_path / 'images'}). Fix the paths or --label-columns.") in str(refused.value)


def test_a_csv_path_is_looked_for_in_data_or_beside_the_csv_not_where_the_command_runs(tmp_path, monkeypatch):
    make_class_tree(tmp_path / "images", 3)
    make_class_tree(tmp_path / "cwd" / "stray", 1)
    monkeypatch.chdir(tmp_path / "cwd")
    rows = [["filename", "label"]] + [[f"{c}/{c}_{i}.jpg", c] for c in ("cat", "dog") for i in range(3)]
    rows += [["stray/cat/cat_0.jpg", "dog"], [str(tmp_path / "images" / "cat" / "cat_0.jpg"), "cat"]]
    split = read(tmp_path / "images", labels=write_csv(tmp_path / "labels.csv", rows))
    assert sorted(s.path.name for s in split.train + split.val) == [f"{c}_{i}.jpg" for c in ("cat", "dog") for i in range(3)]
    assert all(s.path.is_relative_to(tmp_path / "images") for s in split.train + split.val)
    assert [s["path"] for s in split.skipped] == ["stray/cat/cat_0.jpg", str(tmp_path / "images" / "cat" / "cat_0.jpg")]


def test_a_csv_name_without_extension_that_two_files_share_is_not_guessed(tmp_path):
    from finetune.labels import AmbiguousName, FileFinder

    images = tmp_path / "images"
    make_class_tree(images, 2)
    make_image(images / "cat" / "a.jpg", (40, 40, 200), seed=5)  # (a dog, filed beside a cat of the same name)
    make_image(images / "cat" / "a.png", (220, 40, 40), seed=6)
    find = FileFinder(images, tmp_path)
    assert find("cat/a.JPG") == images / "cat" / "a.jpg" and find("cat/a.png") == images / "cat" / "a.png"
    with pytest.raises(AmbiguousName):
        find("cat/a.gif")  # (neither is it)
    rows = [["filename", "label"], ["cat/a", "cat"]] + [[f"{c}/{c}_{i}", c] for c in ("cat", "dog") for i in range(2)]
    split = read(images, labels=write_csv(tmp_path / "l.csv", rows))
    assert len(split.train) + len(split.val) == 4
    assert split.skipped == [{"path": "cat/a", "reason": "l.csv line 2 names a.jpg and a.png alike: write the extension in the CSV"}]


@pytest.mark.parametrize("delimiter", [";", "\t"])
def test_a_csv_separated_by_semicolons_or_tabs_is_read(tmp_path, delimiter):
    # (a spreadsheet where the comma is the decimal mark saves its "CSV" with semicolons)
    make_class_tree(tmp_path / "images", 2)
    lines = ["\ufefffilename" + delimiter + "label"] + [f"{c}/{c}_{i}.jpg{delimiter}{c}" for c in ("cat", "dog") for i in range(2)]
    (tmp_path / "l.csv").write_text("\r\n".join(lines) + "\r\n", encoding="utf-8")
    split = read(tmp_path / "images", labels=tmp_path / "l.csv")
    assert split.classes == ["cat", "dog"] and len(split.train) + len(split.val) == 4 and split.skipped == []
    rows = [["filename", "species; common; name"]] + [[f"{c}/{c}_{i}.jpg", c] for c in ("cat", "dog") for i in range(2)]
    split = read(tmp_path / "images", labels=write_csv(tmp_path / "quoted.csv", rows), label_columns="filename,species; common; name")
    assert split.classes == ["cat", "dog"]  # (commas it is: the semicolons are inside a quoted name)


def test_class_names_that_print_alike_are_noted(tmp_path):
    import unicodedata

    composed, decomposed = unicodedata.normalize("NFC", "café"), unicodedata.normalize("NFD", "café")  # (a Mac writes the second)
    data = make_class_tree(tmp_path / "data", 2, classes=("Dog", "dog", "cat"))
    make_class_tree(data, 2, classes=(composed,))
    make_class_tree(data, 2, classes=(decomposed,), seed=50)
    split = read(data)
    assert len(split.classes) == 5
    assert split.notes == ["classes 'Dog' and 'dog' differ only in case: they are 2 classes; give them one name if they are one",
                           f"classes '{decomposed}' and '{composed}' differ only in how their letters are encoded: they "
                           "are 2 classes; give them one name if they are one"]


def test_split_folders_whose_class_names_print_alike_say_so(tmp_path):
    import unicodedata

    composed, decomposed = unicodedata.normalize("NFC", "café"), unicodedata.normalize("NFD", "café")
    make_class_tree(tmp_path / "data" / "train", 3, classes=("tea", composed))
    make_class_tree(tmp_path / "data" / "val", 2, classes=("tea", decomposed))  # (copied from a Mac)
    with pytest.raises(DataError) as refused:
        read(tmp_path / "data")
    assert str(refused.value).endswith(  # (it said "missing in val: café; not in train: café")
        f"(missing in val: {composed}; not in train: {decomposed}; classes '{composed}' and '{decomposed}' differ only in "
        f"how their letters are encoded: give both folders one name). Make them hold the same class folders.")


def test_a_hidden_folder_of_images_beside_the_classes_is_noted(tmp_path):
    data = make_class_tree(tmp_path / "data", 3, classes=("cat", "dog", "owl"))
    (data / "owl").rename(data / ".owl")  # (dropped without a word)
    (data / ".git").mkdir()  # (hidden and no images: nothing to say)
    (data / ".git" / "HEAD").write_text("ref: refs/heads/main")
    split = read(data)
    assert split.classes == ["cat", "dog"]
    assert split.notes == [".owl/ holds images but is hidden (its name starts with '.'): not read as a class; rename it "
                           "to train on it"]
    shown = runner.invoke(app, ["check", str(data), "--json", "--workers", "0"])
    assert ".owl/ holds images but is hidden" in " ".join(json.loads(shown.stdout)["notes"])


def test_a_hidden_folder_that_may_not_be_read_is_passed_over(tmp_path, monkeypatch):
    data = make_class_tree(tmp_path / "data", 3, classes=("cat", "dog"))
    (data / ".Trash-1000").mkdir()  # (another user's: noting hidden folders of images made train fail on it)
    real_iterdir = Path.iterdir

    def denied(self):
        if self.name == ".Trash-1000":
            raise PermissionError(13, "Permission denied", str(self))
        return real_iterdir(self)

    monkeypatch.setattr(Path, "iterdir", denied)
    assert read(data).classes == ["cat", "dog"] and read(data).notes == []


def test_a_csv_whose_columns_cannot_be_told_says_how_to_name_them(tmp_path):
    make_class_tree(tmp_path / "images", 2)
    labels = write_csv(tmp_path / "l.csv", [["a", "b"], ["cat/cat_0.jpg", "cat"]])
    with pytest.raises(DataError, match="--label-columns PATH,LABEL"):
        read(tmp_path / "images", labels=labels)
    rows = [["a", "b"]] + [[f"{c}/{c}_{i}.jpg", c] for c in ("cat", "dog") for i in range(2)]
    split = read(tmp_path / "images", labels=write_csv(tmp_path / "l.csv", rows), label_columns="a,b")
    assert split.classes == ["cat", "dog"] and len(split.train) + len(split.val) == 4


def test_train_measures_the_test_split_once_and_evaluate_agrees(tmp_path):
    data = splits(tmp_path / "data", "train", {"val": 2, "test": 3})
    shutil.copy(data / "test" / "cat" / "cat_0.jpg", data / "test" / "cat" / "again.jpg")  # counted once by both
    before = tree_hashes(data)
    result = runner.invoke(app, ["train", str(data), "--runs-dir", str(tmp_path / "runs"), "--json", *FAST_TRAIN_ARGS])
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["num_test"] == 6 and 0.0 <= summary["test_acc"] <= 1.0
    assert summary["test"]["num_images"] == 6 and set(summary["test"]["per_class"]) == set(CLASSES)
    assert json.loads((Path(summary["run_dir"]) / "results.json").read_text())["test_acc"] == summary["test_acc"]
    evaluated = runner.invoke(app, ["evaluate", str(data), "--model", summary["model"], "--json", "--workers", "0"])
    report = json.loads(evaluated.stdout)
    assert report["data"] == str(data / "test") and report["accuracy"] == summary["test_acc"]
    assert report["num_images"] == summary["test"]["num_images"] == 6
    assert tree_hashes(data) == before and not any(p.name == "runs" for p in data.iterdir())
    plain = runner.invoke(app, ["train", str(data), "--runs-dir", str(tmp_path / "runs"), *FAST_TRAIN_ARGS])
    assert "test acc" in plain.stdout


def test_check_reports_what_train_would_see_and_writes_nothing(tmp_path):
    data = splits(tmp_path / "data", "Training", {"Testing": 2})
    (data / "Training" / "cat" / "broken.jpg").write_bytes(b"not a jpeg")
    (data / "Training" / "cat" / "notes.txt").write_text("x")
    before = tree_hashes(data)
    result = runner.invoke(app, ["check", str(data), "--json", "--workers", "0"])
    assert result.exit_code == 0, result.stderr
    check = json.loads(result.stdout)
    assert check["ok"] and check["counts"]["test"] == {"cat": 2, "dog": 2}
    assert sum(check["counts"]["train"].values()) + sum(check["counts"]["val"].values()) == 10
    assert {Path(s["path"]).name for s in check["skipped"]} == {"broken.jpg", "notes.txt"}
    assert check["images"]["summary"] == ["all are 40x32", "all colour", (  # (resnet18's 224 px: a trial's 32 px images, unsaid)
        "the 224 px input enlarges the median image about 7 times (its shorter side 32 px): no detail is added, only "
        "time; a smaller --img-size costs less")]
    assert json.loads(runner.invoke(app, ["check", str(data), "--json", "--workers", "0", "--img-size", "96"]).stdout
                      )["images"]["summary"] == ["all are 40x32", "all colour"]  # (3 times: no word)
    refused = runner.invoke(app, ["check", str(data), "--workers", "0", "--arch", "vit_b_16", "--img-size", "160"])
    assert refused.exit_code == 2 and refused.stderr == (  # (it said "train would run"; train refuses it)
        "error: --img-size 160: vit_b_16 cannot take that size; leave --img-size out for its own (224).\n")
    table = runner.invoke(app, ["check", str(data), "--workers", "0"])
    assert table.exit_code == 0 and "train would run" in table.stdout and "Testing" in table.stdout
    assert tree_hashes(data) == before


def test_check_says_how_little_of_long_images_the_centre_crop_sees(tmp_path):
    data = tmp_path / "pages"  # (receipts told apart by their header or footer: the crop never saw either)
    for k, c in enumerate(CLASSES):
        for i in range(4):
            make_image(data / c / f"{i}.png", (200, 200, 200), seed=10 * k + i, size=(30, 100))
    shown = runner.invoke(app, ["check", str(data), "--json", "--workers", "0"])
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.stdout)["images"]["summary"][2] == ("100% are at least 2 times as long as wide: train takes "
                                                                 "each whole, squashed to a square (--fit auto; --fit crop "
                                                                 "would see about 30% of their length)")


def test_check_and_cache_print_paths_as_they_are(tmp_path, monkeypatch):
    # (rich read "[red]" in a folder's name as markup: the title showed "photos")
    data = splits(tmp_path / "[red]photos", "train", {"val": 2})
    table = runner.invoke(app, ["check", str(data), "--workers", "0"])
    assert table.exit_code == 0 and "[red]photos" in table.stdout.replace("\n", "")
    monkeypatch.setenv("FINETUNE_CACHE_DIR", str(tmp_path / "[old]" / "cache"))
    cache = runner.invoke(app, ["cache"])
    assert cache.exit_code == 0 and f"feature cache: {tmp_path / '[old]' / 'cache'}" in cache.stdout.replace("\n", "")


def test_check_exits_1_when_train_would_refuse(tmp_path):
    data = make_class_tree(tmp_path / "data", 3, classes=("cat",))
    result = runner.invoke(app, ["check", str(data)])
    assert result.exit_code == 1 and "train would refuse" in result.stdout and "need at least 2 class folders" in result.stdout
    one_good = make_class_tree(tmp_path / "d2", 2, classes=CLASSES)
    for p in (one_good / "dog").iterdir():
        p.write_bytes(b"junk")
    result = runner.invoke(app, ["check", str(one_good), "--json", "--workers", "0"])
    assert result.exit_code == 1 and "class 'dog' has no readable training images" in json.loads(result.stdout)["problem"]


def test_predict_lists_a_folder_in_sorted_order_links_included(tmp_path):
    from finetune.scan import list_images

    make_image(tmp_path / "elsewhere" / "x.png", (200, 10, 10))
    make_image(tmp_path / "in" / "a.png", (10, 200, 10))
    make_image(tmp_path / "in" / "sub" / "b.png", (10, 10, 200))
    (tmp_path / "in" / "link.png").symlink_to(tmp_path / "elsewhere" / "x.png")  # (listed after sub/b.png: followed last)
    assert [p.relative_to(tmp_path / "in").as_posix() for p in list_images(tmp_path / "in")] == ["a.png", "link.png", "sub/b.png"]
