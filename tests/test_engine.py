"""The training engine's parts on their own: config rules, records, the kept epoch, early stopping,
the weights' average, the resume file format, and the library face `import finetune`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import finetune
from finetune import TrainConfig
from finetune.averaging import WeightAverage, named_in
from finetune.errors import UsageError
from finetune.records import EpochRecord, Stage
from finetune.resume import ResumeState
from finetune.tracking import BestEpoch, EarlyStopping, best_val_epoch


def record(epoch, val_acc, val_loss, stage=Stage.HEAD):
    return EpochRecord(epoch, stage, 0.5, 0.9, val_loss, val_acc, 1e-3, 0.1, 1000.0)


def test_a_time_budget_reads_as_people_write_durations():
    from finetune.config import parse_duration

    assert [parse_duration(t) for t in ("90s", "10m", "1h30m", "1.5h", "2m 30s", "45", "2m30", "1h30")] == \
        [90, 600, 5400, 5400, 150, 45, 150, 5400]  # (a last bare number in the next unit, as a clock reads)
    for bad in ("10x", "", "m", "-5", "0s", "30s5"):
        with pytest.raises(UsageError, match="--time-budget"):
            parse_duration(bad)
    with pytest.raises(UsageError, match=r"must be positive \(got '-1'\)"):  # (not "is not a duration")
        parse_duration("-1")


def test_unfreezing_means_five_finetune_epochs_for_library_users_too():
    assert TrainConfig(freeze_backbone=False).checked().finetune_epochs == 5
    assert TrainConfig(freeze_backbone=False, finetune_epochs=2).checked().finetune_epochs == 2
    default = TrainConfig().checked()  # planned during the run (recipe.plan_finetune)
    assert default.finetune_epochs is None and default.freeze_backbone is None
    frozen = TrainConfig(freeze_backbone=True).checked()
    assert frozen.finetune_epochs == 0 and frozen.freeze_backbone is True
    assert TrainConfig(finetune_epochs=0).checked().freeze_backbone is True
    with pytest.raises(UsageError, match="contradict"):
        TrainConfig(freeze_backbone=True, finetune_epochs=3).checked()
    with pytest.raises(UsageError, match="--views must be at least 1"):
        TrainConfig(views=0).checked()


def test_checked_config_survives_config_json():
    cfg = TrainConfig(data=Path("/d"), freeze_backbone=False).checked()
    again = TrainConfig.from_json_dict(json.loads(json.dumps(cfg.to_json_dict()))).checked()
    assert again == cfg


def test_the_kept_epoch_is_the_stages_last_unless_an_earlier_stage_was_better_on_val():
    model = torch.nn.Linear(2, 2)
    best = BestEpoch()
    logits = torch.tensor([[0.9, 0.1], [0.2, 0.8]])
    assert best.offer(record(1, 0.8, 0.5), model, logits)
    assert best.offer(record(2, 0.7, 0.6), model, torch.tensor([[0.4, 0.6], [0.3, 0.7]]))  # the first stage: its latest epoch
    assert best.epoch == 2 and best.val_logits.argmax(1).tolist() == [1, 1]
    # A later stage takes over only where it beats what the head stage ended on (0.7, then loss 0.6) ...
    assert not best.offer(record(3, 0.6, 0.2, Stage.TAIL), model, logits)
    assert best.offer(record(4, 0.7, 0.6, Stage.TAIL), model, logits)  # as good: the later model
    assert not best.offer(record(5, 0.7, 0.7, Stage.TAIL), model, logits)
    assert best.offer(record(6, 0.75, 0.9, Stage.TAIL), model, logits)
    # ... and is measured against the head's end, not against its own earlier epochs.
    assert best.offer(record(7, 0.72, 0.5, Stage.TAIL), model, logits)
    assert best.epoch == 7 and best.val_logits.argmax(1).tolist() == [0, 1]
    # Fine-tuning after it must beat the tail's kept epoch 7.
    assert not best.offer(record(8, 0.71, 0.1, Stage.FINETUNE), model, logits)
    assert best.epoch == 7 and best.to_beat == (0.72, 0.5)
    with torch.no_grad():
        model.weight.zero_()
    assert best.state["weight"].abs().sum() > 0  # a copy, not the live weights


def test_a_resumed_run_follows_the_rule_from_its_history():
    history = [record(1, 0.8, 0.5), record(2, 0.7, 0.6), record(3, 0.75, 0.4, Stage.TAIL), record(4, 0.6, 0.4, Stage.TAIL)]
    live, resumed = BestEpoch(), BestEpoch()
    for r in history:
        live.offer(r, torch.nn.Linear(1, 1), torch.zeros(1, 2))
    resumed.follow(history)
    assert (resumed.stage, resumed.to_beat) == (live.stage, live.to_beat) == (Stage.TAIL, (0.7, 0.6))
    for r in (record(5, 0.65, 0.1, Stage.TAIL), record(6, 0.9, 0.1, Stage.FINETUNE)):
        assert resumed.takes(r) == live.takes(r)


def test_early_stopping_waits_on_the_best_val_epoch():
    assert best_val_epoch([]) == 0
    assert best_val_epoch([record(1, 0.8, 0.5), record(2, 0.9, 0.6), record(3, 0.9, 0.4), record(4, 0.7, 0.1)]) == 3


def test_early_stopping_counts_from_the_stage_start():
    early = EarlyStopping(patience=2)
    assert not early.should_stop(Stage.HEAD, epochs_done=3, best_epoch=2, stage_first_epoch=1)
    assert early.should_stop(Stage.HEAD, epochs_done=4, best_epoch=2, stage_first_epoch=1)
    assert early.stopped_stage is Stage.HEAD and early.stopped_early
    # A new stage starting at epoch 5 gets its own patience, whatever the head's best epoch was.
    assert not early.should_stop(Stage.FINETUNE, epochs_done=5, best_epoch=2, stage_first_epoch=5)
    assert early.should_stop(Stage.FINETUNE, epochs_done=6, best_epoch=2, stage_first_epoch=5)
    assert not EarlyStopping(patience=0).should_stop(Stage.HEAD, 100, 1, 1)


def test_epoch_records_read_rows_of_older_states():
    old = {"epoch": 3, "stage": "head", "train_loss": 0.1234, "train_acc": 1.0, "val_loss": 0.2, "val_acc": 0.9,
           "lr": "0.000988", "seconds": 0.05, "images_per_s": 9796.8}
    r = EpochRecord.from_dict(old)
    assert r.stage is Stage.HEAD and r.lr == pytest.approx(0.000988)
    assert EpochRecord.from_dict(r.to_dict()) == r
    assert r.to_csv_row()["lr"] == "0.000988"


def test_the_weights_average_follows_the_steps_and_is_in_the_model_only_while_asked():
    layer = torch.nn.Linear(2, 1)
    with torch.no_grad():
        layer.weight.fill_(0.0)
        layer.bias.fill_(0.0)
    average = WeightAverage(named_in(layer, [layer.weight, layer.bias]), steps=4)
    assert [n for n, _ in named_in(layer, [layer.bias, layer.weight])] == ["bias", "weight"]
    for _ in range(2):  # two steps that each set the weights to 1: the average goes a quarter of the way each time
        with torch.no_grad():
            layer.weight.fill_(1.0)
        average.update()
    expected = 1 - 0.75 ** 2
    assert torch.allclose(average.state_dict()["weight"], torch.full((1, 2), expected))
    with average.in_model():
        assert torch.allclose(layer.weight, torch.full((1, 2), expected))  # validated and kept: the average
    assert torch.equal(layer.weight, torch.ones(1, 2))  # trained on: the weights as they were
    resumed = WeightAverage(named_in(layer, [layer.weight, layer.bias]), steps=4)
    resumed.load_state_dict({"weight": average.state_dict()["weight"]})  # (a state without "bias")
    assert torch.equal(resumed.state_dict()["weight"], average.state_dict()["weight"])
    assert torch.equal(resumed.state_dict()["bias"], layer.bias.detach())


def test_the_average_is_off_at_zero_epochs_and_refused_below():
    assert TrainConfig(average_epochs=0).checked().average_epochs == 0
    with pytest.raises(UsageError, match="average_epochs"):
        TrainConfig(average_epochs=-1).checked()


def test_fine_tuning_moves_the_blocks_before_the_tail_at_a_tenth_of_its_rate():
    from finetune.models import build_classifier, get_arch
    from finetune.stages import finetune_param_groups

    model = build_classifier(get_arch("efficientnet_lite0"), 2)
    groups = finetune_param_groups(model, 1e-4, 0.1)
    ids = lambda params: {id(p) for p in params}  # noqa: E731
    assert [g["lr"] for g in groups] == [pytest.approx(1e-5), 1e-4, 1e-4]
    assert groups[1]["params"] and ids(groups[1]["params"]) == ids(model.tail_parameters())
    assert not ids(groups[0]["params"]) & ids(groups[1]["params"])
    assert ids(groups[0]["params"]) | ids(groups[1]["params"]) == ids(model.backbone.parameters())
    assert ids(groups[2]["params"]) == ids(model.head.parameters())
    model.tail_steps = 0  # an arch without tail blocks: one rate for the whole backbone
    assert [g["lr"] for g in finetune_param_groups(model, 1e-4, 0.1)] == [1e-4, 1e-4]


def test_a_state_whose_optimizer_does_not_fit_the_stage_is_refused_in_one_line(tmp_path):
    from finetune.fit import load_optimizer_state

    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))
    older = torch.optim.AdamW([{"params": [a, b]}]).state_dict()  # one group where the stage now has two
    with pytest.raises(UsageError, match="saved by another version of finetune.*start a new run"):
        load_optimizer_state(torch.optim.AdamW([{"params": [a]}, {"params": [b]}]), older, tmp_path)


def test_resume_state_round_trip(tmp_path):
    head = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(head.parameters(), lr=1e-3)
    head(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    state = ResumeState(
        stage=Stage.HEAD, epoch=2, history=[record(1, 0.5, 1.0), record(2, 0.75, 0.5)],
        trainable={f"head.1.{k}": v for k, v in head.state_dict().items()}, optimizer=optimizer.state_dict(),
        schedule={"last_epoch": 7}, best_acc=0.75, best_loss=0.5, best_epoch=2,
        best_trainable={"head.1.weight": torch.zeros(2, 3)}, best_val_logits=torch.tensor([[-1.0, 2.0], [3.0, 0.5]]),
        rng={"torch": torch.get_rng_state()}, skipped=[{"path": "a.jpg", "reason": "bad"}], num_train=4, num_val=2,
        classes=["a", "b"], stopped_stage=None, files_digest="abc", average={"head.1.weight": torch.full((2, 3), 0.25)},
    )
    state.save(tmp_path / "s.safetensors")
    back = ResumeState.load(tmp_path / "s.safetensors")
    assert back.history == state.history and back.stage is Stage.HEAD and back.epoch == 2
    assert back.trainable.keys() == state.trainable.keys() and back.best_trainable.keys() == {"head.1.weight"}
    assert torch.equal(back.best_val_logits, state.best_val_logits) and torch.equal(back.rng["torch"], state.rng["torch"])
    assert back.average.keys() == {"head.1.weight"} and torch.equal(back.average["head.1.weight"], torch.full((2, 3), 0.25))
    fresh = torch.optim.AdamW(head.parameters(), lr=1e-3)
    fresh.load_state_dict(back.optimizer)
    assert torch.equal(fresh.state_dict()["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])
    (tmp_path / "s.safetensors").write_bytes(b"garbage")
    with pytest.raises(finetune.FinetuneError, match="training state is damaged"):
        ResumeState.load(tmp_path / "s.safetensors")


def test_import_finetune_is_light_and_lists_the_library():
    code = "import sys, finetune; print(sorted(finetune.__all__)); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.splitlines()
    for name in ("train", "load_model", "predict", "evaluate", "export", "TrainConfig", "FinetuneError"):
        assert name in out[0]
    assert out[1] == "False"  # torch loads on first use, not on import (the CLI's --help stays fast)


def test_the_library_face_end_to_end(trained_run, tmp_path):
    model = finetune.load_model(Path(trained_run["summary"]["run_dir"]))  # a run folder
    assert model.classes == ["cat", "dog", "fox"]
    val = trained_run["data"] / "val"
    predictions = list(finetune.predict(model, [val / "dog", tmp_path / "missing.jpg"], finetune.PredictConfig(workers=0)))
    assert [p.label for p in predictions[:3]] == ["dog"] * 3
    assert predictions[-1].error == "file not found"
    report = finetune.evaluate(model, trained_run["data"], finetune.PredictConfig(workers=0))
    assert isinstance(report, finetune.EvaluationReport) and report.num_images == 9
    assert report.accuracy == trained_run["summary"]["best_val_acc"]
    exported = finetune.export(model, "torchscript", tmp_path / "m.pt")
    assert exported.path.is_file() and exported.max_abs_diff <= 1e-4
    model.model.to(torch.bfloat16).train()  # (as a caller may hold it: export made it fp32 and eval)
    finetune.export(model, "torchscript", tmp_path / "m2.pt")
    assert next(model.model.parameters()).dtype == torch.bfloat16 and model.model.training
    with pytest.raises(finetune.FinetuneError, match="no trained model"):
        finetune.load_model(None, tmp_path / "no_runs")


def test_the_library_takes_paths_as_strings_and_wrong_types_as_one_line_errors(trained_run, tmp_path, monkeypatch):
    run_dir, val = trained_run["summary"]["run_dir"], trained_run["data"] / "val"
    one = list(finetune.predict(run_dir, str(val / "dog" / "dog_0.jpg"), finetune.PredictConfig(workers=0)))
    assert [(p.path, p.label) for p in one] == [(str(val / "dog" / "dog_0.jpg"), "dog")]  # one input, not one per letter
    monkeypatch.chdir(tmp_path)  # (a "." read as a folder would predict what is here)
    (tmp_path / "stray.jpg").write_bytes((val / "cat" / "cat_0.jpg").read_bytes())
    missing = list(finetune.predict(run_dir, Path("a.png"), finetune.PredictConfig(workers=0)))
    assert [(p.path, p.error) for p in missing] == [("a.png", "file not found")]
    assert finetune.export(run_dir, "torchscript", str(tmp_path / "m.pt")).path.is_file()
    assert finetune.evaluate(run_dir, str(trained_run["data"]), finetune.PredictConfig(workers=0)).num_images == 9
    with pytest.raises(finetune.FinetuneError, match=r"^--epochs must be a whole number \(got '5'\)\.$"):
        finetune.train(finetune.TrainConfig(data=str(trained_run["data"]), runs_dir=str(tmp_path / "runs"), epochs="5"))
    with pytest.raises(finetune.FinetuneError, match="train\\(\\) takes a TrainConfig"):
        finetune.train(str(trained_run["data"]))
    with pytest.raises(finetune.FinetuneError, match="a model is a finetune.load_model"):
        list(finetune.predict(42, "x.jpg"))
    budget = finetune.TrainConfig(data=str(trained_run["data"]), runs_dir=str(tmp_path / "runs"), time_budget="2m").checked()
    assert budget.time_budget == 120.0 and budget.data == trained_run["data"] and budget.runs_dir == tmp_path / "runs"
    import numpy as np  # (a sweep over np.arange hands NumPy numbers)

    swept = finetune.TrainConfig(data="photos", epochs=np.int64(5), lr=np.float32(0.5)).checked()
    assert (swept.epochs, swept.lr) == (5, 0.5) and type(swept.epochs) is int and type(swept.lr) is float
    for wrong, says in (({"data": None}, "data: give an image folder"), ({"arch": None}, "--arch must be a name")):
        with pytest.raises(finetune.FinetuneError, match=says):
            finetune.TrainConfig(**wrong).checked()
    for wrong, says in ((None, "got NoneType"), (5, "got int"), ([str(tmp_path / "a.jpg"), 2], "got int among them")):
        with pytest.raises(finetune.FinetuneError, match=f"inputs: give image files.*{says}"):
            finetune.predict(run_dir, wrong)  # (said when called: not at the first image read)
    with pytest.raises(finetune.FinetuneError, match="model file not found"):
        finetune.predict(tmp_path / "nowhere", ["x.jpg"])
    with pytest.raises(finetune.FinetuneError, match="--top-k must be at least 1"):
        finetune.predict(run_dir, ["x.jpg"], finetune.PredictConfig(top_k=0))
    for wrong in (3, None):
        with pytest.raises(finetune.FinetuneError, match="data: give the path of a folder of labelled images"):
            finetune.evaluate(run_dir, wrong)
    for wrong, says in (({"batch_size": "8"}, "--batch-size must be a whole number"), ({"top_k": 2.5}, "--top-k must be"),
                        ({"labels": 5}, "--labels must be a path"),  # (an AttributeError's traceback)
                        ({"min_score": "0.5"}, "--min-score must be a number"), ({"device": 0}, "--device must be a name")):
        with pytest.raises(finetune.FinetuneError, match=says):  # (each was a TypeError)
            finetune.predict(run_dir, ["x.jpg"], finetune.PredictConfig(**wrong))
        with pytest.raises(finetune.FinetuneError, match=says):
            finetune.evaluate(run_dir, trained_run["data"], finetune.PredictConfig(**wrong))
    for call, says in ((lambda: finetune.load_model(3), "model: give the path of a model file"),
                       (lambda: finetune.export(run_dir, "torchscript", 3.5), "out: give a file or folder path")):
        with pytest.raises(finetune.FinetuneError, match=says):  # (TypeErrors' tracebacks)
            call()
    typed = finetune.PredictConfig(model=str(run_dir), top_k=np.int64(2), min_score=np.float32(0.5)).checked()
    assert typed.model == Path(run_dir) and type(typed.top_k) is int and type(typed.min_score) is float


def test_the_library_leaves_its_callers_torch_and_process_state_as_it_found_it(trained_run, tmp_path):
    # (as a notebook or a service calls it: each of these was changed for good, or broke the caller)
    import random
    import signal

    model = finetune.load_model(trained_run["summary"]["run_dir"])
    for _ in finetune.predict(model, trained_run["data"] / "val" / "dog", finetune.PredictConfig(workers=1)):
        assert not torch.is_inference_mode_enabled() and torch.is_grad_enabled()  # (the caller's code between items)
    code = (f"import multiprocessing, finetune; list(finetune.predict({str(model.path)!r}, {str(trained_run['data'] / 'val')!r}, "
            f"finetune.PredictConfig(workers=1))); print(multiprocessing.get_start_method(allow_none=True))")
    fresh = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)  # (a process of its own:
    assert fresh.stdout.strip() == "None", fresh.stderr  # other tests fix it) loader workers took the default: fixed for good
    looking = finetune.predict(model, trained_run["data"] / "val", finetune.PredictConfig(workers=0))
    next(looking)  # (a notebook looks at the first prediction, then trains)
    own_handler = lambda signum, frame: None  # noqa: E731
    previous_handler = signal.signal(signal.SIGTERM, own_handler)
    threads, dtype = torch.get_num_threads(), torch.get_default_dtype()
    try:
        random.seed(12345)
        torch.manual_seed(12345)
        python_stream, torch_stream = random.getstate(), torch.get_rng_state()
        torch.set_default_dtype(torch.float64)
        torch.set_num_threads(threads + 3)
        with torch.no_grad():
            result = finetune.train(finetune.TrainConfig(data=trained_run["data"], runs_dir=tmp_path / "runs", arch="efficientnet_lite0",
                                                         img_size=64, epochs=2, views=1, tail_epochs=1, workers=0, batch_size=8))
            assert not torch.is_grad_enabled()
        assert result.best_val_acc == 1.0
        assert random.getstate() == python_stream and torch.equal(torch.get_rng_state(), torch_stream)
        assert torch.get_default_dtype() == torch.float64 and torch.get_num_threads() == threads + 3
        assert signal.getsignal(signal.SIGTERM) is own_handler
    finally:
        torch.set_default_dtype(dtype)
        torch.set_num_threads(threads)
        signal.signal(signal.SIGTERM, previous_handler)
    looking.close()
    assert len(repr(model)) < 300 and len(repr(result)) < 300 and str(model.path) in repr(model)


def test_library_reports_and_settings_are_checked_and_runs_that_fail_leave_nothing(trained_run, tmp_path, monkeypatch):
    run_dir, data = trained_run["summary"]["run_dir"], trained_run["data"]
    events = []

    class Recorder(finetune.Reporter):
        def start(self, description, total):
            events.append("start")

        def finish(self):
            events.append("finish")

    report = finetune.evaluate(run_dir, data, finetune.PredictConfig(workers=0), Recorder())
    assert report.num_images == 9 and events == ["start", "finish"]  # (the progress bar was never closed)
    monkeypatch.chdir(tmp_path)
    relative = os.path.relpath(Path(run_dir).parent, tmp_path)  # (a relative runs folder: the path it loads from, made absolute)
    assert finetune.load_model(None, relative).path == Path(run_dir) / "model.safetensors"
    assert [p.label for p in finetune.predict(None, data / "val" / "dog" / "dog_0.jpg",
                                              finetune.PredictConfig(model=run_dir, workers=0))] == ["dog"]
    for call, says in ((lambda: finetune.predict(run_dir, "x.jpg", {"top_k": 1}), "cfg: give a finetune.PredictConfig"),
                       (lambda: finetune.evaluate(run_dir, data, finetune.TrainConfig()), "cfg: give a finetune.PredictConfig"),
                       (lambda: finetune.predict(run_dir, "x.jpg", None, reporter=5), "reporter: give a finetune.Reporter")):
        with pytest.raises(finetune.FinetuneError, match=says):
            call()
    for wrong, says in (({"pretrained": "no"}, "pretrained must be True or False"), ({"name": 5}, "--name must be a name"),
                        ({"runs_dir": None}, "--runs-dir must be a path"), ({"weight_decay": float("nan")}, "weight_decay must be"),
                        ({"backbone_lr_ratio": -1.0}, "backbone_lr_ratio must be a positive")):
        with pytest.raises(finetune.FinetuneError, match=says):
            finetune.TrainConfig(data=data, **wrong).checked()
    with pytest.raises(finetune.FinetuneError, match="tta must be True or False"):
        finetune.PredictConfig(tta="yes").checked()

    class Broken(finetune.Reporter):
        def epoch(self, record):
            raise ValueError("the caller's bug")

    with pytest.raises(ValueError, match="the caller's bug"):
        finetune.train(finetune.TrainConfig(data=data, runs_dir=tmp_path / "runs", arch="efficientnet_lite0", img_size=64,
                                            epochs=2, views=1, tail_epochs=0, workers=0, batch_size=8), Broken())
    assert list((tmp_path / "runs").iterdir()) == []  # (the failed run's config-only folder stayed)


def test_review_cases_of_the_library_leaving_its_callers_state(trained_run, monkeypatch, tmp_path):
    from finetune import device

    # two predict() iterators read in turn: each gave back the count it found, the caller was left with the lower one
    monkeypatch.setattr(device, "usable_cores", lambda: 1)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        cfg = finetune.PredictConfig(workers=0, batch_size=2)
        a, b = (finetune.predict(trained_run["summary"]["run_dir"], trained_run["data"] / "val", cfg) for _ in range(2))
        next(a), next(b), list(a), list(b)
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(threads)
    # CUDA not started before train(): the caller's seed, queued for it, was replaced by the run's
    seeded = []
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "manual_seed_all", seeded.append)
    torch.manual_seed(1234)
    with device.torch_as_training_needs():
        torch.manual_seed(0)
    assert seeded[-1] == 1234  # (torch.manual_seed queues one too: the last one stands)
    # bools: None only where it means "planned"
    with pytest.raises(UsageError, match="pretrained must be True or False"):
        TrainConfig(data="x", pretrained=None).checked()
    assert TrainConfig(data="x", freeze_backbone=None).checked().freeze_backbone is None


def test_a_run_resumed_in_the_head_stage_keeps_its_own_copy_of_the_best_model(tmp_path):
    from finetune.data import DatasetSplit
    from finetune.fit import Run
    from finetune.models import build_classifier, get_arch
    from finetune.progress import Reporter
    from finetune.runs import RunFolder

    spec = get_arch("efficientnet_lite0")
    model = build_classifier(spec, 2)
    best_head = {k: torch.full_like(v, 0.5) for k, v in model.head.state_dict().items()}
    state = ResumeState(
        stage=Stage.HEAD, epoch=1, history=[record(1, 0.5, 1.0)], trainable={f"head.{k}": v for k, v in model.head.state_dict().items()},
        optimizer={}, schedule={}, best_acc=0.5, best_loss=1.0, best_epoch=1,
        best_trainable={f"head.{k}": v for k, v in best_head.items()}, best_val_logits=None, rng={}, skipped=[],
        num_train=2, num_val=2, classes=["a", "b"], stopped_stage=None, files_digest="")
    run = Run(TrainConfig(), model, DatasetSplit(["a", "b"], [], [], "test"), spec.preprocessing(), RunFolder(tmp_path),
              Reporter(), "")
    run.restore(state, torch.device("cpu"))
    assert torch.equal(run.best.state["head.1.weight"], best_head["1.weight"])
    backbone_before = {k: v.clone() for k, v in run.best.state.items() if k.startswith("backbone.")}
    with torch.no_grad():  # fine-tuning then changes the live backbone...
        for p in model.backbone.parameters():
            p.add_(1.0)
    # ...but not the best model, which is what gets saved if no later epoch beats it.
    assert all(torch.equal(run.best.state[k], v) for k, v in backbone_before.items())


def test_a_candidate_heads_seconds_are_not_counted_twice_when_the_run_adopts_it(tmp_path):
    from finetune.data import DatasetSplit
    from finetune.fit import Run
    from finetune.models import build_classifier, get_arch
    from finetune.progress import Reporter
    from finetune.runs import RunFolder

    spec = get_arch("efficientnet_lite0")
    model = build_classifier(spec, 2)
    head = {f"head.{k}": v for k, v in model.head.state_dict().items()}
    candidate = ResumeState(  # (its seconds: the candidate's own training, within the run's time already)
        stage=Stage.HEAD, epoch=1, history=[record(1, 0.5, 1.0)], trainable=head, optimizer={"state": {}, "param_groups": []}, schedule={}, best_acc=0.5,
        best_loss=1.0, best_epoch=1, best_trainable={k: v.clone() for k, v in head.items()}, best_val_logits=None,
        rng={"torch": torch.get_rng_state()},
        skipped=[], num_train=2, num_val=2, classes=["a", "b"], stopped_stage=None, files_digest="", seconds=1000.0)
    run = Run(TrainConfig(), model, DatasetSplit(["a", "b"], [], [], "test"), spec.preprocessing(), RunFolder(tmp_path),
              Reporter(), "")
    run.adopt_head(candidate, torch.device("cpu"))
    assert run.seconds_so_far() < 100  # (it was 1000 and more: the candidate's time added to the run's)
    assert ResumeState.load(tmp_path / "last_state.safetensors").seconds < 100  # (what a resume goes on from)


class _LinearStage:
    """Just what train_one_epoch uses of a stage: a linear model on fixed batches."""

    def __init__(self, batches):
        from finetune.distributed import Dist

        torch.manual_seed(0)
        self.net, self.data, self.dist = torch.nn.Linear(4, 3), batches, Dist()
        self.device, self.amp = torch.device("cpu"), None
        self.loss = torch.nn.functional.cross_entropy

    def train_mode(self):
        self.net.train()

    def batches(self):
        yield from self.data


class _Bar:
    def __init__(self):
        self.calls = []

    def advance(self, steps=1, **fields):
        self.calls.append((steps, fields))


@pytest.mark.parametrize("every_s, sum_every", [(0.0, 256), (1e9, 2)])
def test_an_epoch_reads_its_loss_and_hits_from_the_device_once_not_every_step(monkeypatch, every_s, sum_every):
    # On a GPU each read (.item()) waits for every queued step: the running sums stay on the device.
    from finetune import fit
    from finetune.distributed import DeferredInterrupt

    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g)) for n in (5, 5, 3)]
    expected = _LinearStage(batches)
    optimizer = torch.optim.SGD(expected.net.parameters(), lr=0.1)
    loss_sum = correct = 0.0
    for x, y in batches:  # the sums as the loop used to take them, step by step
        logits = expected.net(x)
        loss = expected.loss(logits, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        loss_sum += loss.item() * len(y)
        correct += (logits.argmax(1) == y).sum().item()

    stage, reads, bar = _LinearStage(batches), [], _Bar()
    real_item = torch.Tensor.item
    monkeypatch.setattr(torch.Tensor, "item", lambda t: reads.append(t) or real_item(t))
    monkeypatch.setattr(fit, "REPORT_EVERY_S", every_s)
    monkeypatch.setattr(fit, "SUM_EVERY_STEPS", sum_every)  # 2: added up in the middle of the epoch too
    optimizer = torch.optim.SGD(stage.net.parameters(), lr=0.1)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    totals = fit.train_one_epoch(stage, optimizer, schedule, scaler, DeferredInterrupt(), bar)
    assert reads == []
    assert totals[0] == pytest.approx(loss_sum, rel=1e-12) and totals[1:] == (correct, 13.0)
    assert [steps for steps, _ in bar.calls] == [5, 5, 3]
    last = bar.calls[-1][1]
    if every_s == 0.0:  # the bar's running figures, when due, are the epoch's so far
        assert last["loss"] == round(loss_sum / 13, 4) and last["acc"] == round(correct / 13, 4)
    else:
        assert "loss" not in last and last["images_per_s"] > 0


def test_a_class_val_holds_but_the_model_mostly_misses_is_found():
    from finetune.finish import poorly_found
    from finetune.metrics import balanced_accuracy

    # (a rare class: val 0.857 was the majority's share, the defect class's recall 0, and nothing said so)
    assert poorly_found(["defect", "ok"], [[0, 5], [0, 30]]) == [("defect", 0, 5)]
    # (a trial's X-rays: 1 of 3 pneumonia found, val 0.968; "never answers" did not fire: it answered once)
    assert poorly_found(["NORMAL", "PNEUMONIA"], [[60, 0], [2, 1]]) == [("PNEUMONIA", 1, 3)]
    assert balanced_accuracy([[60, 0], [2, 1]]) == pytest.approx((1 + 1 / 3) / 2)
    assert poorly_found(["a", "b"], [[3, 1], [1, 3]]) == []
    assert poorly_found(["a", "b", "c"], [[2, 0, 0], [0, 2, 0], [0, 0, 0]]) == []  # (no val image of c: another note)
    # (48 classes of 1-2 val images at 0.22: every class missed alike; the accuracy says it, not a class list)
    assert poorly_found(["a", "b", "c", "d"], [[0, 1, 0, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0]]) == []
