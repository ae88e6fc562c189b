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

from finetune import Reporter, TrainConfig, load_model, train
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


class Bars(Reporter):
    def __init__(self):
        self.started = []

    def start(self, description, total):
        self.started.append(description)


def test_the_head_stage_is_the_winning_candidate_not_trained_again(data, tmp_path):
    bars = Bars()
    result = train(TrainConfig(data=data, runs_dir=tmp_path, arch="efficientnet_lite0", img_size=64, epochs=4, views=2,
                               workers=0, batch_size=8), bars)
    assert [b for b in bars.started if b.startswith("Head")] == ["Head 1 of 4", "Head 2 of 4", "Head 3 of 4", "Head 4 of 4"]
    chosen = result.recipe["head"]
    winner = next(c for c in result.recipe["candidates"] if (c["views"], c["multi_layer"]) == (chosen["views"], chosen["multi_layer"]))
    assert result.best_epoch == winner["epoch"] and result.best_val_acc == round(winner["val_acc"], 4)
    assert result.history[winner["epoch"] - 1].val_loss == pytest.approx(winner["val_loss"], abs=1e-6)


def test_a_run_resumed_after_its_multi_layer_head_is_the_same_run(data, tmp_path):
    from test_resume import CtrlCAt

    cfg = TrainConfig(data=data, runs_dir=tmp_path / "a", arch="efficientnet_lite0", img_size=64, epochs=3, views=2,
                      workers=0, batch_size=8, head_features="multi", tail_epochs=0, finetune_epochs=1)
    reference = train(cfg)
    with pytest.raises(TrainingInterrupted, match="--resume"):  # from the state the adopted head left: its statistics too
        train(replace(cfg, runs_dir=tmp_path / "b"), CtrlCAt("Fine-tune epoch 1", 1))
    resumed = train(TrainConfig(resume=tmp_path / "b" / "train"))
    assert [r.to_csv_row()["val_loss"] for r in resumed.history] == [r.to_csv_row()["val_loss"] for r in reference.history]
    saved, expected = load_model(resumed.run_dir).model.state_dict(), load_model(reference.run_dir).model.state_dict()
    assert all(torch.equal(saved[k], expected[k]) for k in expected)


def test_fine_tuning_starts_from_the_heads_model(data, tmp_path):
    """BatchNorm's statistics stay as they were: with a learning rate too small to move the weights,
    the first fine-tuning epoch's val loss is the head's, not a worse one."""
    result = train(TrainConfig(data=data, runs_dir=tmp_path, arch="efficientnet_lite0", img_size=64, epochs=3, views=2,
                               workers=0, batch_size=8, tail_epochs=0, finetune_epochs=1, lr=1e-12))
    head_best = min((r for r in result.history if r.stage == "head"), key=lambda r: (-r.val_acc, r.val_loss))
    first_finetune = next(r for r in result.history if r.stage == "finetune")
    assert first_finetune.val_loss == pytest.approx(head_best.val_loss, abs=1e-4)
    rows = list(csv.DictReader(open(result.run_dir / "metrics.csv")))
    assert [r["stage"] for r in rows] == ["head"] * 3 + ["finetune"]


def test_growth_steps_double_from_the_first_step_up_to_all():
    assert growth_steps(8_000) == [8_000]
    assert growth_steps(8_001) == [2_000, 4_000, 8_000, 8_001]
    assert growth_steps(25_000) == [2_000, 4_000, 8_000, 16_000, 25_000]
    assert growth_steps(16_000) == [2_000, 4_000, 8_000, 16_000]


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
    bars = Bars()
    grown = train(cfg, bars)
    # the last step's quick head is a candidate: the bars count the one left to train
    assert [b for b in bars.started if b.startswith("Head")] == ["Head on 6 images", "Head on 12 images", "Head on 24 images",
                                                                  "Head 1 of 1"]
    curve = grown.recipe["learning_curve"]
    # 6 images (2 a class) are too few, 12 pay, 24 add nothing: the head and the fine-tuning use 24 of 30
    assert [c["images"] for c in curve] == [6, 12, 24], curve
    assert curve[0]["val_acc"] < curve[1]["val_acc"] == curve[2]["val_acc"] == 1.0, curve
    assert grown.num_train == 24 and [r.stage for r in grown.history].count("finetune") == 1
    # Each step read the last one's train and val features back: not hits (this run computed them),
    # and each image counted once (24 training images, 12 val).
    assert grown.feature_cache["hits"] == 0 and grown.feature_cache["computed"] == 24 + 12
    again = train(cfg)
    assert again.feature_cache["hits"] == 24 + 12 and again.feature_cache["computed"] == 0
    every = train(replace(cfg, all_images=True))
    assert every.num_train == 30 and every.recipe["learning_curve"] is None
    assert every.feature_cache["hits"] == 24 + 12 and every.feature_cache["computed"] == 6


def test_the_last_growth_steps_head_is_the_candidate_trained_again(growing, tmp_path, monkeypatch):
    from finetune import training
    from test_resume import compared

    reused = train(growing)  # its (plain view, final features) candidate is the last growth step's head
    grow = training.grow_training_set
    monkeypatch.setattr(training, "grow_training_set", lambda *a: (*grow(*a)[:2], {}))  # every candidate trained
    fresh = train(replace(growing, runs_dir=tmp_path / "fresh"))
    assert reused.recipe["candidates"] == fresh.recipe["candidates"]  # val acc, val loss and best epoch alike
    assert compared(reused.history) == compared(fresh.history)


@pytest.mark.parametrize("stage, n", [("Fine-tune epoch 2", 1), ("Fine-tune epoch 1", 1)])  # after the head stage, too
def test_a_grown_training_set_is_the_same_after_a_resume(growing, tmp_path, stage, n):
    from test_resume import CtrlCAt, compared

    cfg = replace(growing, runs_dir=tmp_path / "ref", finetune_epochs=2, tail_epochs=0)
    ref = train(cfg)
    with pytest.raises(TrainingInterrupted):
        train(replace(cfg, runs_dir=tmp_path / "runs"), CtrlCAt(stage, n))
    resumed = train(TrainConfig(resume=tmp_path / "runs" / "train"))
    assert resumed.num_train == ref.num_train == 24  # the same images as the uninterrupted run
    assert compared(resumed.history) == compared(ref.history)
    assert resumed.recipe["learning_curve"] == ref.recipe["learning_curve"]


# The tail stage: the backbone's last blocks trained with the head on activations the feature pass kept.

@pytest.mark.parametrize("requested, unavailable, acc, multi, seconds, epochs, why", [
    (3, None, 1.0, False, None, 3, "as asked"),  # asked for: whatever the signals
    (0, None, 0.5, True, 1.0, 0, "as asked"),
    (None, "resnet9 has no tail stage here", 0.5, True, None, 0, "no tail stage here"),
    (None, None, 0.995, False, None, 0, "fits 99.5%"),  # the head fits on the final features: nothing to gain
    (None, None, 0.92, False, 10.0, 4, "fits only 92.0%"),  # it underfits, and 4 epochs take 40 s
    (None, None, 0.999, True, 10.0, 4, "unlike ImageNet's"),  # every stage's features won: the images are unlike ImageNet's
    (None, None, 0.92, False, 100.0, 0, "--tail-epochs 4 or --time-budget runs them"),  # 400 s: over the budget, and the run says how to ask
])
def test_the_tail_is_planned_from_the_heads_fit_and_its_cost(requested, unavailable, acc, multi, seconds, epochs, why):
    from finetune.recipe import plan_tail

    planned, reason = plan_tail(requested, unavailable, acc, multi, seconds, head_val_acc=0.97)
    assert planned == epochs and why in reason
    if epochs and requested is None:  # a --time-budget fits what it can: here 4 epochs of 10 s, then 2, then none
        assert plan_tail(requested, unavailable, acc, multi, seconds, 0.97, budget_s=1000.0)[0] == 4
        assert plan_tail(requested, unavailable, acc, multi, seconds, 0.97, budget_s=25.0)[0] == 2
        assert "the time budget has 5 s left" in plan_tail(requested, unavailable, acc, multi, seconds, 0.97, budget_s=5.0)[1]
    if requested is None and unavailable is None:  # a head right on every val image: no tail epoch could be kept
        assert plan_tail(requested, unavailable, acc, multi, seconds, head_val_acc=1.0)[0] == 0


@pytest.mark.parametrize("arch, size", [("efficientnet_lite0", 64), ("resnet18", 64)])
def test_rows_hold_the_tail_input_and_give_back_every_stages_features(arch, size):
    from finetune.models import build_classifier, get_arch

    torch.manual_seed(0)
    model = build_classifier(get_arch(arch), 3).eval()
    x = torch.rand(2, 3, size, size)
    with torch.no_grad():
        stages = model.all_stage_features(x)
        assert torch.equal(model.rows(x), stages)  # nothing kept until asked
        model.keep_tail_input(get_arch(arch).tail_input_shape(size))
        rows = model.rows(x)
        assert rows.shape[1] == model.row_dim > model.all_dim and torch.equal(rows[:, -model.all_dim:], stages)
        assert torch.allclose(model.stages_from_rows(rows), stages, atol=1e-5)
        # the rows follow the tail's weights: changed weights, changed stages (the trunk's part as cached)
        for p in model.tail_parameters():
            p.mul_(0.5)
        moved = model.stages_from_rows(rows)
    # (relative: a random backbone's final features can be as small as 1e-9, within allclose's default atol)
    assert not torch.allclose(moved[:, -model.final_dim:], stages[:, -model.final_dim:], rtol=1e-3, atol=0)
    assert torch.equal(moved[:, :16], stages[:, :16])  # the first stage is the trunk's: read from the rows
    assert all(name.startswith("backbone.") for name in model.tail_prefixes())


def tail_stage_on_rows():
    """A one-epoch tail stage of a random Lite0 on 12 rows of 3 classes, and the Run to fit it in."""
    from finetune.data import DatasetSplit, Sample
    from finetune.features import FeatureSet
    from finetune.fit import Run
    from finetune.models import build_classifier, get_arch
    from finetune.progress import Reporter
    from finetune.runs import RunFolder
    from finetune.stages import TailStage, make_loss

    spec = get_arch("efficientnet_lite0")
    model = build_classifier(spec, 3)
    model.keep_tail_input(spec.tail_input_shape(64))
    torch.manual_seed(0)
    labels = torch.arange(12) % 3
    with torch.no_grad():
        rows = model.eval().rows(torch.rand(12, 3, 64, 64) * 0.2 + labels.view(-1, 1, 1, 1) * 0.3).half()
    cfg = TrainConfig(epochs=1, batch_size=4, lr=1e-2)
    split = DatasetSplit(["a", "b", "c"], [Sample(Path(f"{i}.png"), int(y)) for i, y in enumerate(labels)], [], "class folders")
    stage = TailStage(model, FeatureSet(rows[:, None], labels, rows, labels), make_loss(cfg, [4, 4, 4], torch.device("cpu")),
                      cfg, torch.device("cpu"), epochs=1)
    return model, stage, Run(cfg, model, split, spec.preprocessing(64), RunFolder(Path("."), writes=False), Reporter(), "")


def test_stage_chunks_run_the_tail_in_the_devices_precision_and_leave_the_callers_code_in_fp32(monkeypatch):
    from finetune import models as models_module

    monkeypatch.setattr(models_module, "autocast_dtype", lambda device: torch.bfloat16)  # (as on an AMX CPU)
    model, stage, _ = tail_stage_on_rows()
    seen = []
    model.backbone._conv_head.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    with torch.inference_mode():
        for stages in model.eval().stage_chunks(stage.x_val, chunk=5):
            assert stages.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")  # (a distance computed here is fp32)
    assert seen == [torch.bfloat16] * 3  # 12 rows in chunks of 5


def test_a_tail_epoch_trains_the_last_blocks_and_the_head_and_nothing_else():
    from finetune.fit import fit_stage

    model, stage, run = tail_stage_on_rows()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fit_stage(stage, run)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert {"head.1.weight", "backbone._conv_head.weight", "backbone._blocks.15._expand_conv.weight"} <= changed
    assert all(k.startswith(stage.prefixes) for k in changed), changed
    assert not any("running_" in k for k in changed)  # BatchNorm's statistics stay as they were


def test_the_tail_trains_and_validates_in_the_devices_native_precision_and_the_head_in_fp32(monkeypatch):
    from finetune import stages as stages_module
    from finetune.fit import fit_stage

    monkeypatch.setattr(stages_module, "autocast_dtype", lambda device: torch.bfloat16)  # (as on an AMX CPU)
    model, stage, run = tail_stage_on_rows()
    blocks, head = set(), set()  # (rows in the batch, dtype) of each call
    model.backbone._conv_head.register_forward_hook(lambda m, i, out: blocks.add((len(out), out.dtype)))
    model.head[1].register_forward_hook(lambda m, i, out: head.add((len(out), i[0].dtype)))
    fit_stage(stage, run)
    # Batches of 4 train, the 12 val rows validate; the fold's check compares on 2 rows in fp32 (fold.py).
    assert blocks == {(4, torch.bfloat16), (12, torch.bfloat16), (2, torch.float32)}
    assert {dtype for n, dtype in head} == {torch.float32} and {n for n, dtype in head} >= {4, 12}
    assert run.best.val_logits.dtype == torch.float32


def test_the_tail_stage_trains_the_last_blocks_and_the_model_file_predicts_as_it_measured(data, tmp_path, monkeypatch):
    from finetune.tracking import BestEpoch

    before = tree_hashes(data)
    # Every epoch taken: the tail's last is kept, whose blocks are checked (the head's, val 1.0, was kept here)
    monkeypatch.setattr(BestEpoch, "takes", lambda self, record: True)
    args = ["train", str(data), "--runs-dir", str(tmp_path), "--json", *FAST_TRAIN_ARGS, "--tail-epochs", "2"]  # (the last one given counts)
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["recipe"]["tail"]["epochs"] == 2 and "as asked" in summary["recipe"]["tail"]["why"]
    assert summary["recipe"]["finetune"]["epochs"] == 0 and summary["recipe"]["finetune"]["images_per_s"] is None  # not measured on a CPU
    rows = list(csv.DictReader(open(Path(summary["run_dir"]) / "metrics.csv")))
    assert [r["stage"] for r in rows] == ["head"] * 3 + ["tail"] * 2
    loaded = load_model(Path(summary["run_dir"]))
    assert summary["best_epoch"] == 5  # the tail's model was kept: its last blocks differ from the frozen backbone's
    from finetune.models import build_classifier, get_arch
    from finetune.weights import resolve_pretrained

    spec = get_arch("efficientnet_lite0")
    frozen = build_classifier(spec, 3, resolve_pretrained(spec, None)[0]).state_dict()
    trained = loaded.model.state_dict()
    assert not torch.equal(trained["backbone._conv_head.weight"], frozen["backbone._conv_head.weight"])
    assert torch.equal(trained["backbone._blocks.14._project_conv.weight"], frozen["backbone._blocks.14._project_conv.weight"])
    evaluated = json.loads(runner.invoke(app, ["evaluate", str(data), "--model", summary["model"], "--json", "--workers", "0"]).stdout)
    assert evaluated["accuracy"] == summary["best_val_acc"]  # the model file is the model the run measured
    assert tree_hashes(data) == before


def test_a_planned_tail_trains_as_one_asked_for(tmp_path, monkeypatch):
    from finetune import recipe
    from test_resume import compared

    from conftest import CLASS_COLOURS, make_image

    monkeypatch.setattr(recipe, "TAIL_FIT", 1.01)  # every head "underfits": the plan is TAIL_EPOCHS epochs
    odd = make_train_val(tmp_path / "data")
    make_image(odd / "val" / "cat" / "odd.jpg", CLASS_COLOURS["dog"], seed=77)  # a dog filed as a cat: val below 1.0
    cfg = TrainConfig(data=odd, runs_dir=tmp_path / "a", arch="efficientnet_lite0", img_size=64, epochs=3, views=2,
                      workers=0, batch_size=8)
    planned = train(cfg)
    assert planned.recipe["tail"]["epochs"] == recipe.TAIL_EPOCHS and planned.recipe["tail"]["epoch_seconds"] > 0
    asked = train(replace(cfg, runs_dir=tmp_path / "b", tail_epochs=recipe.TAIL_EPOCHS))
    assert asked.recipe["tail"]["why"] == "as asked by --tail-epochs"
    assert compared(planned.history) == compared(asked.history)  # measuring the throughput changed nothing


@pytest.mark.parametrize("requested, val_acc, rate, num_train, budget, epochs, why", [
    (2, 1.0, None, 5_000, None, 2, "as asked"),  # asked for: whatever the signals
    (0, 0.9, 5000.0, 5_000, 1e6, 0, "as asked"),
    (None, 0.9, None, 5_000, None, 0, "CPU"),  # not measured: a CPU trains the whole network at some images a second
    (None, 1.0, 5000.0, 5_000, 1e6, 0, "every val image"),  # nothing an epoch could show better
    (None, 0.9, 5000.0, 5_000, None, 5, "5000 images/s"),  # 5 epochs of 5,000 images: 5 s
    (None, 0.9, 150.0, 5_000, None, 0, "--finetune-epochs 5 runs them"),  # under the fast pace, though 5 epochs would take 167 s
    (None, 0.9, 300.0, 25_000, None, 0, "about 417 s"),  # fast, but 5 epochs of 25,000 images: over 5 minutes
    (None, 0.9, 10.0, 1_000, 250.0, 2, "about 100 s an epoch"),  # a CPU with a time budget: what fits
    (None, 0.9, 10.0, 1_000, 50.0, 0, "the time budget has 50 s left"),
    (None, 0.9, 5000.0, 5_000, 1e6, 10, "time budget"),  # a budget plans at most 10
])
def test_finetuning_is_planned_from_the_devices_pace(requested, val_acc, rate, num_train, budget, epochs, why):
    from finetune.recipe import plan_finetune

    planned, reason = plan_finetune(requested, val_acc, rate, rate and num_train / rate, budget)
    assert planned == epochs and why in reason


def test_planned_finetuning_trains_as_one_asked_for_and_resumes_with_its_plan(tmp_path, monkeypatch):
    from finetune import recipe, training
    from test_resume import CtrlCAt, compared, config

    from conftest import CLASS_COLOURS, make_image

    monkeypatch.setattr(training, "SLOW_DEVICES", ())  # the pace is measured on this CPU too
    monkeypatch.setattr(recipe, "FAST_TRAINING_RATE", 0.0)  # and counts as fast
    monkeypatch.setattr(recipe, "FINETUNE_EPOCHS", 2)
    odd = make_train_val(tmp_path / "data")
    make_image(odd / "val" / "cat" / "odd.jpg", CLASS_COLOURS["dog"], seed=77)  # a dog filed as a cat: val below 1.0
    cfg = config(odd, tmp_path / "a", finetune_epochs=None)
    with pytest.raises(TrainingInterrupted):
        train(cfg, CtrlCAt("Fine-tune epoch 2", 1))
    monkeypatch.setattr(recipe, "FINETUNE_EPOCHS", 7)  # a resumed run goes on with the plan it had made
    planned = train(TrainConfig(resume=tmp_path / "a" / "train"))
    assert planned.recipe["finetune"]["epochs"] == 2 and planned.recipe["finetune"]["images_per_s"] > 0
    asked = train(replace(cfg, runs_dir=tmp_path / "b", finetune_epochs=2))
    assert asked.recipe["finetune"] == {"epochs": 2, "why": "as asked by --finetune-epochs", "images_per_s": None}
    assert compared(planned.history) == compared(asked.history)  # measuring the pace changed nothing


def test_finetunings_pace_is_measured_from_its_own_steps_with_or_without_cached_features(tmp_path, monkeypatch):
    # The plan's pace is a few of fine-tuning's own steps over its loader: a second run whose
    # features all come from the cache decodes nothing for them, and still measures it so (it once
    # planned from the network's passes alone).
    from finetune import data, fit, recipe, training

    from conftest import CLASS_COLOURS, make_image
    from test_resume import config

    monkeypatch.setenv("FINETUNE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(training, "SLOW_DEVICES", ())  # the pace is measured on this CPU, as off it
    monkeypatch.setattr(recipe, "FAST_TRAINING_RATE", 0.0)
    monkeypatch.setattr(recipe, "FINETUNE_EPOCHS", 1)
    reads, paces = [], []
    read = data.ImageFileDataset.__getitem__
    monkeypatch.setattr(data.ImageFileDataset, "__getitem__", lambda ds, i: reads.append(i) or read(ds, i))

    def measured(stage, seconds):
        before = len(reads)
        paces.append((fit.measure_pace(stage, seconds), len(reads) - before))
        return paces[-1][0]

    monkeypatch.setattr(training, "measure_pace", measured)
    odd = make_train_val(tmp_path / "data")
    make_image(odd / "val" / "cat" / "odd.jpg", CLASS_COLOURS["dog"], seed=77)  # a dog filed as a cat: val below 1.0
    cfg = config(odd, tmp_path / "a", finetune_epochs=None, tail_epochs=0)
    first = train(cfg)
    second = train(replace(cfg, runs_dir=tmp_path / "b"))
    assert second.feature_cache["computed"] == 0  # every row from the cache
    assert len(paces) == 2 and all(pace.images_per_s > 0 and pace.startup_s >= 0 for pace, _ in paces)
    assert all(0 < n <= first.num_train for _, n in paces)  # its own images, decoded by its loader
    assert [first.recipe["finetune"]["images_per_s"], second.recipe["finetune"]["images_per_s"]] == \
        [round(pace.images_per_s, 1) for pace, _ in paces]


def test_measuring_the_pace_takes_real_steps_on_a_copy_and_leaves_the_random_streams(tmp_path):
    from finetune.data import Sample
    from finetune.distributed import SINGLE
    from finetune.fit import measure_pace
    from finetune.models import build_classifier, get_arch
    from finetune.reading import scan_dataset
    from finetune.stages import FinetuneStage, make_loss

    from test_resume import config

    cfg = config(make_train_val(tmp_path / "data", n_train=6), tmp_path / "runs")
    split = scan_dataset(cfg.data, cfg.val_split, cfg.seed)
    spec = get_arch(cfg.arch)
    model = build_classifier(spec, len(split.classes)).to(memory_format=torch.channels_last)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stage = FinetuneStage(model, split, spec.preprocessing(cfg.img_size), make_loss(cfg, [6] * 3, torch.device("cpu")),
                          cfg, torch.device("cpu"), SINGLE, 1)
    rng = torch.random.get_rng_state()
    pace = measure_pace(stage, 0.0)  # 18 images in batches of 8: a warm-up step, then the two left in the epoch
    assert pace.images_per_s > 0 and pace.startup_s >= 0
    assert torch.equal(torch.random.get_rng_state(), rng)
    changed = [k for k, v in model.state_dict().items() if v.is_floating_point() and not torch.equal(v, before[k])]
    assert any(k.startswith("head.") for k in changed)  # the optimizer stepped (planning measures on a copy)
    assert pace.epoch_seconds(80, 30) == pytest.approx(2 * pace.startup_s + 90 / pace.images_per_s)
    unreadable = replace(split, train=[Sample(tmp_path / "gone.jpg", 0)] * 3)
    assert measure_pace(FinetuneStage(model, unreadable, spec.preprocessing(cfg.img_size), stage.loss, cfg,
                                      torch.device("cpu"), SINGLE, 1), 0.0) is None


@pytest.mark.parametrize("budget", ["1h", "1s"])
def test_a_time_budget_plans_the_later_stages_into_what_is_left(tmp_path, monkeypatch, budget):
    from finetune import recipe

    from conftest import CLASS_COLOURS, make_image

    monkeypatch.setattr(recipe, "TAIL_FIT", 1.01)  # every head "underfits": a tail is planned where it fits
    monkeypatch.setattr(recipe, "MAX_BUDGETED_FINETUNE_EPOCHS", 2)  # (an hour would fit 10: kept short)
    odd = make_train_val(tmp_path / "data")
    make_image(odd / "val" / "cat" / "odd.jpg", CLASS_COLOURS["dog"], seed=77)  # a dog filed as a cat: val below 1.0
    fast = list(FAST_TRAIN_ARGS)
    del fast[fast.index("--tail-epochs"):fast.index("--tail-epochs") + 2]  # planned, not asked for
    fast.remove("--quiet")  # what the run says of its plans is asserted
    if budget == "1s":  # these tiny images' feature pass can take under a second: the run's clock is a second on
        from finetune.fit import Run

        seconds_left = Run.seconds_left
        monkeypatch.setattr(Run, "seconds_left", lambda run: max(0.0, seconds_left(run) - 1.0))
    from finetune import training

    probes = []
    measure = training.measure_finetune_pace
    monkeypatch.setattr(training, "measure_finetune_pace", lambda *a: probes.append(1) or measure(*a))
    result = runner.invoke(app, ["train", str(odd), "--runs-dir", str(tmp_path / "runs"), "--json", *fast, "--time-budget", budget])
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    tail, finetune = summary["recipe"]["tail"], summary["recipe"]["finetune"]
    stages = [r["stage"] for r in csv.DictReader(open(Path(summary["run_dir"]) / "metrics.csv"))]
    if budget == "1h":  # the CPU's pace is measured, and what fits is planned
        assert tail["epochs"] == recipe.TAIL_EPOCHS and "time budget" in tail["why"]
        assert finetune["epochs"] == 2 and finetune["images_per_s"] > 0 and "time budget" in finetune["why"] and probes == [1]
        assert stages == ["head"] * 3 + ["tail"] * 4 + ["finetune"] * 2
        assert "fine-tuning: 2 epochs (" in result.stderr
    else:  # spent by the feature pass: the head's model, and the run says why
        assert tail["epochs"] == finetune["epochs"] == 0 and "the time budget has 0 s left" in tail["why"]
        assert finetune["why"] == "the time budget has 0 s left: too little to measure its pace" and not probes
        assert stages == ["head"] * 3
        assert "no tail stage:" in result.stderr and "time budget" in result.stderr


@pytest.mark.parametrize("left, reserve, epoch, stops", [(None, 0, 5, False), (10, 0, 5, False), (10, 0, 11, True),
                                                          (10, 6, 5, True), (10, 4, 5, False)])
def test_the_budget_stop_keeps_back_the_test_splits_share(left, reserve, epoch, stops):
    from types import SimpleNamespace

    from finetune.fit import no_time_for_another_epoch

    run = SimpleNamespace(seconds_left=lambda: left, budget_reserve_s=reserve)
    assert no_time_for_another_epoch(run, epoch) is stops


class Said(Reporter):
    def __init__(self):
        self.said = []

    def info(self, message):
        self.said.append(message)


def test_a_stage_the_time_budget_cannot_fit_another_epoch_of_stops_there(tmp_path, monkeypatch):
    # Planning measures a stage's pace before it starts; an epoch can still take longer than
    # planned (the state saved each epoch, small images), and the run must not go on past the budget.
    from finetune.fit import Run
    from finetune.records import Stage

    from conftest import CLASS_COLOURS, make_image
    from test_resume import config

    odd = make_train_val(tmp_path / "data")
    make_image(odd / "val" / "cat" / "odd.jpg", CLASS_COLOURS["dog"], seed=77)  # val below 1.0
    spent = lambda run: run.history and run.history[-1].stage is Stage.FINETUNE  # noqa: E731
    monkeypatch.setattr(Run, "seconds_left", lambda run: 0.0 if spent(run) else 3600.0)  # the clock runs out in fine-tuning
    said = Said()
    result = train(config(odd, tmp_path / "runs", tail_epochs=0, finetune_epochs=3, time_budget=3600.0), said)
    assert [r.stage for r in result.history].count(Stage.FINETUNE) == 1
    assert result.recipe["finetune"]["stopped_after"] == 1 and result.stopped_early
    assert "time budget: another epoch (" in "\n".join(said.said)
    assert ") would not fit in what is left: fine-tune stops after epoch 1 of 3" in "\n".join(said.said)


def test_tail_epochs_for_a_backbone_without_a_tail_is_a_one_line_error(data, tmp_path):
    result = runner.invoke(app, ["train", str(data), "--runs-dir", str(tmp_path), "--tail-epochs", "2", "--arch", "mobilenet_v3_small",
                                 "--no-pretrained", "--img-size", "64", "--workers", "0", "--quiet"])
    assert result.exit_code != 0
    assert "--tail-epochs 2: mobilenet_v3_small has no tail stage here" in result.stderr and "Traceback" not in result.stderr
    assert not list(tmp_path.glob("*/model.safetensors"))


def test_why_there_is_no_tail_says_a_small_table_in_figures_that_mean_something():
    """A trial: "its cached activations would take 0.0 GB, over --feature-memory-gb 0.01"."""
    from types import SimpleNamespace

    from finetune.models import get_arch
    from finetune.training import tail_unavailable

    cfg = TrainConfig(data="x", views=1, feature_memory_gb=0.01)
    split = SimpleNamespace(train=[None] * 1000, val=[None] * 20, test=[])
    spec = get_arch("efficientnet_lite0")
    why = tail_unavailable(cfg, spec, 100, (16, 32, 32), split)  # 1,020 rows of (100 + 16,384) x 2 bytes: 0.034 GB
    assert why == "its cached activations would take 0.034 GB, over --feature-memory-gb 0.01"
    assert "would take 2.0 GB" in tail_unavailable(cfg, spec, 100, (16, 32, 32), SimpleNamespace(train=[None] * 60_660,
                                                                                                val=[], test=[]))


def test_a_budget_an_epoch_cannot_fit_in_by_the_feature_pass_pace_is_not_spent_measuring_it(monkeypatch):
    """A trial: ResNet-18 on a CPU, 19 s of a 30 s budget left: 16.5 s went to measuring fine-tuning's
    pace (a warm-up step and two more) to find an epoch of 27 s would not fit."""
    from types import SimpleNamespace

    from finetune import training
    from finetune.distributed import SINGLE

    probes = []
    monkeypatch.setattr(training, "measure_finetune_pace", lambda *a: probes.append(1))
    said = Said()

    def run_with(left):
        return SimpleNamespace(finetune_plan=None, seconds_left=lambda: left, cfg=SimpleNamespace(finetune_epochs=None),
                               best=SimpleNamespace(acc=0.9), deadline=1.0, reporter=said,
                               feature_pass={"image_views": 270, "image_views_per_s": 15.0},
                               split=SimpleNamespace(train=[None] * 120, val=[None] * 30, test=[]))

    run = run_with(19.0)  # an epoch: at least (2 x 120 + 30) / 15 = 18 s ... which fits: measured
    assert training.least_epoch_seconds(run, SINGLE) == pytest.approx(18.0)
    training.plan_finetuning(run, None, torch.device("cpu"), SINGLE)
    assert probes == [1]
    run = run_with(17.0)
    training.plan_finetuning(run, None, torch.device("cpu"), SINGLE)
    assert probes == [1] and run.finetune_plan["epochs"] == 0  # not measured
    assert said.said[-1] == ("no fine-tuning: an epoch would take about 18 s or more (training passes cost 2 times the "
                             "feature pass's at least), over the 17 s the time budget has left")
    run.feature_pass["image_views"] = 150  # (a rerun computing a few new images: their pace is the workers' start)
    assert training.least_epoch_seconds(run, SINGLE) is None
