"""Folder scanning, splitting and the errors a user sees for a bad folder."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from finetune import cpus
from finetune.cli import app
from finetune.data import default_workers
from finetune.reading import scan_dataset
from finetune.scan import stratified_split
from finetune.errors import DataError

from conftest import CLASS_COLOURS, FAST_TRAIN_ARGS, make_class_tree, make_image, tree_hashes

runner = CliRunner()


def train_cli(data, runs, *extra):
    return runner.invoke(app, ["train", str(data), "--runs-dir", str(runs), *FAST_TRAIN_ARGS, *extra])


def test_val_folder_aliases_are_found(tmp_path):
    for alias in ("val", "valid", "validation"):
        data = tmp_path / alias
        make_class_tree(data / "train", 2)
        make_class_tree(data / alias, 1)
        split = scan_dataset(data, 0.2, 0)
        assert split.layout == "split folders" and len(split.val) == 3
        assert split.read_as == f"train = train (3 classes, 6 images), val = {alias} (3)"


def test_single_folder_is_split_stratified_and_repeatably(flat_folder):
    a = scan_dataset(flat_folder, 0.2, seed=7)
    b = scan_dataset(flat_folder, 0.2, seed=7)
    c = scan_dataset(flat_folder, 0.2, seed=8)
    assert [s.path for s in a.val] == [s.path for s in b.val]
    assert [s.path for s in a.val] != [s.path for s in c.val]
    assert [sum(s.label == k for s in a.val) for k in range(3)] == [2, 2, 2]
    assert not {s.path for s in a.train} & {s.path for s in a.val}
    assert len(a.train) + len(a.val) == 30


def test_split_keeps_an_image_on_each_side():
    from finetune.data import Sample
    from pathlib import Path

    samples = [Sample(Path("a1"), 0), Sample(Path("a2"), 0), Sample(Path("b1"), 1)]
    train, val = stratified_split(samples, 2, 0.9, seed=0)
    assert sum(s.label == 0 for s in train) == 1 and sum(s.label == 0 for s in val) == 1
    assert [s.path for s in train if s.label == 1] == [Path("b1")]  # one image: train only


def test_the_default_val_split_holds_out_a_fifth_up_to_2500_images_and_a_given_fraction_is_kept():
    from pathlib import Path

    from finetune.data import Sample
    from finetune.scan import held_out

    def split(counts, fraction):
        samples = [Sample(Path(f"c{label}/{i:05d}.jpg"), label) for label, n in enumerate(counts) for i in range(n)]
        return stratified_split(samples, len(counts), fraction, seed=0)

    per_class = lambda samples, k: sum(s.label == k for s in samples)  # noqa: E731
    _, val = split([500, 300], None)  # small: a fifth of each class, as before
    assert (per_class(val, 0), per_class(val, 1)) == (100, 60)
    train, val = split([12_500, 12_500], None)  # issue 16's 25,000 photos: 2,500 in val, not 5,000
    assert (per_class(val, 0), per_class(val, 1)) == (1_250, 1_250) and len(train) == 22_500
    assert held_out(None, len(val), 25_000) == "2,500 of train (20% up to 2,500 images)"
    _, val = split([20_000, 150], None)  # a small class keeps at least 25 (its share would be 19)
    assert per_class(val, 1) == 25 and per_class(val, 0) == round(2_500 * 20_000 / 20_150)
    _, val = split([20_000, 100], None)  # ... or its fifth, when that is smaller
    assert per_class(val, 1) == 20
    _, val = split([12_500, 12_500], 0.2)  # --val-split 0.2 asked: a fifth, whatever the size
    assert len(val) == 5_000 and held_out(0.2, len(val), 25_000) == "20% of train"


def test_hidden_folders_and_files_are_not_classes_or_images(tmp_path):
    data = make_class_tree(tmp_path / "d", 3, classes=("cat", "dog"))
    make_image(data / ".ipynb_checkpoints" / "x.jpg", (0, 0, 0))
    make_image(data / "cat" / ".hidden.jpg", (0, 0, 0))
    (data / "cat" / ".DS_Store").write_bytes(b"\0\0")
    (data / "__MACOSX").mkdir()
    split = scan_dataset(data, 0.34, 0)
    assert split.classes == ["cat", "dog"]
    assert all(".hidden" not in str(s.path) for s in split.train + split.val)
    assert split.skipped == []


def test_non_image_files_are_reported_not_fatal(tmp_path):
    data = make_class_tree(tmp_path / "d", 3, classes=("cat", "dog"))
    (data / "dog" / "notes.txt").write_text("hello")
    split = scan_dataset(data, 0.34, 0)
    assert split.skipped == [{"path": str(data / "dog" / "notes.txt"), "reason": "not an image file"}]


def test_symlink_loop_does_not_hang(tmp_path):
    data = make_class_tree(tmp_path / "d", 3, classes=("cat", "dog"))
    os.symlink(data / "cat", data / "cat" / "loop")
    split = scan_dataset(data, 0.34, 0)
    assert len(split.train) + len(split.val) == 6
    assert split.skipped == [{"path": str(data / "cat" / "loop"), "reason": f"symbolic link to a folder above it ({data / 'cat'}): a loop, not entered"}]


@pytest.mark.parametrize("case, expected", [
    ("missing", "no such folder"),
    ("file", "is a file, not a folder"),
    ("labels_file", "data.csv: is a file, not a folder. For labels from a CSV: DATA is the folder its paths are in, and --labels"),
    ("one_class", "need at least 2 class folders"),
    ("empty_class", "dog: class folder has no images. Add images"),
    ("dicom_class", "dog: class folder has no images, only 2 files it does not read (e.g. 1.2.840.113619.2.55: DICOM, not read: "
                    "export the images as PNG"),
    ("val_differs", "val class folders differ"),
    ("val_beside_classes", "a 'val' folder next to class folders, but no"),
])
def test_bad_folders_give_one_clear_line(tmp_path, case, expected):
    data = tmp_path / "data"
    if case == "file":
        data.write_text("x")
    elif case == "labels_file":
        data = tmp_path / "data.csv"
        data.write_text("path,label\n")
    elif case == "one_class":
        make_class_tree(data, 4, classes=("cat",))
    elif case == "empty_class":
        make_class_tree(data, 4, classes=("cat",))
        (data / "dog").mkdir()
    elif case == "dicom_class":  # scans exported as DICOM, not as images
        make_class_tree(data, 4, classes=("cat",))
        (data / "dog").mkdir()
        for name in ("a.dcm", "1.2.840.113619.2.55"):  # (by its suffix, and by its mark)
            (data / "dog" / name).write_bytes(b"\0" * 128 + b"DICM")
    elif case == "val_differs":
        make_class_tree(data / "train", 3, classes=("cat", "dog"))
        make_class_tree(data / "val", 2, classes=("cat", "fox"))
    elif case == "val_beside_classes":
        make_class_tree(data, 3, classes=("cat", "dog"))
        make_class_tree(data / "val", 2, classes=("cat", "dog"))

    result = train_cli(data, tmp_path / "runs")
    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr.startswith("error: ") and expected in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert not (tmp_path / "runs").exists()  # nothing written for a failed start


def test_val_differs_names_the_classes(tmp_path):
    data = tmp_path / "data"
    make_class_tree(data / "train", 3, classes=("cat", "dog"))
    make_class_tree(data / "val", 2, classes=("cat", "fox"))
    with pytest.raises(DataError, match="missing in val: dog; not in train: fox"):
        scan_dataset(data, 0.2, 0)


def test_runs_dir_inside_the_data_is_refused(image_folder):
    before = tree_hashes(image_folder)
    result = train_cli(image_folder, image_folder / "runs")
    assert result.exit_code == 2 and "inside the data folder" in result.stderr
    assert tree_hashes(image_folder) == before and not (image_folder / "runs").exists()


def test_a_feature_cache_inside_the_data_is_refused(image_folder, tmp_path, monkeypatch):
    # (its files would be read as a class folder by the next run, or sit among a class's images)
    before = tree_hashes(image_folder)
    given = train_cli(image_folder, tmp_path / "runs", "--cache-dir", str(image_folder / "cache"))
    assert given.exit_code == 2 and given.stderr.startswith(f"error: --cache-dir {image_folder / 'cache'} is inside the data folder")
    monkeypatch.setenv("FINETUNE_CACHE_DIR", str(image_folder / "cat" / ".cache"))
    from_env = train_cli(image_folder, tmp_path / "runs")
    assert from_env.exit_code == 2 and "error: FINETUNE_CACHE_DIR=" in from_env.stderr
    assert "Set FINETUNE_CACHE_DIR outside it." in from_env.stderr
    assert tree_hashes(image_folder) == before and not list(tmp_path.glob("runs/*/model.safetensors"))


@pytest.mark.parametrize("args, message", [
    (["--val-split", "1.5"], "--val-split"),
    (["--epochs", "0"], "--epochs"),
    (["--arch", "resnet19"], "Did you mean 'resnet18'"),
    (["--device", "tpu"], "unknown --device"),
    (["--freeze-backbone", "--finetune-epochs", "2"], "contradict"),
    (["--seed", "99999999999999999999"], "--seed must be a whole number under 2^62"),  # (torch's overflow traceback)
    (["--cache-limit-gb", "inf"], "--cache-limit-gb must be a positive number (got inf)"),
    (["--cache-dir", ""], "Invalid value for '--cache-dir': empty (an unset shell variable?)"),  # (it wrote into the cwd)
    (["--no-pretrained", "--weights", "w.pth"], "--no-pretrained and --weights contradict each other"),  # (weights ignored)
    (["--no-freeze-backbone", "--finetune-epochs", "0"], "--no-freeze-backbone and --finetune-epochs 0 contradict"),
    (["--label-columns", "file,cls"], "--label-columns names the columns of --labels' CSV; pass --labels too."),
])
def test_bad_options_exit_2(image_folder, tmp_path, args, message):
    result = train_cli(image_folder, tmp_path / "runs", *args)
    assert result.exit_code == 2 and message in result.stderr


def test_split_from_one_folder_via_cli(flat_folder, tmp_path):
    result = train_cli(flat_folder, tmp_path / "runs", "--json", "--val-split", "0.3")
    summary = json.loads(result.stdout)
    assert (summary["num_train"], summary["num_val"]) == (21, 9)
    assert summary["layout"] == "class folders"
    assert summary["read_as"] == "train = the class folders of flat (3 classes, 30 images); val = 30% of train (seed 0)"


@pytest.mark.parametrize("name", ["a/b", "../escape", "/abs", ".."])
def test_run_names_that_are_paths_are_refused(image_folder, tmp_path, name):
    before = tree_hashes(image_folder)
    result = train_cli(image_folder, tmp_path / "runs", "--name", name)
    assert result.exit_code == 2 and "a run name is one folder name" in result.stderr
    assert tree_hashes(image_folder) == before and not (tmp_path / "escape").exists()


def test_runs_dir_that_is_a_file_is_a_clear_error(image_folder, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = train_cli(image_folder, blocker)
    assert result.exit_code == 2 and "Traceback" not in result.stderr  # (it said "cannot create it (File exists)")
    assert result.stderr == f"error: --runs-dir {blocker}: a file, not a folder. Pass a folder (it is made if missing).\n"


def test_runs_dir_that_links_to_nothing_is_a_clear_error(image_folder, tmp_path):
    dangling = tmp_path / "runs"
    dangling.symlink_to(tmp_path / "unmounted" / "runs")
    result = train_cli(image_folder, dangling)
    assert result.exit_code == 2 and result.stderr == (  # (it said "cannot create it (File exists)")
        f"error: --runs-dir {dangling}: a link to {tmp_path / 'unmounted' / 'runs'}, which does not exist. Make that "
        "folder, or pass another --runs-dir.\n")


def test_an_unreadable_folder_is_a_clear_error(tmp_path, monkeypatch):
    from finetune.scan import TreeReader

    data = make_class_tree(tmp_path / "d", 3, classes=("cat", "dog"))

    def denied(self, folder):
        raise PermissionError(13, "Permission denied", str(folder))

    monkeypatch.setattr(TreeReader, "images", denied)  # as for a folder without read permission (root reads all)
    result = train_cli(data, tmp_path / "runs")
    assert result.exit_code == 1 and f"{data / 'cat'}: permission denied" in result.stderr


def test_a_disk_that_fills_up_during_a_run_ends_it_in_one_line(image_folder, tmp_path, monkeypatch):
    import errno

    from finetune.resume import STATE_FILENAME

    real_replace = os.replace

    def full_disk(src, dst):
        if Path(dst).name in (STATE_FILENAME, "metrics.csv"):  # (the files each epoch writes)
            raise OSError(errno.ENOSPC, "No space left on device", str(dst))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", full_disk)
    result = train_cli(image_folder, tmp_path / "runs")
    run_dir = tmp_path / "runs" / "train"
    assert result.exit_code == 1 and result.stdout == "" and "Traceback" not in result.stderr  # (it was an OSError's)
    assert " ".join(result.stderr.split()).endswith(
        f"error: {run_dir / STATE_FILENAME}: cannot be written (No space left on device); make room or make {run_dir} "
        f"writable, then start the run again.")
    def full_from_the_start(src, dst):
        if Path(dst).name == "config.json":
            raise OSError(errno.ENOSPC, "No space left on device", str(dst))
        return full_disk(src, dst)

    monkeypatch.setattr(os, "replace", full_from_the_start)
    first_file = train_cli(image_folder, tmp_path / "full")
    assert first_file.exit_code == 1 and "config.json: cannot be written" in first_file.stderr
    assert list((tmp_path / "full").iterdir()) == []  # (an empty run folder was left)


def test_dicom_files_are_named_as_such_by_their_suffix_or_their_mark(tmp_path):
    from finetune.scan import not_an_image_reason

    (tmp_path / "scan.DCM").write_bytes(b"not even a header")
    (tmp_path / "1.2.840.10008").write_bytes(b"\0" * 128 + b"DICM" + b"\2\0")
    (tmp_path / "notes.txt").write_bytes(b"\0" * 128 + b"DICT")
    assert not_an_image_reason(tmp_path / "scan.DCM").startswith("DICOM, not read: export the images as PNG")
    assert not_an_image_reason(tmp_path / "1.2.840.10008").startswith("DICOM, not read")
    assert not_an_image_reason(tmp_path / "notes.txt") == "not an image file"
    assert not_an_image_reason(tmp_path / "gone.bin") == "not an image file"
    make_image(tmp_path / "photo.jpg", (1, 2, 3))
    (tmp_path / "photo.jpg").rename(tmp_path / "photo")  # (saved without its extension: "not an image file")
    assert not_an_image_reason(tmp_path / "photo") == ("an image (JPG) whose name does not end in an image extension: not "
                                                       "read; rename it to end in .jpg")


def test_a_cameras_raw_file_is_not_advised_to_be_renamed(tmp_path):
    from finetune.scan import not_an_image_reason

    (tmp_path / "IMG_0001.CR2").write_bytes(b"II*\x00" + b"\x00" * 60)  # (TIFF inside; renamed to .tif it is no photo)
    assert not_an_image_reason(tmp_path / "IMG_0001.CR2") == "not an image file"


@pytest.mark.parametrize("cores, ranks_here, expected", [(16, None, 8), (16, "4", 3), (16, "8", 1), (2, None, 1), (2, "2", 1)])
def test_loader_workers_share_the_cores_with_the_other_ranks(monkeypatch, cores, ranks_here, expected):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    monkeypatch.setattr(cpus, "cpu_limit", lambda *a, **k: None)  # (not this machine's own CPU limit, if any)
    if ranks_here is None:
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", ranks_here)
    assert default_workers() == expected


def test_an_imbalance_of_many_classes_is_told_by_its_ends():
    from finetune.scan import imbalance_detail

    assert imbalance_detail(["cat", "dog"], [1200, 30]) == "cat 1,200, dog 30"
    classes = [f"c{i}" for i in range(46)] + ["new\nline", "rare"]  # (48 names on one line; a newline broke it)
    counts = list(range(10, 56)) + [60, 1]
    assert imbalance_detail(classes, counts) == "48 classes; largest 'new\\nline' 60, c45 55; smallest c0 10, rare 1"


def test_the_files_results_list_are_absolute_when_data_is_given_relative(image_folder, tmp_path, monkeypatch):
    (image_folder / "train" / "cat" / "broken.jpg").write_bytes(b"junk")
    monkeypatch.chdir(image_folder.parent)  # (they were relative to where training ran: README says absolute)
    result = train_cli(Path(image_folder.name), tmp_path / "runs", "--json")
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["skipped"][0]["path"] == str(image_folder / "train" / "cat" / "broken.jpg")
    rows = (Path(summary["run_dir"]) / "suspects.csv").read_text().splitlines()[1:]
    assert rows and all(Path(row.split(",")[0]).is_absolute() for row in rows)


def test_fit_squash_keeps_the_ends_of_a_long_image_that_the_crop_cuts(tmp_path):
    from PIL import Image

    from finetune.data import Preprocessing, eval_transform, train_transform

    page = Image.new("RGB", (30, 100), (255, 255, 255))
    page.paste((0, 0, 0), (0, 0, 30, 10))  # (a header: what tells a trial's receipts apart, which the crop never saw)
    crop = Preprocessing(32, 36, (0.5,) * 3, (0.5,) * 3)
    squash = Preprocessing(32, 36, (0.5,) * 3, (0.5,) * 3, fit="squash")
    assert eval_transform(crop)(page).min() == 255  # (the centre of the page: no header)
    squashed = eval_transform(squash)(page)
    assert squashed.shape == (3, 32, 32) and squashed[:, :2].max() < 50 and squashed[:, -2:].min() == 255
    assert train_transform(squash)(page).shape == (3, 32, 32)
    assert Preprocessing.from_dict(squash.to_dict()) == squash
    assert Preprocessing.from_dict({k: v for k, v in crop.to_dict().items() if k != "fit"}) == crop  # (older files)


def test_a_model_trained_with_fit_squash_predicts_and_exports_as_it_trained(image_folder, tmp_path):
    result = train_cli(image_folder, tmp_path / "runs", "--fit", "squash", "--json")
    assert result.exit_code == 0, result.stderr
    model = json.loads(result.stdout)["model"]
    info = json.loads(runner.invoke(app, ["info", model, "--json"]).stdout)
    assert info["preprocessing"]["fit"] == "squash"
    predicted = runner.invoke(app, ["predict", str(image_folder / "val" / "dog"), "--model", model, "--format", "jsonl",
                                    "--workers", "0"])
    assert predicted.exit_code == 0 and {json.loads(line)["label"] for line in predicted.stdout.splitlines()} == {"dog"}
    exported = runner.invoke(app, ["export", "--model", model, "--format", "torchscript", "--out", str(tmp_path / "m.pt")])
    assert exported.exit_code == 0, exported.stderr
    assert json.loads((tmp_path / "m.pt.json").read_text())["fit"] == "squash"
    refused = train_cli(image_folder, tmp_path / "runs", "--fit", "pad")
    assert refused.exit_code == 2 and "--fit must be one of auto, crop, squash (got 'pad')" in refused.stderr


def test_fit_auto_squashes_where_most_training_images_are_long_and_says_so(tmp_path):
    from finetune.recipe import choose_fit

    pages = tmp_path / "pages"  # (a trial's receipts: val 0.30 with the centre crop, 1.0 squashed)
    photos = tmp_path / "photos"
    for k, c in enumerate(("a", "b")):
        for i in range(6):
            make_image(pages / c / f"{i}.png", CLASS_COLOURS[("cat", "dog")[k]], seed=10 * k + i, size=(30, 100))
            make_image(photos / c / f"{i}.png", CLASS_COLOURS[("cat", "dog")[k]], seed=10 * k + i, size=(60, 40))
    assert choose_fit(sorted(photos.rglob("*.png")), 0)[0] == "crop"
    fit, why = choose_fit(sorted(pages.rglob("*.png")), 0)
    assert fit == "squash" and why.startswith("12 of 12 training images read are at least 2 times as long as wide")
    said = [a for a in FAST_TRAIN_ARGS if a != "--quiet"]
    result = runner.invoke(app, ["train", str(pages), "--runs-dir", str(tmp_path / "runs"), *said, "--json"])
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["recipe"]["fit"] == "squash" and "fit: squash (" in result.stderr
