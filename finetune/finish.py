"""The end of a training run: the model's calibration and unknown rule, the model file, plots,
the test split measured once, the report and results.json."""

from __future__ import annotations


import torch

from .calibration import calibrate, too_few_to_place, uncalibrated
from .data import ImageFileDataset, Sample, make_loader
from .device import autocast, autocast_dtype, to_model_input
from .fit import Run
from .fold import folded_while_frozen
from .prediction import answers_from_rows
from .records import Stage, TrainResult
from .run_report import measured_val, summary_of, training_content
from .scan import count_per_class, is_imbalanced

MAX_FEATURE_IMAGES = 5_000  # training images the unknown rule is fitted on (a seeded sample beyond that)


def finish(run: Run, device: torch.device, weights_source: str) -> TrainResult:
    """Calibrate, then write the model, metrics, plots and results.json; the training state goes
    (nothing left to resume)."""
    split, folder = run.split, run.folder
    calibrate_run(run, device)
    model_path = run.save_best(force=True)
    folder.write_metrics(run.history)
    val = measured_val(run)
    plots = folder.write_plots(run.history, val, split.classes)
    test = measure_test(run, model_path, device) if split.test else None
    counts = count_per_class(split.train, len(split.classes))
    result = TrainResult(
        run_dir=folder.path, model=model_path, best_val_acc=run.best.acc, best_epoch=run.best.epoch,
        epochs=len(run.history), classes=split.classes, num_train=len(split.train), num_val=len(split.val),
        skipped=split.skipped, device=str(device), seconds=round(run.seconds_so_far(), 2), arch=run.cfg.arch,
        img_size=run.pp.img_size, weights=weights_source, layout=split.layout,
        class_counts=dict(zip(split.classes, counts)), imbalanced=is_imbalanced(counts),
        stopped_early=run.early.stopped_early, plots=[str(p) for p in plots], history=run.history,
        read_as=split.read_as, num_test=test.num_images if test else 0, test_acc=test.accuracy if test else None,
        test=test.summary() if test else None, leakage=split.leakage, near_copies=run.near_copies, likeness=run.likeness,
        feature_cache=run.cache.use.to_dict() if run.cache is not None else None,
        recipe={"head": run.head_choice.to_dict() if run.head_choice else None, "candidates": run.candidates,
                "views_computed": run.views_computed, "fit": run.pp.fit,
                "chosen_by": "the best validation accuracy (then loss) among heads trained on the same cached features",
                "tail": run.tail_plan, "finetune": run.finetune_plan, "learning_curve": run.learning_curve or None,
                "feature_pass": run.feature_pass},
        val=summary_of(val, split.classes) if val else None, suspects=folder.write_suspects(run.suspects, run.suspects_note),
        calibration=calibration_summary(run, test), unknown=run.unknown,
    )
    missed = poorly_found(split.classes, result.val["confusion_matrix"]) if result.val else []
    if missed:  # (a rare class: the accuracy is the others', and nothing said so)
        hint = "; --class-weights weighs the rare classes up" if result.imbalanced and not run.cfg.class_weights else ""
        found = ", ".join(f"{k} of val's {n} images of {c!r}" for c, k, n in missed)
        run.reporter.warn(f"the kept model finds only {found}: val accuracy {result.best_val_acc:.4f} is mostly the other "
                          f"classes'; balanced accuracy (each class's recall averaged) {result.val['balanced_accuracy']:.4f}"
                          f"{hint}.")
    result.report = folder.write_report(training_content(run, result, [m for m in (val, test and test.measured) if m]),
                                        run.cfg.max_pixels)
    folder.finish(result)
    return result


def calibrate_run(run: Run, device: torch.device) -> None:
    """Fit the temperature and the unknown rule of the kept model on val (calibration.calibrate)."""
    if run.best.val_logits is None or not len(run.split.val):
        return
    if len(run.best.val_logits) != len(run.split.val):  # (a val image that stopped decoding since it was measured)
        run.reporter.warn(f"no calibration and no unknown rule: the kept epoch was measured on {len(run.best.val_logits)} "
                          f"val images, {len(run.split.val)} decode now (skipped.csv); predictions' scores are the "
                          "model's own, and nothing is called unknown. Start a new run to have both.")
        return
    best_stage = stage_of_best(run)
    run.model.load_state_dict(run.best.state)
    if run.frozen_features is not None and best_stage in (Stage.HEAD, Stage.TAIL):
        train_rows, val_rows, kept = run.frozen_features  # the rows the stage was trained on: no pass needed
        if best_stage is Stage.HEAD:  # the backbone as the rows were cached: their pooled part
            train_features, val_features = (rows[:, -run.model.all_dim:].float() for rows in (train_rows, val_rows))
        else:  # (BatchNorm computed inside the tail's convolutions, as it trained: fold.py)
            with folded_while_frozen(run.model, lambda: run.model.stages_from_rows(val_rows[:2].to(device))):
                train_features, val_features = tail_stages(run, train_rows, device), tail_stages(run, val_rows, device)
    else:  # a fine-tuned backbone: its own features, of a sample of train
        g = torch.Generator().manual_seed(run.cfg.seed)
        sample = [run.split.train[i] for i in torch.randperm(len(run.split.train), generator=g)[:MAX_FEATURE_IMAGES].tolist()]
        train_features, _ = stage_features(run, sample, device)
        val_features, kept = stage_features(run, run.split.val, device)
    val_logits = run.best.val_logits[kept]
    val_labels = torch.tensor([run.split.val[i].label for i in kept.tolist()])
    run.calibration, run.unknown, run.distance = calibrate(val_logits, val_labels, train_features, val_features)
    if len(val_features) == len(run.split.val):
        run.val_distance = run.distance(val_features)
    c = run.calibration
    run.reporter.info(f"calibration: temperature {c['temperature']:.3f}, val ECE {c['val_ece_before']:.4f} -> "
                      f"{c['val_ece_after']:.4f}; unknown beyond distance {run.unknown['threshold']:.2f} "
                      f"({run.unknown['val_flagged']:.1%} of val)")
    if too_few_to_place(run.unknown["set_on_val_images"]):
        run.reporter.warn(f"the unknown rule was set on {run.unknown['set_on_val_images']} val images, too few to place it surely: predict "
                          f"may answer some images of your classes unknown (label null) or miss foreign ones; "
                          f"finetune predict --no-unknown answers a class for every image")


WEAK_RECALL = 0.5  # a class found less often than this ...
OTHERS_RECALL = 0.8  # ... while the other classes' images are found this often or more


def poorly_found(classes: list[str], matrix: list[list[int]]) -> list[tuple[str, int, int]]:
    """(class, val images found, val images) of the classes val holds images of that the model
    finds under WEAK_RECALL of, where it finds OTHERS_RECALL of the other classes' images, and
    those are most of val (a rare class at 1 of 3 under 60 of 60: val accuracy 0.97, the class
    mostly missed). Where most images are missed, the accuracy says it already."""
    weak = [(c, matrix[i][i], sum(matrix[i])) for i, c in enumerate(classes)
            if sum(matrix[i]) and matrix[i][i] < WEAK_RECALL * sum(matrix[i])]
    names = {c for c, _, _ in weak}
    others = [(matrix[i][i], sum(matrix[i])) for i, c in enumerate(classes) if c not in names]
    found, total = sum(k for k, _ in others), sum(n for _, n in others)
    return weak if total > sum(n for _, _, n in weak) and found >= OTHERS_RECALL * total else []


def stage_of_best(run: Run) -> Stage:
    """The stage the saved model's epoch came from."""
    return run.history[run.best.epoch - 1].stage if run.best.epoch else Stage.HEAD


def tail_stages(run: Run, rows: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Every stage's pooled features of cached rows, the model's trained tail run on their activations."""
    with torch.inference_mode():
        return torch.cat([stages.cpu() for stages in run.model.eval().stage_chunks(rows, device)]
                         or [torch.empty(0, run.model.all_dim)])


def stage_features(run: Run, samples: list[Sample], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's backbone features (every stage, pooled) of `samples` (plain view), and the indices
    of those that decoded."""
    dataset = ImageFileDataset([s.path for s in samples], run.pp, run.cfg.max_pixels)
    loader = make_loader(dataset, run.cfg.batch_size, run.cfg.workers, pin_memory=device.type == "cuda")
    feats, kept = [], []
    run.model.eval()
    with torch.inference_mode(), autocast(device, autocast_dtype(device)):  # (as prediction computes them)
        for indices, batch, _failed in loader:
            if batch is not None:
                feats.append(run.model.all_stage_features(to_model_input(batch[:, 0], device)).float().cpu())
                kept.extend(indices)
    return (torch.cat(feats) if feats else torch.empty(0, run.model.all_dim)), torch.tensor(kept, dtype=torch.long)


def calibration_summary(run: Run, test) -> dict | None:
    """results.json `calibration`: the temperature and ECE before/after on val (fitted there) and test."""
    if run.calibration is None:
        return None
    out = dict(run.calibration)
    if test is not None and test.measured is not None and test.num_images:
        from .metrics import calibration as ece_of

        calibrated = test.measured.probs
        raw = uncalibrated(calibrated, run.calibration["temperature"])
        out["test_ece_before"] = ece_of(raw, test.measured.labels)["ece"]
        out["test_ece_after"] = ece_of(calibrated, test.measured.labels)["ece"]
    return out


def measure_test(run: Run, model_path, device: torch.device):
    """The saved model on the test split, read back from its file: the figures `finetune evaluate`
    gives (from the cached features of the test images when the backbone under the tail is
    the frozen one, which may differ from evaluate's by the rounding of those features to 16
    bits, as val's do). Test images never choose anything."""
    from .checkpoint import read_model_file
    from .config import PredictConfig
    from .evaluation import measure

    cfg = PredictConfig(device=str(device), batch_size=max(PredictConfig.batch_size, run.cfg.batch_size), workers=run.cfg.workers,
                        max_pixels=run.cfg.max_pixels)
    loaded = read_model_file(model_path)
    best_stage = stage_of_best(run)
    if run.test_rows is not None and best_stage in (Stage.HEAD, Stage.TAIL):
        # The backbone the rows came from is the model's, but for the tail it trained: the model
        # file's weights run on the cached rows, as val was measured (a rerun reads them from the cache).
        samples, rows, failed = run.test_rows
        loaded.model.keep_tail_input(run.model.tail_input)
        given = [(answer, None) for answer in answers_from_rows(loaded, rows[:, 0], device)]
        report = measure(loaded, samples, cfg, run.reporter, "test", failed, given)
    else:
        report = measure(loaded, run.split.test, cfg, run.reporter, "test")
    if report.skipped:
        run.split.skipped.extend(report.skipped)
        run.folder.write_skipped(run.split.skipped)
    return report
