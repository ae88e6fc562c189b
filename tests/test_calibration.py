"""Calibrated probabilities (temperature scaling) and the unknown rule, from fitting to predict, evaluate and export."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from finetune.calibration import (KEEP_CORRECT, MARGIN, FeatureDistance, distance_threshold, fit_temperature,
                                  student_t_quantile)
from finetune.checkpoint import read_model_file
from finetune.errors import ModelFileError
from finetune.files import read_safetensors, write_safetensors
from finetune.cli import app

from conftest import make_image

runner = CliRunner()


def test_fitting_recovers_a_known_temperature():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(20_000, 5, generator=g) * 4
    labels = torch.multinomial((logits / 2.5).softmax(1), 1, generator=g).squeeze(1)  # drawn as if T were 2.5
    assert fit_temperature(logits, labels) == pytest.approx(2.5, rel=0.05)
    over_sure = torch.multinomial((logits / 0.5).softmax(1), 1, generator=g).squeeze(1)
    assert fit_temperature(logits, over_sure) == pytest.approx(0.5, rel=0.05)


def test_a_handful_of_val_images_moves_the_temperature_little():
    # Three images, each right: the likelihood alone sharpens without end (T at its floor, 0.05),
    # a certainty three images cannot show.
    logits = torch.tensor([[2.0, -1.0, -1.5], [-1.0, 2.5, -2.0], [-0.5, -1.0, 1.5]])
    t = fit_temperature(logits, torch.tensor([0, 1, 2]))
    assert 0.3 < t < 1.0


def test_threshold_keeps_the_correct_val_images():
    distances = torch.linspace(0, 2, 200)
    correct = torch.ones(200, dtype=torch.bool)
    threshold = distance_threshold(distances, correct)
    assert (distances <= threshold).float().mean() >= KEEP_CORRECT and threshold == pytest.approx(float(distances[-2]) * (1 + MARGIN))


def test_a_threshold_set_on_few_val_images_keeps_about_as_many_of_their_kind():
    # (set at the largest of 12 val distances, it called about 1 in 13 images of the val's own kind unknown;
    # a trial saw 2 of 12 test images and 4 of 24 training images flagged)
    g = torch.Generator().manual_seed(0)
    flagged = []
    for _ in range(300):
        val, fresh = (torch.randn(12, generator=g) * 0.15).exp(), (torch.randn(2000, generator=g) * 0.15).exp()
        flagged.append(float((fresh > distance_threshold(val, torch.ones(12, dtype=torch.bool))).float().mean()))
    assert sum(flagged) / len(flagged) < 0.045  # (the largest distance, and MARGIN: 0.062)
    assert student_t_quantile(0.99, 11) == pytest.approx(2.718, abs=1e-3) and student_t_quantile(0.99, 1000) == pytest.approx(2.330, abs=1e-3)


def test_the_few_val_bound_applies_while_the_quantile_is_the_largest_distance():
    from finetune.calibration import too_few_to_place

    assert too_few_to_place(100) and not too_few_to_place(101)  # (at 100 the 99% quantile is still the largest)
    distances = torch.linspace(1, 2, 100)
    assert distance_threshold(distances, torch.ones(100, dtype=torch.bool)) > 2 * (1 + MARGIN)


def test_distance_is_small_for_the_training_kind_and_large_for_others():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 64, generator=g) * 3  # two training classes; a third kind the model never saw
    def draw(c, n):
        return centres[c] + 0.5 * torch.randn(n, 64, generator=g)
    distance = FeatureDistance.of(torch.cat([draw(0, 150), draw(1, 150)]))
    foreign = draw(2, 50)
    same, other = distance(torch.cat([draw(0, 25), draw(1, 25)])), distance(foreign)
    assert same.max() < other.min() and 0.5 < float(same.median()) < 2  # about 1 for the training kind
    back = FeatureDistance.from_tensors(distance.tensors())
    assert torch.allclose(back(foreign), other, rtol=1e-3)


@pytest.fixture(scope="module")
def model_file(trained_run):
    return trained_run["summary"]["model"]


def test_a_trained_model_carries_its_calibration(trained_run, model_file):
    summary = trained_run["summary"]
    loaded = read_model_file(__import__("pathlib").Path(model_file))
    cal, unknown = loaded.meta["calibration"], loaded.meta["unknown"]
    assert loaded.temperature == cal["temperature"] > 0 and cal["val_ece_after"] <= cal["val_ece_before"] + 1e-6
    assert loaded.distance is not None and loaded.distance_threshold == unknown["threshold"]
    assert summary["calibration"]["temperature"] == cal["temperature"] and summary["unknown"]["threshold"] == unknown["threshold"]
    info = runner.invoke(app, ["info", model_file, "--json"])
    details = json.loads(info.stdout)
    assert details["calibration"]["temperature"] == cal["temperature"] and details["unknown"]["threshold"] == unknown["threshold"]


def predict_jsonl(model, *inputs, extra=()):
    result = runner.invoke(app, ["predict", *map(str, inputs), "--model", str(model), "--format", "jsonl", "--workers", "0", *extra])
    assert result.exit_code == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_calibration_never_changes_the_class(trained_run, model_file, monkeypatch):
    from finetune import prediction

    loaded = read_model_file(__import__("pathlib").Path(model_file))
    val = sorted((trained_run["data"] / "val").rglob("*.jpg"))
    monkeypatch.setattr(prediction, "autocast_dtype", lambda device: None)  # fp32, as the logits below (not bf16)
    rows = predict_jsonl(model_file, *val, extra=["--no-unknown"])
    from finetune.data import ImageFileDataset

    x = torch.stack([ImageFileDataset([p], loaded.preprocessing, 10**8)[0][1][0] for p in val]).float() / 255
    with torch.no_grad():
        logits = loaded.model(x)
    assert [r["label"] for r in rows] == [loaded.classes[i] for i in logits.argmax(1).tolist()]
    expected = (logits / loaded.temperature).softmax(1).max(1).values
    assert [r["score"] for r in rows] == pytest.approx(expected.tolist(), abs=1e-4)


def test_unknown_rule_options_and_stable_columns(trained_run, model_file, tmp_path):
    img = trained_run["data"] / "val" / "cat" / "cat_0.jpg"
    always = predict_jsonl(model_file, img, extra=["--max-distance", "1e-6"])[0]
    assert always["unknown"] is True and always["label"] is None and always["top_k"][0]["label"] == "cat"
    tensors, meta = read_safetensors(Path(model_file))  # (a model whose own rule flags every image)
    write_safetensors(tmp_path / "strict.safetensors", tensors, {**meta, "unknown": {**meta["unknown"], "threshold": 1e-6}})
    assert predict_jsonl(tmp_path / "strict.safetensors", img)[0]["unknown"] is True
    never = predict_jsonl(tmp_path / "strict.safetensors", img, extra=["--no-unknown"])[0]
    assert never["unknown"] is False and never["label"] == "cat"
    both = runner.invoke(app, ["predict", str(img), "--model", model_file, "--max-distance", "1e-6", "--no-unknown"])
    assert both.exit_code == 2 and "--no-unknown answers a class for every image" in both.stderr  # (one was ignored)
    assert predict_jsonl(model_file, img, extra=["--min-score", "0"])[0]["unknown"] is False
    # A high temperature: a top score well below 1, on either side of which --min-score is put
    tensors, meta = read_safetensors(Path(model_file))
    write_safetensors(tmp_path / "warm.safetensors", tensors, {**meta, "calibration": {**meta["calibration"], "temperature": 50.0}})
    warm = str(tmp_path / "warm.safetensors")
    score = predict_jsonl(warm, img, extra=["--no-unknown"])[0]["score"]
    assert score < 0.9
    unsure = predict_jsonl(warm, img, extra=["--min-score", f"{score + 0.01}"])[0]
    sure = predict_jsonl(warm, img, extra=["--min-score", f"{score - 0.01}", "--max-distance", "1e9"])[0]
    assert (unsure["unknown"], unsure["label"], sure["unknown"], sure["label"]) == (True, None, False, "cat")
    out = runner.invoke(app, ["predict", str(img), "--model", model_file, "--format", "csv", "--workers", "0", "--max-distance", "1e-6"])
    rows = list(csv.DictReader(io.StringIO(out.stdout)))
    assert list(rows[0]) == ["path", "label", "score", "unknown", "distance", "error"] and rows[0]["label"] == "" and rows[0]["unknown"] == "1"
    bad = runner.invoke(app, ["predict", str(img), "--model", model_file, "--min-score", "2"])
    assert bad.exit_code == 2 and "--min-score must be between 0 and 1" in bad.stderr


def test_own_val_images_are_known_and_a_foreign_one_is_not(trained_run, model_file, tmp_path):
    val = sorted((trained_run["data"] / "val").rglob("*.jpg"))
    assert not any(r["unknown"] for r in predict_jsonl(model_file, *val))
    evaluated = runner.invoke(app, ["evaluate", str(trained_run["data"]), "--model", model_file, "--json", "--workers", "0"])
    figures = json.loads(evaluated.stdout)["unknown"]
    assert figures["flagged"] == 0 and figures["coverage"] == 1.0
    everything = runner.invoke(app, ["evaluate", str(trained_run["data"]), "--model", model_file, "--json", "--workers", "0",
                                     "--max-distance", "1e-6"])
    assert json.loads(everything.stdout)["unknown"]["coverage"] == 0.0
    stripes = tmp_path / "stripes.png"
    Image.fromarray(((np.indices((32, 40)).sum(0) // 4 % 2) * 255).astype(np.uint8)).save(stripes)
    foreign = predict_jsonl(model_file, stripes)[0]
    assert foreign["unknown"] is True and foreign["label"] is None
    assert foreign["distance"] > max(r["distance"] for r in predict_jsonl(model_file, *val))


def test_old_model_files_predict_as_before(model_file, tmp_path):
    tensors, meta = read_safetensors(__import__("pathlib").Path(model_file))
    old = {k: v for k, v in tensors.items() if not k.startswith("distance.")}
    old_meta = {k: v for k, v in meta.items() if k not in ("calibration", "unknown")}
    write_safetensors(tmp_path / "old.safetensors", old, old_meta)
    loaded = read_model_file(tmp_path / "old.safetensors")
    assert loaded.temperature == 1.0 and loaded.distance is None and loaded.distance_threshold is None
    img = make_image(tmp_path / "x.png", (220, 40, 40))
    row = predict_jsonl(tmp_path / "old.safetensors", img)[0]
    assert row["unknown"] is False and row["distance"] is None and row["label"] is not None
    damaged = dict(tensors, **{"distance.mean": torch.zeros(3)})
    write_safetensors(tmp_path / "damaged.safetensors", damaged, meta)
    with pytest.raises(ModelFileError, match="unknown rule's tensors are damaged"):
        read_model_file(tmp_path / "damaged.safetensors")


def test_the_export_applies_the_temperature(model_file, tmp_path):
    from finetune.exporting import ProbabilityModel, check_images, export

    tensors, meta = read_safetensors(__import__("pathlib").Path(model_file))
    meta = dict(meta, calibration={**meta["calibration"], "temperature": 3.0})
    write_safetensors(tmp_path / "hot.safetensors", tensors, meta)
    loaded = read_model_file(tmp_path / "hot.safetensors")
    result = export(loaded, "torchscript", tmp_path / "hot.pt")
    images = check_images(loaded.preprocessing.img_size)
    with torch.no_grad():
        exported = torch.jit.load(str(result.path))(images)
        expected = (loaded.model.float()(images) / 3.0).softmax(1)
    assert torch.allclose(exported, expected, atol=1e-5)
    assert not torch.allclose(exported, ProbabilityModel(loaded.model)(images), atol=1e-3)
    assert json.loads(result.sidecar.read_text())["temperature"] == 3.0
