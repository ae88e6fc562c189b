"""`train`: from an image folder to a run folder holding a trained model.

    scan the folder -> build the model -> compute the frozen backbone's features once
    -> train a new head on them -> train the last blocks too, on cached activations (where the
    head underfits, recipe.plan_tail) -> fine-tune the whole network (when asked, or on a device
    that trains it fast: recipe.plan_finetune) -> write the run

The model saved is the kept epoch's (tracking.BestEpoch: a stage's last epoch, unless the
stages before it ended better on val). After every epoch the run folder gets a resume state
(resume.py), so Ctrl-C keeps the model kept so far and `--resume`
continues from the last completed epoch. Under torchrun every rank runs this; only rank 0
writes and reports.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import random
import signal
import time
from dataclasses import replace
from pathlib import Path

import torch

from .cache import ENV_DIR as CACHE_ENV
from .cache import cache_for, cache_root, digest_memo_for
from .config import TrainConfig
from .data import DatasetSplit, held_out_content_digest, held_out_digest
from .device import autocast_dtype, pick_device, threads_within_usable_cores, torch_as_training_needs
from .distributed import (SINGLE, Dist, from_environment, is_lost_peer, record_rank_end, share_outcome, shutdown, signals_to,
                          tell_launcher_run_folder)
from .errors import FinetuneError, GpuOutOfMemory, PeerStopped, TrainingInterrupted, UsageError, WeightsError
from .features import FeatureExtractor, FeatureSet
from .fit import Run, about, fit_stage, measure_pace
from .models import build_classifier, get_arch
from .weights import resolve_pretrained, weights_do_not_fit
from .progress import Reporter, reporter_or_quiet
from .recipe import (choose_fit, choose_head, epochs_text, growth_steps, head_features, learning_order, more_images_pay,
                     plan_finetune, plan_tail, pooled_features, try_head, views_for)
from .records import HeadChoice, Stage, TrainResult
from .resume import ResumeState, config_for_resume, files_digest, require_state
from .finish import MAX_FEATURE_IMAGES, finish
from .run_report import held_out_near_copies, likeness_to_training, training_suspects
from .suspects import UNLIKE_TRAINING
from .runs import RunFolder, new_run_dir, refuse_output_inside_input, training_lock
from .store import plain_sample
from .reading import scan_dataset
from .scan import (count_per_class, imbalance_detail, is_imbalanced, limit_per_class, missing_val_note,
                   require_images_in_every_class)
from .stages import FinetuneStage, LossFn, TailStage, head_stage, make_loss


SLOW_DEVICES = ("cpu",)  # where fine-tuning's pace is not measured: far below recipe.FAST_TRAINING_RATE
PACE_PROBE_S = 3.0  # how long planning times fine-tuning's steps (after a warm-up step; at least two)


def train(cfg: TrainConfig, reporter: Reporter | None = None) -> TrainResult | None:
    """Train, write the run folder and return its summary.

    Under torchrun every rank calls this; rank 0 alone reports, writes and returns the
    result, the other ranks return None.
    """
    if not isinstance(cfg, TrainConfig):
        raise UsageError(f"train() takes a TrainConfig, e.g. finetune.train(finetune.TrainConfig(data='photos')) "
                         f"(got {type(cfg).__name__}).")
    cfg = cfg.typed()
    reporter = reporter_or_quiet(reporter)
    d, device_name = from_environment(cfg.device)
    try:
        with contextlib.ExitStack() as locks:  # (the run folder's lock, held while this process trains it)
            locks.enter_context(torch_as_training_needs())  # (and the caller's settings given back after)
            locks.enter_context(threads_within_usable_cores())
            if not d.active:
                locks.enter_context(sigterm_as_ctrl_c())
            result = _train(cfg, reporter if d.is_main else Reporter(), d, device_name, locks)
    except KeyboardInterrupt as e:  # while starting (scan, weights): the stages handle their own
        if cfg.resume is not None:
            raise as_signalled(TrainingInterrupted(f"training interrupted before it went on; continue with: finetune train "
                                                   f"--resume {cfg.resume}"), e) from None
        raise as_signalled(TrainingInterrupted("training interrupted before its first epoch; nothing to resume: start it "
                                               "again."), e) from None
    except Exception as e:
        if d.active and is_lost_peer(e):
            first_line = (str(e).splitlines() or [type(e).__name__])[0]
            raise PeerStopped(f"rank {d.rank} lost contact with the other ranks ({first_line})") from None
        raise
    else:
        if d.active and d.is_main:
            record_rank_end(0, "finished")  # so that a Ctrl-C that came too late to stop it is not reported as one
        return result
    finally:
        shutdown(d)


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, taken as Ctrl-C is (the same saves and messages), told apart by its exit code.
    args[0]: the signal."""


def _stop_as_ctrl_c(signum, frame):
    raise Terminated(signum)


STOPPING_SIGNALS = (signal.SIGTERM, *((signal.SIGHUP,) if hasattr(signal, "SIGHUP") else ()))


def sigterm_as_ctrl_c():
    """SIGTERM (docker stop, Slurm's scancel, a plain `timeout`) and SIGHUP (the terminal closed, an
    ssh session dropped) stop a run as Ctrl-C does: its files saved, resumable, said in one line;
    they killed the process where it stood, the features computed so far never reaching the cache.
    One process only: under torchrun, SIGTERM is how the launcher stops the ranks (distributed.py).
    A handler of the caller's own (a service using the library), or SIGHUP ignored (nohup), is left
    as it is."""
    ours = [signum for signum in STOPPING_SIGNALS if signal.getsignal(signum) is signal.SIG_DFL]
    return signals_to(_stop_as_ctrl_c, *ours) if ours else contextlib.nullcontext()


def _train(cfg: TrainConfig, reporter: Reporter, d: Dist, device_name: str, locks: contextlib.ExitStack) -> TrainResult | None:
    started = time.perf_counter()
    resume_dir = Path(os.path.abspath(cfg.resume)) if cfg.resume is not None else None  # (results' paths: absolute)
    cfg = (config_for_resume(resume_dir) if resume_dir is not None else cfg).checked()
    # (DATA absolute, as spelt: the files results.json lists, skipped and leaked ones, and suspects.csv's,
    # read from anywhere, as its run folder and model are; links kept, as the user named them)
    cfg = replace(cfg, data=Path(os.path.abspath(cfg.data)),
                  weights=Path(os.path.abspath(cfg.weights)) if cfg.weights is not None else None)  # (results' `weights` too)
    if resume_dir is not None:  # (through rank 0 to every rank: one rank stopping alone left the others waiting)
        share_outcome(d, lambda: locks.enter_context(training_lock(resume_dir)))
        share_outcome(d, lambda: require_state(resume_dir))  # (a run in its first epoch: said locked, above)
    refuse_output_inside_input(cfg.runs_dir, cfg.data)
    if cfg.cache and (cfg.cache_dir or os.environ.get(CACHE_ENV)):  # (the default, under the home folder, is hidden there)
        refuse_output_inside_input(cache_root(cfg.cache_dir), cfg.data, "--cache-dir" if cfg.cache_dir else f"{CACHE_ENV}=")
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    device = pick_device(device_name)
    spec = get_arch(cfg.arch)
    spec.check_size(cfg.img_size)
    if cfg.head_features == "multi" and spec.chain is None:
        raise UsageError(f"--head-features multi: {spec.name} has no stage features here (only the ResNets and "
                         "efficientnet_lite0 do); use --head-features final or auto.")
    split = share_outcome(d, lambda: scan_for_training(cfg))  # the folder is scanned once, not once per rank
    tell_reading(split, reporter)
    state, weights_source = (resolve_pretrained(spec, cfg.weights, reporter.info) if cfg.pretrained
                             else (None, "none (random init)"))
    try:
        model = build_classifier(spec, len(split.classes), state).to(device).to(memory_format=torch.channels_last)
    except WeightsError as e:  # (another model's weights: the file they came from named)
        raise weights_do_not_fit(e, weights_source, spec) from None
    fit, why = (share_outcome(d, lambda: choose_fit([s.path for s in split.train], cfg.seed)) if cfg.fit == "auto"
                else (cfg.fit, "as --fit says"))  # (the headers read once, as the folder is scanned once)
    if fit != "crop":
        reporter.info(f"fit: {fit} ({why})")
    pp = replace(spec.preprocessing(cfg.img_size), fit=fit)
    reporter.info(f"{spec.name} at {pp.img_size}px on {device}, weights: {weights_source}")
    if d.active:
        reporter.info(f"distributed: {d.world} process{'es' if d.world > 1 else ''} ({'nccl' if device.type == 'cuda' else 'gloo'})")
    tail_shape = spec.tail_input_shape(pp.img_size)
    no_tail = tail_unavailable(cfg, spec, model.all_dim, tail_shape, split)
    if no_tail is None:
        model.keep_tail_input(tail_shape)
    elif cfg.tail_epochs:
        raise UsageError(f"--tail-epochs {cfg.tail_epochs}: {no_tail}.")
    run_dir = resume_dir if resume_dir is not None else share_outcome(d, lambda: new_run_dir(cfg))
    tell_launcher_run_folder(d, run_dir)
    folder = RunFolder(run_dir, writes=d.is_main)
    try:
        if resume_dir is None:
            share_outcome(d, lambda: locks.enter_context(training_lock(run_dir)))
        run = Run(cfg, model, split, pp, folder, reporter, files_digest(split, cfg.data),
                  cache=cache_for(cfg, pp, weights_source, device, autocast_dtype(device), model.tail_input,
                                  split.scan_started_ns), no_tail=no_tail,
                  started=started,
                  val_digest=held_out_digest(split, cfg.data), val_content=held_out_content_digest(split))
    except BaseException:  # (a new run stopped before its stages began leaves no folder behind)
        if resume_dir is None:
            folder.remove_if_nothing_kept()
        raise
    try:
        run_stages(run, device, d, ResumeState.load(run.folder.state_path) if resume_dir is not None else None)
    except KeyboardInterrupt as e:
        raise as_signalled(interrupted(run, d), e) from None
    except Exception as e:  # (a Reporter of the caller's that failed, too)
        if resume_dir is None:  # (a run that failed before it kept anything leaves no folder behind to sort out)
            with contextlib.suppress(FinetuneError):  # (one that cannot be removed: the error that ended the run is told)
                run.folder.remove_if_nothing_kept()
        if isinstance(e, torch.cuda.OutOfMemoryError):
            raise out_of_memory(cfg.batch_size, resumed=resume_dir is not None) from None
        raise
    if not d.is_main:
        return None
    with stops_deferred(reporter):  # training is over: a Ctrl-C now must not leave the run folder half-written
        return finish(run, device, weights_source)


def tail_unavailable(cfg: TrainConfig, spec, all_dim: int, tail_shape: tuple[int, ...] | None,
                     split: DatasetSplit) -> str | None:
    """Why the feature pass cannot keep the activations (of `tail_shape`) the tail stage trains on;
    None when it can. (Under torchrun too: like the heads, rank 0 trains the tail, on the rows every
    rank shares.)"""
    if tail_shape is None:
        return f"{spec.name} has no tail stage here (the ResNets and efficientnet_lite0 do)"
    kept = math.prod(tail_shape)
    views = cfg.views if cfg.views is not None else views_for(len(split.train), None)
    size = (len(split.train) * views + len(split.val) + len(split.test)) * (all_dim + kept) * 2  # test: measured on its rows
    if size > cfg.feature_memory_gb * 1e9:
        gb = size / 1e9
        amount = f"{gb:.1f}" if gb >= 1 else f"{gb:.2g}"  # (".1f" said 0.0 GB, over --feature-memory-gb 0.01)
        return f"its cached activations would take {amount} GB, over --feature-memory-gb {cfg.feature_memory_gb:g}"
    return None


def scan_for_training(cfg: TrainConfig) -> DatasetSplit:
    split = scan_dataset(cfg.data, cfg.val_split, cfg.seed, cfg.layout, cfg.labels, cfg.label_columns,
                         digest_memo_for(cfg))
    if cfg.max_images_per_class is None:
        return split
    limit = lambda samples: limit_per_class(samples, cfg.max_images_per_class, cfg.seed)  # noqa: E731
    limited = replace(split, train=limit(split.train), val=limit(split.val), test=limit(split.test))
    test = f", {len(limited.test):,} test" if split.test else ""
    limited.notes = [*split.notes, f"--max-images-per-class {cfg.max_images_per_class}: using {len(limited.train):,} "
                                   f"training, {len(limited.val):,} val{test} images of them"]
    return limited


def tell_reading(split: DatasetSplit, reporter: Reporter) -> None:
    reporter.info(f"read as: {split.read_as}")
    for note in split.notes:
        reporter.info(note)
    if split.leakage:
        first = split.leakage[0]
        reporter.warn(f"{len(split.leakage)} {'image' if len(split.leakage) == 1 else 'images'} in val/test "
                      f"{'has' if len(split.leakage) == 1 else 'have'} the same bytes as another split's (e.g. "
                      f"{first['path']} = {first['same_as']}): they inflate val/test accuracy (all in results.json 'leakage').")


def tell_near_copies(found: list[dict] | None, reporter: Reporter) -> None:
    if found:
        first = found[0]
        what = "image looks like a near-copy of a training image" if len(found) == 1 else "images look like near-copies of training images"
        reporter.warn(f"{len(found)} val/test {what} (e.g. {first['path']} like {first['like']}, similarity {first['similarity']:.2f}: "
                      "resized, recompressed or shot in a burst): they inflate val/test accuracy and what is chosen on "
                      "it (all in results.json 'near_copies').")


def tell_unlike_training(likeness: dict | None, reporter: Reporter) -> None:
    """Val or test images far less like the training images than those are to each other: another
    source (a trial: val photos shrunk to 32 px, val 0.71 where the same photos gave 0.97), said."""
    for name in ("val", "test"):
        if likeness and likeness[name] is not None and likeness[name] < UNLIKE_TRAINING * likeness["train"]:
            reporter.warn(f"{name} images are less like the training images (median likeness to the nearest "
                          f"{likeness[name]:.2f}) than training images are to each other ({likeness['train']:.2f}): they "
                          f"may come from another source (camera, size, scanner, processing); {name} accuracy then says "
                          "how the model does there, not on images like the training ones.")


def run_stages(run: Run, device: torch.device, d: Dist, resumed: ResumeState | None) -> None:
    """The head on cached features (unless a resumed run is past it), then fine-tuning."""
    cfg, stage, done = run.cfg, Stage.HEAD, 0
    if resumed is not None:
        resumed.check_same_data(run.split, run.files_digest, cfg.data, run.folder.path)
        run.restore(resumed, device)
        run.seconds_before = resumed.seconds  # (the time the run took before it was stopped)
        stage, done = resumed.stage, epochs_completed(resumed, run)
        run.reporter.info(f"resuming {run.folder.path} after epoch {len(run.history)} ({stage} stage)")
    if stage in (Stage.HEAD, Stage.TAIL):
        views = run.views_computed = run.head_choice.views if run.head_choice else views_for(len(run.split.train), cfg.views)
        extractor = FeatureExtractor(run.model, run.pp, cfg, device, d, run.reporter, run.cache)
        known = {}  # candidate heads already trained on the final features (recipe.choose_head)
        winner = None  # where the winning candidate head's training ended: the head stage of a new run
        if grows(run, d, device):
            rows, clean, known = grow_training_set(run, extractor, views, device)
        else:
            rows, clean = extractor.features_of(run.split, views)
        if run.split.test and not extractor.on_disk and not cfg.finetune_epochs:  # (fine-tuning: test goes through its network)
            run.test_rows = extractor.sharded(run.split.test, 1, "Features (test)")
        tell_cache_use(run, d)
        run.feature_pass = extractor.pass_summary()
        loss = settle_split(run, clean, device)
        run.folder.write_skipped(run.split.skipped)  # the bad-file check is done: the list is final
        if d.is_main:  # the heads train in seconds: one process does it, the others wait
            features = pooled_features(rows, run.model.all_dim)
            if run.head_choice is None:  # (a resumed run goes on with the head it had chosen)
                winner = choose(run, features, loss, device, views, known)
            run.frozen_features = frozen_sample(rows, cfg.seed)
            run.suspects, run.suspects_note = training_suspects(features, run.model.final_dim, run.head_choice,
                                                                [str(s.path) for s in run.split.train], run.split.classes, cfg.seed)
            run.near_copies = held_out_near_copies(features, run.model.final_dim, run.split, run.pp, cfg.max_pixels,
                                                   run.test_rows)
            tell_near_copies(run.near_copies, run.reporter)
            run.likeness = likeness_to_training(features, run.model.final_dim, run.split, run.test_rows)
            tell_unlike_training(run.likeness, run.reporter)
            if stage is Stage.HEAD:
                if winner is not None:  # it trained as the head stage would: not trained again
                    run.adopt_head(winner, device)
                    winner = known = None  # (the candidates' states: optimizer moments, val logits)
                else:  # (a resumed head stage: its optimizer, schedule and random streams as they were)
                    fit_stage(head_stage(run.model, head_features(features, run.head_choice, run.model.final_dim), loss, cfg,
                                         device), run, done, resumed)
                run.save_best()
                run.model.load_state_dict(run.best.state)  # the tail starts from the best head
                done, resumed = 0, None
            fit_tail(run, rows, features, loss, device, done, resumed)
            plan_finetuning(run, loss, device, d)
        run.share_from_main(d)
        run.model.load_state_dict(run.best.state)
        done, resumed = 0, None
    else:  # the features were computed before the interruption: drop the files they found bad
        bad = {s["path"] for s in resumed.skipped}
        usable = lambda samples: [s for s in samples if str(s.path) not in bad]  # noqa: E731
        train = usable(run.split.train)
        if resumed.num_train < len(train):  # the head stage had stopped growing the training set: its images
            train = usable(learning_order(run.split.train, cfg.seed))[:resumed.num_train]
        loss = settle_split(run, replace(run.split, train=train, val=usable(run.split.val), skipped=resumed.skipped), device)
    epochs = run.finetune_plan["epochs"]
    if epochs > done:
        fit_stage(FinetuneStage(run.model, run.split, run.pp, loss, cfg, device, d, epochs, light_augmentation(run)), run,
                  done, resumed)


def light_augmentation(run: Run) -> bool:
    """Whether fine-tuning augments lightly: where the plain view won the head's choice."""
    return run.head_choice is not None and run.head_choice.views == 1


def plan_finetuning(run: Run, loss: LossFn, device: torch.device, d: Dist) -> None:
    """Plan whole-network fine-tuning (recipe.plan_finetune; a resumed run keeps its plan) and say
    why. Its pace is measured where it could be fast (off the CPU) or where a time budget asks
    what fits: a few seconds of its training on a copy of the model (fit.measure_pace), times the
    processes sharing the epoch. The budget keeps back the test split's pass."""
    if run.finetune_plan is not None:
        return
    rate = epoch_seconds = budget = None
    left = run.seconds_left()
    if run.cfg.finetune_epochs is None and run.best.acc < 1.0 and (device.type not in SLOW_DEVICES or run.deadline):
        floor = least_epoch_seconds(run, d)
        too_little = left is not None and (left < 2 * PACE_PROBE_S or (floor is not None and floor > left))
        pace = None if too_little else measure_finetune_pace(run, loss, device)
        if pace is None:
            why = ("no training image could be read to measure its pace" if not too_little
                   else f"the time budget has {left:.0f} s left: too little to measure its pace" if left < 2 * PACE_PROBE_S
                   else f"an epoch would take {about(floor)} or more (training passes cost {TRAINING_PASS_COST:g} times the "
                        f"feature pass's at least), over the {left:.0f} s the time budget has left")
            run.finetune_plan = {"epochs": 0, "why": why, "images_per_s": None}
            run.reporter.info(f"no fine-tuning: {why}")
            return
        rate = pace.images_per_s * d.world
        epoch_seconds = pace.epoch_seconds(math.ceil(len(run.split.train) / d.world), math.ceil(len(run.split.val) / d.world))
        if left is not None:
            run.budget_reserve_s = pace.epoch_seconds(0, math.ceil(len(run.split.test) / d.world)) if run.split.test else 0.0
            budget = max(0.0, run.seconds_left() - run.budget_reserve_s)
    epochs, why = plan_finetune(run.cfg.finetune_epochs, run.best.acc, rate, epoch_seconds, budget)
    run.finetune_plan = {"epochs": epochs, "why": why, "images_per_s": rate and round(rate, 1)}
    run.reporter.info(f"fine-tuning: {epochs_text(epochs)} ({why})" if epochs else f"no fine-tuning: {why}")


TRAINING_PASS_COST = 2.0  # an image's training step (forward and backward) against its forward pass: 3 or so, 2 at the least


PACE_FROM_VIEWS = 200  # image views the feature pass computed, at least, for its pace to say a step's least cost


def least_epoch_seconds(run: Run, d: Dist) -> float | None:
    """The least a fine-tuning epoch could take, from the feature pass's pace in this run (None
    where it computed under PACE_FROM_VIEWS image views: a few images' pace is the workers' start,
    5.8 views/s for 413.8 over a whole pass): measuring the pace costs a warm-up step and two more, a
    trial's ResNet-18 15 s of a 30 s budget on a CPU, to find that an epoch would not fit in what was left."""
    computed = run.feature_pass or {}
    rate = computed.get("image_views_per_s")
    if not rate or computed.get("image_views", 0) < PACE_FROM_VIEWS:
        return None
    return (TRAINING_PASS_COST * len(run.split.train) + len(run.split.val)) / (rate * d.world)


def measure_finetune_pace(run: Run, loss: LossFn, device: torch.device):
    """Fine-tuning's pace on this device (fit.measure_pace) on a copy of the model, in one process."""
    probe = FinetuneStage(copy.deepcopy(run.model), run.split, run.pp, loss, run.cfg, device, SINGLE, 1,
                          light_augmentation(run))
    return measure_pace(probe, PACE_PROBE_S)


def fit_tail(run: Run, rows: FeatureSet, features: FeatureSet, loss: LossFn, device: torch.device, done: int,
             resumed: ResumeState | None) -> None:
    """Plan the tail stage (recipe.plan_tail; a resumed one keeps its plan), say why, and run it."""
    stage = None
    if run.model.tail_input is not None:  # (so the rows are in memory)
        tail_rows = FeatureSet(rows.train[:, :run.head_choice.views], rows.train_labels, rows.val, rows.val_labels)
        stage = TailStage(run.model, tail_rows, loss, run.cfg, device, 0)
    if run.tail_plan is None:
        acc = head_train_accuracy(run.model, features) if stage else None
        seconds = stage.measure_seconds_per_epoch() if stage is not None and run.cfg.tail_epochs is None else None
        epochs, why = plan_tail(run.cfg.tail_epochs, run.no_tail, acc, run.head_choice.multi_layer, seconds, run.best.acc,
                                run.seconds_left())
        run.tail_plan = {"epochs": epochs, "why": why, "head_train_acc": acc, "epoch_seconds": seconds}
        run.reporter.info(f"tail stage: {epochs_text(epochs)} ({why})" if epochs else f"no tail stage: {why}")
    if stage is not None and run.tail_plan["epochs"] > done:
        stage.epochs = run.tail_plan["epochs"]
        fit_stage(stage, run, done, resumed)
        run.save_best()


def head_train_accuracy(model, features: FeatureSet) -> float:
    """The model's head on the plain view of its training images' cached features."""
    model.eval()
    plain, correct = features.train[:, 0], 0
    with torch.no_grad():
        for i in range(0, len(plain), 4096):
            logits = model.logits_of_stages(plain[i:i + 4096].float().to(model.mean.device))
            correct += (logits.argmax(1).cpu() == features.train_labels[i:i + 4096]).sum().item()
    return correct / max(1, len(plain))


def grows(run: Run, d: Dist, device: torch.device) -> bool:
    """Whether the training set grows in steps while more images pay (recipe.py): for large
    sets, on one process off CUDA (a GPU computes every image's features in little time), and
    with the feature cache (each step reads the last one's features back from it)."""
    return (not run.cfg.all_images and run.cache is not None and not d.active and device.type != "cuda"
            and len(growth_steps(len(run.split.train))) > 1)


def grow_training_set(run: Run, extractor: FeatureExtractor, views: int,
                      device: torch.device) -> tuple[FeatureSet, DatasetSplit, dict[HeadChoice, ResumeState]]:
    """Features of ever more training images (recipe.growth_steps) until a doubling no longer
    pays on val (measured with a quick head on the final features of the plain view: the last
    step's is one of the candidate heads, returned so that it is not trained again)."""
    cfg, available = run.cfg, len(run.split.train)
    ordered = learning_order(run.split.train, cfg.seed)
    run.learning_curve = []  # (a resumed head stage measures it again, from the cache, to the same end)
    for size in growth_steps(available):
        features, clean = extractor.features_of(replace(run.split, train=ordered[:size]), views)
        loss = make_loss(cfg, count_per_class(clean.train, len(clean.classes)), device)
        quick = try_head(features, HeadChoice(1, False), run.model, clean, run.pp, loss, cfg, device, run.reporter,
                         f"Head on {len(clean.train):,} images")
        acc = quick.best_acc
        run.learning_curve.append({"images": len(clean.train), "val_acc": acc})
        run.reporter.info(f"learning curve: {len(clean.train):,} training images, val acc {acc:.4f}")
        if len(run.learning_curve) > 1 and not more_images_pay(run.learning_curve[-2]["val_acc"], acc, len(clean.val)):
            break
    if size < available:
        run.reporter.info(f"using {len(clean.train):,} of {available:,} training images: the last doubling cut the val "
                          "error by less than a tenth (--all-images uses every one)")
    return features, clean, {HeadChoice(1, False): quick}


def frozen_sample(features: FeatureSet, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What the unknown rule is fitted on (finish.calibrate_run): the cached rows of the plain view of
    a sample of the training images, and of the val images (all of them when in memory): (train, val,
    val positions)."""
    train, _ = plain_sample(features.train, MAX_FEATURE_IMAGES, seed)
    val, positions = plain_sample(features.val, MAX_FEATURE_IMAGES if features.on_disk else len(features.val_labels), seed)
    return train, val, positions


def tell_cache_use(run: Run, d: Dist) -> None:
    """Say what the feature pass found in the cache, counted over every rank (each read its share)."""
    use = run.cache.use if run.cache is not None else None
    if use is not None and d.active:
        use.hits, use.computed, use.dropped_chunks = (int(v) for v in d.sum(use.hits, use.computed, use.dropped_chunks))
    if use is not None and (use.hits or use.dropped_chunks):
        dropped = f"; {use.dropped_chunks} damaged cache files deleted, their features computed again" if use.dropped_chunks else ""
        run.reporter.info(f"features of {use.hits:,} of {use.hits + use.computed:,} images from the cache ({use.dir}){dropped}")
    if use is not None and use.not_written:
        run.reporter.warn(f"feature cache not written ({use.not_written}): the next run computes these features again; "
                          "set --cache-dir to a writable folder, or --no-cache")


def choose(run: Run, features: FeatureSet, loss: LossFn, device: torch.device, views: int,
           known: dict[HeadChoice, ResumeState]) -> ResumeState:
    """Pick the head on the cached features (recipe.py), shape the model for it and say why;
    returns the state the winner's training ended in."""
    choice, run.candidates, winner = choose_head(features, run.model, run.split, run.pp, loss, run.cfg, device, views, known,
                                                 run.reporter)
    run.model.use_features(choice.multi_layer, new_head=True)  # (its weights and statistics: the winner's)
    run.head_choice = choice
    others = "; ".join(f"{HeadChoice(c['views'], c['multi_layer']).describe()}: {c['val_acc']:.4f}"
                       for c in run.candidates if (c["views"], c["multi_layer"]) != (choice.views, choice.multi_layer))
    best = next(c for c in run.candidates if (c["views"], c["multi_layer"]) == (choice.views, choice.multi_layer))
    run.reporter.info(f"head: {choice.describe()} (val acc {best['val_acc']:.4f}"
                      f"{f', the best of {len(run.candidates)} heads' if len(run.candidates) > 1 else ''}"
                      f"{'; others: ' + others if others else ''})")
    return winner


def epochs_completed(resumed: ResumeState, run: Run) -> int:
    """Epochs done in the resumed stage (the run restored from it); all of them when early stopping had ended it."""
    if resumed.stopped_stage is resumed.stage:
        return {Stage.HEAD: run.cfg.epochs, Stage.TAIL: (run.tail_plan or {}).get("epochs", 0),
                Stage.FINETUNE: (run.finetune_plan or {}).get("epochs", 0)}[resumed.stage]
    return resumed.epoch


def settle_split(run: Run, split: DatasetSplit, device: torch.device) -> LossFn:
    """Train on `split` from now on (the bad files dropped); returns the loss for its classes."""
    require_images_in_every_class(split)
    note = missing_val_note(split)
    if note:
        run.reporter.warn(note + ".")
    counts = count_per_class(split.train, len(split.classes))
    if is_imbalanced(counts):
        detail = imbalance_detail(split.classes, counts)
        hint = "class weights are on" if run.cfg.class_weights else "consider --class-weights"
        run.reporter.warn(f"classes are imbalanced ({detail}); {hint}.")
    run.split = split
    return make_loss(run.cfg, counts, device)


def interrupted(run: Run, d: Dist) -> TrainingInterrupted:
    """Ctrl-C: the model kept so far is saved, and the message says how to go on."""
    with stops_deferred():
        saved = run.save_best()
        run.folder.write_metrics(run.history)
    where = f"; the model kept so far is in {saved}" if saved else ""
    way_on = run.folder.way_on(f" --devices {d.world}" if d.active and d.one_machine else "")
    return TrainingInterrupted(f"training interrupted{where}. {way_on[0].upper()}{way_on[1:]}")


def out_of_memory(batch_size: int, resumed: bool) -> GpuOutOfMemory:
    smaller = f"--batch-size {max(1, batch_size // 2)}"
    if resumed:  # (--resume takes the run's own settings: a smaller batch is a new run)
        return GpuOutOfMemory(f"the GPU ran out of memory at this run's --batch-size {batch_size}; free the GPU's memory "
                              f"(other processes) and resume again, or start a new run with {smaller}.")
    return GpuOutOfMemory(f"the GPU ran out of memory at --batch-size {batch_size}; start again with {smaller}.")


def as_signalled(error: TrainingInterrupted, cause: BaseException) -> TrainingInterrupted:
    """Stopped by SIGTERM or SIGHUP: said so, and the exit code shells and schedulers read as such
    (128 + the signal's number: 143, 129), not Ctrl-C's 130."""
    if isinstance(cause, Terminated):
        signum = signal.Signals(cause.args[0] if cause.args else signal.SIGTERM)
        error = TrainingInterrupted(str(error).replace("training interrupted", f"training stopped by {signum.name}", 1))
        error.exit_code = 128 + signum
    return error


def stops_deferred(reporter: Reporter | None = None):
    """Let a save finish when Ctrl-C is pressed (again) meanwhile; `reporter`, if given, is told
    once that the run is finishing (a trial: three Ctrl-C's while a run wrote its end, seconds of
    silence, then exit 0). (Under `--devices`, torchrun answers a second Ctrl-C by terminating the
    ranks; the files are still written atomically.)"""
    # (SIGTERM and SIGHUP too where they stop the run as Ctrl-C does: else the run's end was reported as a failed start)
    taken_as_ctrl_c = [signum for signum in STOPPING_SIGNALS if signal.getsignal(signum) is _stop_as_ctrl_c]
    told = []

    def tell_once(signum, frame):
        if reporter is not None and not told:
            told.append(signum)
            try:  # (a handler must not raise into the writing it interrupted: a closed terminal, a reentrant write)
                reporter.warn("the run is writing its end (model, test split, report): it stops when that is done")
            except Exception:
                pass

    return signals_to(tell_once if reporter is not None else signal.SIG_IGN, signal.SIGINT, *taken_as_ctrl_c)
