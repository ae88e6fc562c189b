"""Messy folders: every bad file is skipped and reported once, every odd mode becomes RGB,
and no input file is ever changed (hashes before/after)."""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from finetune.cli import app
from finetune.images import ImageDecodeError, load_rgb, pillow_reads

from conftest import FAST_TRAIN_ARGS, make_class_tree, make_image, tree_hashes

runner = CliRunner()
CAP = 89_478_485


def noisy(w, h, seed=0, mode="RGB"):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode)


# --- files that must be skipped, with the reason the user sees -----------------------------

def zero_byte(p):
    p.write_bytes(b"")


def text_named_jpg(p):
    p.write_text("this is not a picture\n")


def truncated_jpeg(p):
    buf = io.BytesIO()
    noisy(400, 300).save(buf, "JPEG", quality=90)
    p.write_bytes(buf.getvalue()[: len(buf.getvalue()) * 6 // 10])


def bad_crc_png(p):
    buf = io.BytesIO()
    noisy(64, 48).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    idat = data.index(b"IDAT")
    data[idat + 20] ^= 0xFF  # corrupt the compressed pixels; the chunk CRC no longer matches
    p.write_bytes(bytes(data))


def bomb(p):
    noisy(200, 200).save(p, "PNG")  # 40,000 pixels, over the lowered cap used for this case


def heic(p):
    p.write_bytes(b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00" * 64)


def gif_garbage(p):
    p.write_bytes(b"GIF89a" + b"\x01" * 20)


SKIP_CASES = {
    "zero-byte.jpg": (zero_byte, "empty file"),
    "text.jpg": (text_named_jpg, "not an image"),
    "truncated.jpg": (truncated_jpeg, "truncated"),
    "bad-crc.png": (bad_crc_png, "cannot decode"),
    "bomb.png": (bomb, "over the 10,000-pixel limit"),
    "photo.heic": (heic, "pip install pillow-heif"),
    "iphone.jpg": (heic, "a HEIC image named .jpg: it needs a Pillow plugin: pip install pillow-heif"),  # ("format not recognised")
    # where Pillow reads AVIF itself (11.2 on), a damaged one is that, not a missing plugin
    "damaged.avif": (gif_garbage, "or a damaged one" if pillow_reads(".avif") else "pip install pillow-avif-plugin"),
    "broken.gif": (gif_garbage, "or a damaged one"),
    "notes.txt": (text_named_jpg, "not an image file"),
    "banner.png": (lambda p: Image.new("RGB", (4000, 10)).save(p), "aspect ratio over 100:1"),
}


def folder_with(tmp_path: Path, name: str, maker) -> tuple[Path, Path]:
    data = tmp_path / "data"
    make_class_tree(data / "train", 4, classes=("cat", "dog"))
    make_class_tree(data / "val", 2, classes=("cat", "dog"), seed=500)
    bad = data / "train" / "cat" / name
    maker(bad)
    return data, bad


def train_json(data: Path, runs: Path, *extra):
    result = runner.invoke(app, ["train", str(data), "--runs-dir", str(runs), "--json", *FAST_TRAIN_ARGS, *extra])
    return result, (json.loads(result.stdout) if result.exit_code == 0 else None)


@pytest.mark.parametrize("name", list(SKIP_CASES))
def test_bad_file_is_skipped_reported_once_and_untouched(tmp_path, name):
    maker, reason = SKIP_CASES[name]
    data, bad = folder_with(tmp_path, name, maker)
    before = tree_hashes(data)
    extra = ["--max-pixels", "10000"] if name == "bomb.png" else []
    result, summary = train_json(data, tmp_path / "runs", *extra)
    assert result.exit_code == 0, result.stderr
    assert [s["path"] for s in summary["skipped"]] == [str(bad)]
    assert reason in summary["skipped"][0]["reason"]
    assert summary["num_train"] == 8  # the good ones all trained
    assert (Path(summary["run_dir"]) / "skipped.csv").read_text().count(str(bad)) == 1
    assert tree_hashes(data) == before


# --- odd but valid images: all become proper RGB --------------------------------------------

def save(img, p, **kw):
    img.save(p, **kw)


def grey(p):
    save(Image.new("L", (32, 32), 77), p)


def one_bit(p):
    img = Image.new("1", (32, 32), 0)
    img.paste(1, (0, 0, 16, 32))
    save(img, p)


def palette(p):
    save(noisy(32, 32).convert("P"), p)


def palette_transparent(p):
    img = Image.new("P", (32, 32), 0)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    img.paste(1, (16, 0, 32, 32))
    save(img, p, transparency=0)  # left half transparent (index 0), right half red


def rgba(p):
    img = Image.new("RGBA", (32, 32), (0, 0, 255, 0))
    img.paste((255, 0, 0, 255), (16, 0, 32, 32))
    save(img, p)


def la(p):
    save(Image.new("LA", (32, 32), (0, 0)), p)


def cmyk(p):
    save(Image.new("CMYK", (32, 32), (0, 255, 255, 0)), p, format="JPEG", quality=95)


def sixteen_bit(p):
    a = np.zeros((32, 32), dtype=np.uint16)
    a[:, 16:] = 65535
    a[:, :16] = 32768
    save(Image.fromarray(a), p)


def twelve_bit(p):  # as medical exports: 16-bit files holding values up to 4,095
    a = np.zeros((32, 32), dtype=np.uint16)
    a[:, 16:] = 3000  # (not the depth's top: the scale is the depth's, not the picture's own maximum)
    a[:, :16] = 2048
    save(Image.fromarray(a), p)


def ten_bit(p):
    a = np.zeros((32, 32), dtype=np.uint16)
    a[:, 16:] = 1023
    a[:, :16] = 512
    save(Image.fromarray(a), p)


def narrow_sixteen_bit(p):  # values in a sliver of the depth: 30,000 and 30,100 of 65,535 (one grey level)
    a = np.full((32, 32), 30000, dtype=np.uint16)
    a[:, 16:] = 30100
    save(Image.fromarray(a), p)


def jpeg2000_twelve_bit(p):  # satellite tiles and slides: JPEG 2000, often deeper than 8 bits
    a = np.zeros((32, 32), dtype=np.uint16)
    a[:, 16:] = 3000
    a[:, :16] = 2048
    save(Image.fromarray(a), p, format="JPEG2000")


def float_with_nan(p):
    a = np.zeros((32, 32), dtype=np.float32)
    a[:, 16:] = 1.0
    a[0, 0] = np.nan
    a[0, 1] = np.inf
    save(Image.fromarray(a, mode="F"), p)


def all_negative(p):
    a = np.full((32, 32), -1000, dtype=np.int32)
    a[:, 16:] = -500
    save(Image.fromarray(a), p, format="TIFF")


def signed_tiff(p):  # as CT slices in Hounsfield units: air -1000, water 0, bone 1000
    a = np.zeros((32, 32), dtype=np.int32)
    a[:, :8] = -1000
    a[:, 24:] = 1000
    save(Image.fromarray(a), p, format="TIFF")


def float_tiff(p):
    a = np.zeros((32, 32), dtype=np.float32)
    a[:, 16:] = 1.0
    save(Image.fromarray(a, mode="F"), p)


def animated(p):
    frames = [Image.new("RGB", (32, 32), c) for c in ((0, 200, 0), (200, 0, 0), (0, 0, 200))]
    frames[0].save(p, save_all=True, append_images=frames[1:], duration=50, loop=0)


def exif_rotated(p):
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (20, 0, 40, 20))  # stored: left red, right blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": red ends up on top
    save(img, p, exif=exif, quality=95)


def corrupt_exif(p):
    """A JPEG whose EXIF block says it holds more entries than it does (common in scraped photo
    sets): Pillow decodes the pixels and warns about the metadata."""
    exif = Image.Exif()
    exif[0x010F] = "Camera"
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (0, 200, 0)).save(buf, "JPEG", exif=exif.tobytes())
    data = bytearray(buf.getvalue())
    at = data.find(b"Exif\0\0") + 6 + 8  # the first IFD's entry count, after the TIFF header
    data[at:at + 2] = b"\x00\x30"  # little-endian: 0x3000 entries
    p.write_bytes(bytes(data))


def upper_jpg(p, seed=0):
    make_image(p, (200, 40, 40), seed=seed, fmt="JPEG")


def px(img, xy):
    return np.asarray(img)[xy[1], xy[0]].tolist()


MODE_CASES = {
    "grey.png": (grey, lambda im: px(im, (5, 5)) == [77, 77, 77]),
    "bits.png": (one_bit, lambda im: px(im, (2, 2)) == [255, 255, 255] and px(im, (30, 2)) == [0, 0, 0]),
    "palette.png": (palette, lambda im: im.size == (32, 32)),
    "palette-transparent.gif": (palette_transparent, lambda im: px(im, (2, 2)) == [255, 255, 255] and px(im, (30, 2)) == [255, 0, 0]),
    "rgba.png": (rgba, lambda im: px(im, (2, 2)) == [255, 255, 255] and px(im, (30, 2)) == [255, 0, 0]),
    "la.png": (la, lambda im: px(im, (2, 2)) == [255, 255, 255]),
    "cmyk.jpg": (cmyk, lambda im: px(im, (5, 5))[0] > 200 and px(im, (5, 5))[1] < 60),
    "sixteen.png": (sixteen_bit, lambda im: px(im, (2, 2)) == [128, 128, 128] and px(im, (30, 2)) == [255, 255, 255]),
    "twelve.png": (twelve_bit, lambda im: px(im, (2, 2)) == [128, 128, 128] and px(im, (30, 2)) == [187, 187, 187]),
    "tile.jp2": (jpeg2000_twelve_bit, lambda im: abs(px(im, (2, 2))[0] - 128) <= 2 and abs(px(im, (30, 2))[0] - 187) <= 2),
    "narrow.png": (narrow_sixteen_bit, lambda im: px(im, (2, 2)) == [0, 0, 0] and px(im, (30, 2)) == [255, 255, 255]),
    "ten.png": (ten_bit, lambda im: px(im, (2, 2)) == [128, 128, 128] and px(im, (30, 2)) == [255, 255, 255]),
    "nan.tif": (float_with_nan, lambda im: px(im, (2, 2)) == [0, 0, 0] and px(im, (30, 2)) == [255, 255, 255]),
    "negative.tif": (all_negative, lambda im: px(im, (2, 2)) == [0, 0, 0] and 0 < px(im, (30, 2))[0] < 255),
    "signed.tif": (signed_tiff, lambda im: px(im, (2, 2)) == [0, 0, 0] and px(im, (16, 2)) == [128, 128, 128]
                   and px(im, (30, 2)) == [255, 255, 255]),
    "float.tif": (float_tiff, lambda im: px(im, (2, 2)) == [0, 0, 0] and px(im, (30, 2)) == [255, 255, 255]),
    "animated.gif": (animated, lambda im: px(im, (5, 5))[1] > 150 and px(im, (5, 5))[0] < 60),
    "rotated.jpg": (exif_rotated, lambda im: im.size == (20, 40) and px(im, (10, 5))[0] > 200 and px(im, (10, 35))[2] > 200),
    "bad-exif.jpg": (corrupt_exif, lambda im: px(im, (5, 5))[1] > 150),
    "UPPER.JPG": (upper_jpg, lambda im: im.mode == "RGB"),
    "Mixed.Jpeg": (lambda p: upper_jpg(p, seed=1), lambda im: im.mode == "RGB"),  # not the same bytes as UPPER.JPG
    "camera.JFIF": (lambda p: upper_jpg(p, seed=2), lambda im: im.mode == "RGB"),  # JPEG under its File Interchange name
}


@pytest.mark.parametrize("name", list(MODE_CASES))
def test_image_modes_become_rgb(tmp_path, name):
    maker, check = MODE_CASES[name]
    path = tmp_path / name
    maker(path)
    before = path.read_bytes()
    img = load_rgb(path, CAP)
    assert img.mode == "RGB" and check(img), (img.mode, img.size, px(img, (2, 2)))
    assert path.read_bytes() == before


def test_jpeg2000_without_openjpeg_says_how_to_get_it(tmp_path, monkeypatch):
    from PIL import features

    path = tmp_path / "tile.jp2"
    jpeg2000_twelve_bit(path)
    monkeypatch.delattr(Image.core, "jpeg2k_decoder", raising=False)  # (as a Pillow built without OpenJPEG)
    monkeypatch.setattr(features, "check", lambda name: name != "jpg_2000")
    with pytest.raises(ImageDecodeError, match="built without OpenJPEG; pip install --force-reinstall pillow"):
        load_rgb(path, CAP)


def test_metadata_warnings_of_a_decodable_image_are_not_shown(tmp_path):
    path = tmp_path / "bad-exif.jpg"
    corrupt_exif(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning escaping the decoder fails the test
        assert px(load_rgb(path, CAP), (5, 5))[1] > 150


def test_a_folder_of_odd_modes_trains_without_skips(tmp_path):
    data = tmp_path / "data"
    make_class_tree(data / "train", 3, classes=("cat", "dog"))
    make_class_tree(data / "val", 2, classes=("cat", "dog"), seed=9)
    for name, (maker, _) in MODE_CASES.items():
        maker(data / "train" / "dog" / name)
    before = tree_hashes(data)
    result, summary = train_json(data, tmp_path / "runs")
    assert result.exit_code == 0, result.stderr
    assert summary["skipped"] == [] and summary["num_train"] == 6 + len(MODE_CASES)
    assert tree_hashes(data) == before


def test_file_names_that_are_not_utf8_train_evaluate_and_predict(tmp_path):
    # A Windows archive unzipped here keeps "café" as the byte 0xE9: Python reads it as a surrogate,
    # which the run's digests and written files refused (a traceback after `check` had said fine).
    import os
    import shutil

    data = tmp_path / "data"
    make_class_tree(data / "train", 3, classes=("cat", "dog"))
    make_class_tree(data / "val", 2, classes=("cat", "dog"), seed=9)
    odd = os.path.join(os.fsencode(data / "train" / "cat"), b"caf\xe9.jpg")
    try:
        shutil.copy(os.fsencode(make_image(tmp_path / "other.jpg", (200, 40, 40), seed=55)), odd)
        open(os.path.join(os.fsencode(data / "val" / "dog"), b"bad\xe9.jpg"), "wb").write(b"not an image")
    except OSError:
        pytest.skip("this file system takes UTF-8 names only")
    before = tree_hashes(data)
    result, summary = train_json(data, tmp_path / "runs")
    assert result.exit_code == 0, result.stderr
    assert summary["num_train"] == 7 and [s["path"] for s in summary["skipped"]] == [os.fsdecode(odd).replace("train/cat/caf", "val/dog/bad")]
    assert os.fsencode(summary["skipped"][0]["path"]) in (Path(summary["run_dir"]) / "skipped.csv").read_bytes()
    evaluated = runner.invoke(app, ["evaluate", str(data), "--model", summary["model"], "--json"])
    assert evaluated.exit_code == 0, evaluated.stderr
    predicted = runner.invoke(app, ["predict", str(data / "train" / "cat"), "--model", summary["model"], "--format", "jsonl"])
    assert predicted.exit_code == 0 and len(predicted.stdout.splitlines()) == 4
    assert tree_hashes(data) == before


def test_bomb_in_predict_is_an_error_record(tmp_path):
    path = tmp_path / "big.png"
    bomb(path)
    with pytest.raises(ImageDecodeError, match=r"^200x200 pixels is over the 10,000-pixel limit \(possible decompression "
                                                r"bomb\); --max-pixels N reads it$"):
        load_rgb(path, 10_000)


def test_max_pixels_above_pillows_own_limit_reads_the_image(tmp_path, monkeypatch):
    # Pillow refuses images over its module-wide limit (89,478,485 pixels) before the tool's own
    # check: --max-pixels above it read nothing more. Here Pillow's limit is lowered to show it.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000)
    monkeypatch.setattr("finetune.images._PILLOW_DEFAULT_LIMIT", 1_000)  # (what it read at import)
    path = tmp_path / "big.png"
    bomb(path)  # 40,000 pixels
    noisy(200, 200).save(tmp_path / "big.tif", "TIFF")  # (TIFF: Pillow checks again when it loads the pixels)
    assert load_rgb(path, 50_000).size == (200, 200) and load_rgb(tmp_path / "big.tif", 50_000).size == (200, 200)
    assert Image.MAX_IMAGE_PIXELS == 1_000  # left as it was
    with pytest.raises(ImageDecodeError, match="^40,000 pixels is over the 30,000-pixel limit"):
        load_rgb(tmp_path / "big.tif", 30_000)


def test_class_left_empty_by_bad_files_is_a_clear_error(tmp_path):
    data = tmp_path / "data"
    make_class_tree(data / "train", 3, classes=("cat",))
    make_class_tree(data / "val", 2, classes=("cat", "dog"))
    (data / "train" / "dog").mkdir()
    zero_byte(data / "train" / "dog" / "a.jpg")
    text_named_jpg(data / "train" / "dog" / "b.jpg")
    result, _ = train_json(data, tmp_path / "runs")
    assert result.exit_code == 1
    assert "class 'dog' has no readable training images left" in result.stderr
    assert "skipped" in result.stderr  # each bad file was reported as it was found


def test_empty_files_take_no_val_place_and_a_class_without_val_is_said(tmp_path):
    # Val is split off a folder of classes before its images are decoded: empty files (known from
    # their size) used to take val places, and a class left with none went unsaid.
    data = make_class_tree(tmp_path / "data", 4, classes=("cat", "dog"))
    make_class_tree(data, 1, classes=("fox",))
    for i in range(6):
        (data / "cat" / f"empty_{i}.jpg").write_bytes(b"")
    checked = runner.invoke(app, ["check", str(data), "--json", "--arch", "efficientnet_lite0"])  # (its weights are here)
    report = json.loads(checked.stdout)
    assert report["counts"]["val"]["cat"] >= 1 and report["counts"]["train"]["cat"] + report["counts"]["val"]["cat"] == 4
    assert sorted(s["reason"] for s in report["skipped"]) == ["empty file (0 bytes)"] * 6
    assert report["notes"] == ["no val image of 'fox': val accuracy says nothing of that class; add good images of it"]
    result, summary = train_json(data, tmp_path / "runs")
    assert result.exit_code == 0, result.stderr
    assert "warning: no val image of 'fox': val accuracy says nothing of that class; add good images of it." in result.stderr


def test_val_left_empty_by_bad_files_says_the_fix_for_a_folder_of_classes(tmp_path):
    data = make_class_tree(tmp_path / "data", 3, classes=("cat", "dog"))
    for c in ("cat", "dog"):
        for i in range(3):
            (data / c / f"bad{i}.jpg").write_text(f"junk {c} {i}")  # (found bad only when decoded)
    problems = {json.loads(runner.invoke(app, ["check", str(data), "--json", "--seed", str(seed)]).stdout)["problem"]
                for seed in range(30)}  # (seeds whose val split drew only bad files, and others)
    assert ("no readable validation images left after skipping bad files; add good images, or remove the bad ones "
            "(finetune check lists them).") in problems  # (there is no val folder to add images to)


def test_mixed_folder_reports_each_bad_file_once(tmp_path):
    data = tmp_path / "data"
    make_class_tree(data / "train", 100, classes=("cat", "dog"))  # 200 good training images
    make_class_tree(data / "val", 4, classes=("cat", "dog"), seed=7)
    bad = []
    for i, (name, (maker, _)) in enumerate(SKIP_CASES.items()):
        if name == "bomb.png":
            continue
        p = data / ("val" if i % 3 == 0 else "train") / ("cat" if i % 2 else "dog") / name
        maker(p)
        bad.append(str(p))
    for name, (maker, _) in MODE_CASES.items():
        maker(data / "train" / "cat" / name)
    before = tree_hashes(data)
    result, summary = train_json(data, tmp_path / "runs", "--workers", "1")  # the multi-process loader path
    assert result.exit_code == 0, result.stderr
    assert sorted(s["path"] for s in summary["skipped"]) == sorted(bad)
    assert any("/val/" in b for b in bad)  # bad files in val are skipped too
    assert (summary["num_train"], summary["num_val"]) == (200 + len(MODE_CASES), 8)
    assert tree_hashes(data) == before
