"""The HTML report (report.html, evaluate --report), calibration figures and suspected label errors."""

from __future__ import annotations

import base64
import csv
import io
import json
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from typer.testing import CliRunner

from finetune.cli import app
from finetune.metrics import calibration, classification_report
from finetune.report import Measured, ReportContent, write_report
from finetune.suspects import find_suspects, fold_of_each

from conftest import CLASS_COLOURS, FAST_TRAIN_ARGS, make_image, make_train_val

runner = CliRunner()
SECTIONS = ("summary", "curves", "confusion", "per-class", "top-losses", "suspects", "calibration", "skipped", "settings")


class Parsed(HTMLParser):
    """Every id, link, image source and external reference of a page."""

    def __init__(self, html: str):
        super().__init__()
        self.ids, self.links, self.images, self.tags = set(), [], [], []
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        if "id" in a:
            self.ids.add(a["id"])
        if tag == "a" and "href" in a:
            self.links.append(a["href"])
        if tag == "img":
            self.images.append(a.get("src", ""))


def check_self_contained(html: str) -> Parsed:
    """Every section present, every image decodes, every link target exists, nothing fetched from elsewhere."""
    page = Parsed(html)
    for link in page.links:
        assert link.startswith("#") and link[1:] in page.ids, link
    for src in page.images:
        head, _, data = src.partition(",")
        assert head in ("data:image/jpeg;base64", "data:image/png;base64"), src[:40]
        with Image.open(io.BytesIO(base64.b64decode(data))) as im:
            im.load()
    assert not {"script", "link", "iframe", "object", "embed"} & set(page.tags)
    style = html.split("<style>")[1].split("</style>")[0]
    assert "@import" not in style and "url(" not in style and not re.search(r"""(src|href)=["']?(https?:|//)""", html)
    return page


def test_calibration_of_known_probabilities():
    # Four images at confidence 0.9, half of them right: every bit of confidence above 0.5 is a miscalibration.
    probs = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.1, 0.9], [0.1, 0.9]])
    cal = calibration(probs, [0, 1, 1, 0])
    assert cal["ece"] == pytest.approx(0.4)
    assert [(b["count"], b["accuracy"]) for b in cal["bins"]] == [(4, 0.5)] and cal["bins"][0]["lower"] < 0.9 <= cal["bins"][0]["upper"]
    assert calibration(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), [0, 1])["ece"] == pytest.approx(0.0)


def test_figures_are_not_rounded():
    probs = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    report = classification_report(["a", "b", "c"], [0, 1, 1], probs, ["x", "y"])
    assert report["accuracy"] == 2 / 3 and report["per_class"]["y"]["recall"] == 0.5
    assert report["per_class"]["x"]["precision"] == 0.5 and report["top_losses"][0]["score"] == pytest.approx(0.6)


def test_folds_are_stratified():
    labels = torch.tensor([0] * 10 + [1] * 5)
    fold = fold_of_each(labels, 5, seed=0)
    for k in range(5):
        assert ((fold == k) & (labels == 0)).sum() == 2 and ((fold == k) & (labels == 1)).sum() == 1


def test_flipped_labels_are_the_suspects():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 32, generator=g) * 3
    labels = torch.arange(3).repeat_interleave(40)
    features = centres[labels] + torch.randn(120, 32, generator=g)
    given = labels.clone()
    flipped = [3, 50, 95]
    given[flipped] = torch.tensor([1, 2, 0])
    features[7] = torch.randn(32, generator=g) * 12  # like nothing else
    found, judged_right = find_suspects(features, given, 3)
    assert judged_right == pytest.approx(117 / 120, abs=0.02)  # (the flipped three judged as their true class)
    claimed = {s.index: s.suggested for s in found if s.suggested is not None}
    assert claimed == {3: 0, 50: 1, 95: 2}  # the class each image really is
    assert all(s.probability < 0.5 for s in found if s.suggested is not None)
    unlike = [s.index for s in found if s.suggested is None]
    assert len(unlike) == 2 and unlike[0] == 7  # 1% of 120, rounded up, least typical first
    assert not set(unlike) & claimed.keys()  # (an image is listed once)
    assert find_suspects(features[:7], given[:7], 3) is None  # too few per class to cross-validate


def test_no_image_is_called_another_classs_where_the_features_barely_tell_the_classes_apart():
    """A trial: 48 classes at 0.25 val accuracy, and 238 of 317 training images were "suspected label errors"."""
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(8).repeat_interleave(10)
    noise, judged_right = find_suspects(torch.randn(80, 16, generator=g), labels, 8)  # nothing to tell them apart by
    assert judged_right < 0.5 and [s.suggested for s in noise] == [None]  # (the least typical image alone)


def test_report_of_a_run_is_self_contained_and_complete(tmp_path):
    data = make_train_val(tmp_path / "data", n_train=8)
    # A red (cat) image filed under dog: the training set's label error; and a file that is no image.
    make_image(data / "train" / "dog" / "really_a_cat.jpg", CLASS_COLOURS["cat"], seed=9999)
    (data / "val" / "fox" / "notes.jpg").write_text("not an image")
    result = runner.invoke(app, ["train", str(data), "--runs-dir", str(tmp_path / "runs"), "--json", *FAST_TRAIN_ARGS])
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    run_dir = Path(summary["run_dir"])
    html = (run_dir / "report.html").read_text("utf-8")
    page = check_self_contained(html)
    assert set(SECTIONS) <= page.ids
    assert html.index('id="summary"') < html.index('id="curves"') < html.index('id="confusion"') < html.index('id="settings"')
    assert "notes.jpg" in html  # the skipped file, with why
    assert summary["report"]["path"] == str(run_dir / "report.html") and summary["report"]["bytes"] == len(html.encode())
    with open(run_dir / "suspects.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows and rows[0]["path"].endswith("really_a_cat.jpg") and rows[0]["given"] == "dog" and rows[0]["suggested"] == "cat"
    assert "really_a_cat.jpg" in html.split('id="suspects"')[1].split('id="calibration"')[0]
    assert summary["suspects"]["count"] == len(rows)
    assert 0 <= summary["val"]["calibration"]["ece"] <= 1 and summary["val"]["accuracy"] == summary["best_val_acc"]
    assert f"report: {run_dir / 'report.html'}" not in result.stdout  # --json: one JSON object only


def test_off_diagonal_cells_link_to_their_images(tmp_path):
    paths = [str(make_image(tmp_path / f"im{i}.png", (i * 40, 0, 0))) for i in range(4)]
    probs = torch.tensor([[0.9, 0.1], [0.3, 0.7], [0.4, 0.6], [0.2, 0.8]])  # true 0,0,1,1: image 1 is a mistake
    (tmp_path / "im3.png").unlink()  # gone since: the report says so instead of failing
    # A name with $ signs (matplotlib would read them as mathematics) and a distance for the unknown rule's plot.
    content = ReportContent("t", ["a", "b"], [("data", "x")], [Measured("test set $x$", paths, [0, 0, 1, 1], probs, torch.tensor([0.5, 0.9, 2.0, 0.7]))],
                            distance_threshold=1.0, temperature=2.0)
    out = write_report(tmp_path / "sub" / "r.html", content, 10**8)
    html = (tmp_path / "sub" / "r.html").read_text()
    page = check_self_contained(html)
    assert "#test-set--x--true0-pred1" in page.links and "test-set--x--true0-pred1" in page.ids
    cell = html.split('id="test-set--x--true0-pred1"')[1].split("</div>\n</div>")[0]
    assert "im1.png" in cell and "im0.png" not in cell
    assert "cannot read" in html and out["bytes"] == len(html.encode())
    assert "1 of 4 images flagged unknown" in html and "before calibration" in html


def test_the_report_leaves_the_plotting_backend_alone(tmp_path):
    code = ("import matplotlib, sys, torch; matplotlib.use('svg'); from finetune.report import *; "
            "c = ReportContent('t', ['a', 'b'], [], [Measured('v', [], [], torch.empty(0, 2))]); "
            f"write_report(__import__('pathlib').Path({str(tmp_path / 'r.html')!r}), c, 1); "
            "from finetune.plots import confusion_figure, png_bytes; png_bytes(confusion_figure([[1, 0], [0, 1]], ['a', 'b'])); "
            "assert matplotlib.get_backend() == 'svg', matplotlib.get_backend(); assert 'matplotlib.pyplot' not in sys.modules")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "r.html").is_file()


def test_evaluate_writes_a_report(trained_run, tmp_path):
    target = tmp_path / "out" / "val.html"
    result = runner.invoke(app, ["evaluate", str(trained_run["data"]), "--model", trained_run["summary"]["run_dir"],
                                 "--report", str(target), "--json", "--workers", "0"])
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["report"]["path"] == str(target) and f"report: {target}" in result.stderr
    page = check_self_contained(target.read_text())
    assert set(SECTIONS) - {"curves"} <= page.ids
    strict = tmp_path / "strict.html"  # the report follows the call's unknown options, as the JSON does
    runner.invoke(app, ["evaluate", str(trained_run["data"]), "--model", trained_run["summary"]["run_dir"], "--report", str(strict),
                        "--max-distance", "1e-9", "--workers", "0"])
    assert f"{report['num_images']} of {report['num_images']} images flagged unknown" in strict.read_text()
    bad = runner.invoke(app, ["evaluate", str(trained_run["data"]), "--model", trained_run["summary"]["run_dir"],
                              "--report", str(tmp_path / "val.txt")])
    assert bad.exit_code != 0 and "name it .html" in bad.stderr and bad.stdout == ""
    evaluate = ["evaluate", str(trained_run["data"]), "--model", trained_run["summary"]["run_dir"], "--workers", "0", "--report"]
    first = target.stat().st_ino
    again = runner.invoke(app, [*evaluate, str(target)])  # (an earlier report: replaced, a new file moved into place)
    assert again.exit_code == 0 and target.stat().st_ino != first
    mine = tmp_path / "mine.html"
    mine.write_text("<html>my own page</html>")
    kept = runner.invoke(app, [*evaluate, str(mine)])  # (it was replaced without a word)
    assert kept.exit_code == 2 and kept.stdout == "" and mine.read_text() == "<html>my own page</html>"
    assert kept.stderr == (f"error: --report {mine}: a file is there already, not a report finetune wrote; name a new file, "
                           f"or remove that one.\n")
    inside = runner.invoke(app, [*evaluate, str(trained_run["data"] / "val.html")])
    assert inside.exit_code == 2 and "is inside the data folder" in inside.stderr and not (trained_run["data"] / "val.html").exists()


def test_looking_for_suspects_leaves_the_random_numbers_alone():
    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    labels = torch.arange(2).repeat(10)
    find_suspects(torch.randn(20, 8, generator=torch.Generator().manual_seed(1)), labels, 2)
    assert torch.equal(torch.rand(4), expected)


def test_class_names_the_plot_font_lacks_raise_no_warning_on_stderr():
    # (matplotlib warned once per missing character; the names show as boxes in the plot only)
    import warnings

    from finetune.plots import confusion_figure, png_bytes

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        png = png_bytes(confusion_figure([[3, 1], [0, 4]], ["猫.v1", "犬"], "validation"))
    assert png.startswith(b"\x89PNG") and not [w for w in caught if "Glyph" in str(w.message)]


def test_long_class_names_are_cut_on_the_confusion_figures_ticks():
    from finetune.plots import TICK_CHARS, confusion_figure, tick_label

    assert tick_label("dog") == "dog" and tick_label("$5 bill") == r"\$5 bill"
    assert tick_label("L" * 200) == "L" * (TICK_CHARS - 1) + "…"  # (200 characters squeezed the matrix into a corner)
    fig = confusion_figure([[1] * 31 for _ in range(31)], ["L" * 200] + [f"c{i}" for i in range(30)])
    assert len(fig.axes) == 2  # above 30 classes the counts are not written: a colour bar says them


def test_a_class_name_read_under_a_non_utf8_locale_is_drawn():
    from finetune.plots import confusion_figure, plain

    name = "café".encode().decode("ascii", "surrogateescape")  # (os.listdir under LC_ALL=C PYTHONUTF8=0)
    assert plain(name) == "café"
    confusion_figure([[1, 0], [0, 1]], [name, "tea"]).savefig(__import__("io").BytesIO())  # (a traceback, the run half-written)


def test_a_held_out_image_near_a_copy_of_a_training_one_is_found_and_alike_images_are_not():
    """A trial: every val image a resized, recompressed copy of a training one: val 0.877 (0.19 without), no word."""
    from finetune.suspects import near_copies

    g = torch.Generator().manual_seed(0)
    train = torch.randn(200, 64, generator=g)
    copy = train[5] + 0.1 * torch.randn(64, generator=g)  # (resized and saved again: features moved a little)
    held_out = torch.stack([torch.randn(64, generator=g), copy, train[7] + 1.5 * torch.randn(64, generator=g)])
    [(index, like, similarity)] = near_copies(train, held_out)
    assert (index, like) == (1, 5) and similarity > 0.99
    # Plain colour and noise, as the tests' images: every image of a class this alike to the others (cosine 0.96)
    centres = torch.randn(10, 64, generator=g)
    alike = centres.repeat_interleave(20, 0) + 0.2 * torch.randn(200, 64, generator=g)
    new_member = centres[:1] + 0.2 * torch.randn(1, 64, generator=g)
    assert float(F.cosine_similarity(new_member - alike.mean(0), alike[:1] - alike.mean(0))) > 0.9
    assert near_copies(alike, new_member) == []  # (no more alike to one image than the images are to each other)
    assert [i for i, _, _ in near_copies(alike, torch.cat([new_member, alike[3:4] + 0.01 * torch.randn(1, 64, generator=g)]))] == [1]


def test_a_val_image_resized_from_a_training_one_is_reported_as_a_near_copy(tmp_path):
    from PIL import Image, ImageDraw

    data = tmp_path / "data"
    rng = torch.Generator().manual_seed(0)
    colour = lambda: tuple(int(v) for v in torch.randint(0, 256, (3,), generator=rng))  # noqa: E731
    for split, n in (("train", 8), ("val", 3)):
        for k, name in enumerate(("circles", "squares")):
            for i in range(n):  # (shapes of any colour and size anywhere: unlike plain colour, each image its own)
                img = Image.new("RGB", (192, 192), colour())
                draw = ImageDraw.Draw(img)
                for _ in range(int(torch.randint(3, 9, (1,), generator=rng))):
                    x, y, size = (int(v) for v in torch.randint(10, 150, (3,), generator=rng))
                    (draw.ellipse if k == 0 else draw.rectangle)([x, y, x + size // 2, y + size // 2], fill=colour())
                (data / split / name).mkdir(parents=True, exist_ok=True)
                img.save(data / split / name / f"{i}.png")
    original = data / "train" / "circles" / "0.png"
    copy = data / "val" / "circles" / "resized.png"
    with Image.open(original) as im:  # (97% and saved again: other bytes, the same picture. Not as a JPEG: its
        im.resize((186, 186)).save(copy)  # ringing at these drawings' sharp edges moves their features more than a photo's)
    args = [a for a in FAST_TRAIN_ARGS if a != "--quiet"]
    args[args.index("--img-size") + 1] = "160"  # (at 64 px these drawings are alike)
    result = runner.invoke(app, ["train", str(data), "--runs-dir", str(tmp_path / "runs"), "--json", *args])
    assert result.exit_code == 0, result.stderr
    found = json.loads(result.stdout)["near_copies"]
    assert {"path": str(copy), "like": str(original)} in [{k: c[k] for k in ("path", "like")} for c in found]
    assert [c["path"] for c in found] == [str(copy)]  # (the others: distinct drawings)
    said = [line for line in result.stderr.splitlines() if "like a near-copy" in line or "like near-copies" in line]
    assert len(said) == 1 and f"e.g. {found[0]['path']} like {found[0]['like']}" in said[0]


def test_held_out_images_from_another_source_are_said_unlike_the_training_ones():
    """A trial: val photos shrunk to 32 px beside full-size training ones, val 0.71 (0.97 at full size), no word."""
    from finetune.progress import Reporter
    from finetune.suspects import median_likeness
    from finetune.training import tell_unlike_training

    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 64, generator=g)
    draw = lambda n, spread: centres.repeat(n // 4, 1) + spread * torch.randn(n, 64, generator=g)  # noqa: E731
    train, same, other = draw(200, 1.0), draw(40, 1.0), draw(40, 1.0) + 2.0 * torch.randn(40, 64, generator=g)
    likeness = {"train": median_likeness(train), "val": median_likeness(train, same), "test": median_likeness(train, other)}
    assert likeness["val"] == pytest.approx(likeness["train"], abs=0.05) and likeness["test"] < 0.75 * likeness["train"]

    class Warned(Reporter):
        def __init__(self):
            self.warned = []

        def warn(self, message):
            self.warned.append(message)

    said = Warned()
    tell_unlike_training(likeness, said)
    assert len(said.warned) == 1 and said.warned[0].startswith("test images are less like the training images")
