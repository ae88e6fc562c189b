"""The adaptive recipe: how many views, which head (chosen on val), the multi-layer model file,
and fine-tuning that starts from the head's model instead of first making it worse."""

from __future__ import annotations

import csv
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from finetune import TrainConfig, load_model, train
from finetune.cli import app
from finetune.errors import TrainingInterrupted
from finetune.recipe import (best_candidate, candidates, growth_steps, learning_order, more_images_pay, norm_statistics,
                             views_for)
from finetune.records import HeadChoice

from conftest import FAST_TRAIN_ARGS, make_train_val, tree_hashes

runner = CliRunner()


@pytest.mark.parametrize("images, requested, expected", [
    (120, None, 4), (245, None, 4), (1000, None, 4), (1200, None, 3), (2000, None, 2), (3000, None, 2), (3636, None, 1),
    (1_000_000, None, 1), (245, 1, 1), (50_000, 3, 3),
])
def test_views_follow_the_number_of_training_images(images, requested, expected):
    assert views_for(images, requested) == expected


def test_candidates_are_every_kind_of_head_worth_trying():
    assert candidates(4) == [HeadChoice(1, False), HeadChoice(1, True), HeadChoice(4, False), HeadChoice(4, True)]
    assert candidates(1) == [HeadChoice(1, False), HeadChoice(1, True)]
    assert candidates(4, "final") == [HeadChoice(1, False), HeadChoice(4, False)]
    assert candidates(1, "multi") == [HeadChoice(1, True)]


def score(views, multi, acc, loss):
    return {"views": views, "multi_layer": multi, "val_acc": acc, "val_loss": loss, "epoch": 1}


def test_the_best_val_accuracy_wins_then_the_lower_loss_then_the_first():
    assert best_candidate([score(1, False, 0.90, 0.3), score(1, True, 0.95, 0.5)]) == HeadChoice(1, True)
    assert best_candidate([score(1, False, 0.95, 0.3), score(4, False, 0.95, 0.2)]) == HeadChoice(4, False)
    assert best_candidate([score(1, False, 0.95, 0.3), score(4, True, 0.95, 0.3)]) == HeadChoice(1, False)


def test_feature_statistics_do_not_blow_up_a_constant_feature():
    train = torch.zeros(10, 2, 3)
    train[..., 0] = torch.arange(20.0).view(10, 2)  # varies
    train[..., 1] = 5.0  # constant on the training images
    mean, std = norm_statistics(train)
    average_variance = train.reshape(-1, 3).var(0).mean()
    assert mean[1] == 5.0 and std[1] == pytest.approx(float((0.01 * average_variance).sqrt()))  # a floor, not 1e-6
    assert torch.allclose(std[0], train[..., 0].flatten().std(), rtol=0.05)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_train_val(tmp_path_factory.mktemp("recipe") / "data")


def test_a_multi_layer_model_trains_predicts_evaluates_and_exports(data, tmp_path):
    before = tree_hashes(data)
    result = runner.invoke(app, ["train", str(data), "--runs-dir", str(tmp_path), "--json", "--head-features", "multi", *FAST_TRAIN_ARGS])
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["recipe"]["head"] == {"views": 1, "multi_layer": True} or summary["recipe"]["head"]["multi_layer"]
    assert {(c["views"], c["multi_layer"]) for c in summary["recipe"]["candidates"]} == {(1, True), (2, True)}
    loaded = load_model(Path(summary["run_dir"]))
    assert loaded.meta["features"] == {"multi_layer": True} and loaded.model.multi_layer
    assert loaded.model.head[1].in_features == loaded.model.all_dim == 2064
    assert loaded.model.feature_norm.std.min() > 0 and not torch.all(loaded.model.feature_norm.mean == 0)
    evaluated = json.loads(runner.invoke(app, ["evaluate", str(data), "--model", summary["model"], "--json", "--workers", "0"]).stdout)
    assert evaluated["accuracy"] == summary["best_val_acc"]  # the same model the run measured
    exported = runner.invoke(app, ["export", "--model", summary["model"], "--format", "torchscript", "--out", str(tmp_path / "m.pt"), "--json"])
    assert exported.exit_code == 0 and json.loads(exported.stdout)["max_abs_diff"] <= 1e-4
    assert tree_hashes(data) == before


def test_the_head_trained_after_the_choice_is_the_winning_candidate(data, tmp_path):
    result = train(TrainConfig(data=data, runs_dir=tmp_path, arch="efficientnet_lite0", img_size=64, epochs=4, views=2,
                               workers=0, batch_size=8))
    chosen = result.recipe["head"]
    winner = next(c for c in result.recipe["candidates"] if (c["views"], c["multi_layer"]) == (chosen["views"], chosen["multi_layer"]))
    assert result.best_epoch == winner["epoch"] and result.best_val_acc == round(winner["val_acc"], 4)
    assert result.history[winner["epoch"] - 1].val_loss == pytest.approx(winner["val_loss"], abs=1e-6)


class CtrlCAtHead:
    """A reporter that presses Ctrl-C at the second epoch of the recorded head stage."""

    def __init__(self):
        self.count = 0

    def start(self, description, total):
        self.on = description.startswith("Head")

    def advance(self, steps=1, **fields):
        if self.on and steps:
            self.count += 1
            if self.count == 2:
                raise KeyboardInterrupt

    def finish(self):
        pass

    def epoch(self, record):
        pass

    def info(self, message):
        pass

    def warn(self, message):
        pass


def test_a_multi_layer_head_stage_resumes_to_the_same_run(data, tmp_path):
    cfg = TrainConfig(data=data, runs_dir=tmp_path / "a", arch="efficientnet_lite0", img_size=64, epochs=3, views=2,
                      workers=0, batch_size=8, head_features="multi", finetune_epochs=1)
    reference = train(cfg)
    with pytest.raises(TrainingInterrupted):
        train(replace(cfg, runs_dir=tmp_path / "b"), CtrlCAtHead())
    resumed = train(TrainConfig(resume=tmp_path / "b" / "train"))
    assert [r.to_csv_row()["val_loss"] for r in resumed.history] == [r.to_csv_row()["val_loss"] for r in reference.history]
    saved, expected = load_model(resumed.run_dir).model.state_dict(), load_model(reference.run_dir).model.state_dict()
    assert all(torch.equal(saved[k], expected[k]) for k in expected)


def test_fine_tuning_starts_from_the_heads_model(data, tmp_path):
    """BatchNorm's statistics stay as they were: with a learning rate too small to move the weights,
    the first fine-tuning epoch's val loss is the head's, not a worse one."""
    result = train(TrainConfig(data=data, runs_dir=tmp_path, arch="efficientnet_lite0", img_size=64, epochs=3, views=2,
                               workers=0, batch_size=8, finetune_epochs=1, lr=1e-12))
    head_best = min((r for r in result.history if r.stage == "head"), key=lambda r: (-r.val_acc, r.val_loss))
    first_finetune = next(r for r in result.history if r.stage == "finetune")
    assert first_finetune.val_loss == pytest.approx(head_best.val_loss, abs=1e-4)
    rows = list(csv.DictReader(open(result.run_dir / "metrics.csv")))
    assert [r["stage"] for r in rows] == ["head"] * 3 + ["finetune"]


def test_growth_steps_double_from_the_first_step_up_to_all():
    assert growth_steps(8_000) == [8_000]
    assert growth_steps(8_001) == [4_000, 8_000, 8_001]
    assert growth_steps(25_000) == [4_000, 8_000, 16_000, 25_000]
    assert growth_steps(16_000) == [4_000, 8_000, 16_000]


@pytest.mark.parametrize("prev, acc, n_val, pays", [
    (0.90, 0.92, 1000, True),     # a fifth of the error gone
    (0.990, 0.9902, 5000, False),  # one val image: noise
    (0.990, 0.9905, 5000, False),  # 5% of the error: not worth doubling again
    (0.980, 0.983, 5000, True),
    (0.95, 0.94, 1000, False),
])
def test_more_images_pay_only_when_they_cut_the_val_error_by_a_tenth(prev, acc, n_val, pays):
    assert more_images_pay(prev, acc, n_val) is pays


def test_learning_order_keeps_the_classes_in_proportion_in_every_prefix():
    from finetune.data import Sample

    samples = [Sample(Path(f"a{i}"), 0) for i in range(300)] + [Sample(Path(f"b{i}"), 1) for i in range(100)]
    order = learning_order(samples, seed=0)
    assert sorted(map(str, (s.path for s in order))) == sorted(map(str, (s.path for s in samples)))
    for k in (4, 40, 100, 400):
        assert abs(sum(s.label for s in order[:k]) - k / 4) <= 1
    assert order == learning_order(samples, seed=0) and order != learning_order(samples, seed=1)


@pytest.fixture
def growing(tmp_path, monkeypatch) -> TrainConfig:
    """30 training images, grown from 6 in doublings beyond 8 (the real thresholds: 4,000 and 8,000)."""
    from finetune import recipe

    monkeypatch.setattr(recipe, "GROW_FROM", 8)
    monkeypatch.setattr(recipe, "FIRST_STEP", 6)
    data = make_train_val(tmp_path / "data", n_train=10, n_val=4)
    return TrainConfig(data=data, arch="efficientnet_lite0", img_size=64, epochs=3, views=1, workers=0, batch_size=8,
                       runs_dir=tmp_path / "runs", finetune_epochs=1)


def test_a_large_training_set_grows_while_more_images_pay(growing):
    cfg = growing
    grown = train(cfg)
    curve = grown.recipe["learning_curve"]
    # 6 images (2 a class) are too few, 12 pay, 24 add nothing: the head and the fine-tuning use 24 of 30
    assert [c["images"] for c in curve] == [6, 12, 24], curve
    assert curve[0]["val_acc"] < curve[1]["val_acc"] == curve[2]["val_acc"] == 1.0, curve
    assert grown.num_train == 24 and [r.stage for r in grown.history].count("finetune") == 1
    assert grown.feature_cache["hits"] == (6 + 12) + (12 + 12)  # each step read the last one's train and val features back
    every = train(replace(cfg, all_images=True))
    assert every.num_train == 30 and every.recipe["learning_curve"] is None


@pytest.mark.parametrize("stage, n", [("Fine-tune epoch 2", 1), ("Head", 2)])
def test_a_grown_training_set_is_the_same_after_a_resume(growing, tmp_path, stage, n):
    from test_resume import CtrlCAt, compared

    cfg = replace(growing, runs_dir=tmp_path / "ref", finetune_epochs=2)
    ref = train(cfg)
    with pytest.raises(TrainingInterrupted):
        train(replace(cfg, runs_dir=tmp_path / "runs"), CtrlCAt(stage, n))
    resumed = train(TrainConfig(resume=tmp_path / "runs" / "train"))
    assert resumed.num_train == ref.num_train == 24  # the same images as the uninterrupted run
    assert compared(resumed.history) == compared(ref.history)
    assert resumed.recipe["learning_curve"] == ref.recipe["learning_curve"]
