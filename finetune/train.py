"""The training loop.

Stage 1 (always): the pretrained backbone is frozen, so its features for each training
image can be computed once, for `views` augmented views, and a new head trained on them
for many epochs in seconds. Stage 2 (`finetune_epochs` > 0): the whole network is then
fine-tuned end to end on freshly augmented images, the backbone at a lower learning rate.
The best epoch by validation accuracy is what gets saved.

After every epoch a small training state is written (atomically) so that `resume` can
continue from the last completed epoch with the optimizer, schedule, RNG and best metric
as they were.
"""

from __future__ import annotations

import copy
import json
import math
import random
import signal
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data.distributed import DistributedSampler

from . import __version__
from .checkpoint import STATE_FILENAME, create_run_dir, load_training_state, save_model, save_training_state
from .files import read_safetensors, write_csv, write_json
from .config import MODEL_FILENAME, TrainConfig
from .data import DatasetSplit, ImageFileDataset, Preprocessing, Sample, count_per_class, make_loader, scan_dataset
from .device import autocast, autocast_dtype, forward_in_chunks, pick_device, to_model_input
from .distributed import (SINGLE, Dist, from_environment, interrupts_deferred, is_lost_peer, record_rank_end, share_outcome,
                          shutdown, sigint_handler)
from .errors import DataError, GpuOutOfMemory, PeerStopped, TrainingInterrupted, UsageError
from .models import Classifier, build_classifier, get_arch, resolve_pretrained
from .progress import Reporter

IMBALANCE_RATIO = 3.0  # largest class / smallest class at which the summary warns
METRIC_FIELDS = ["epoch", "stage", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds", "images_per_s"]
HEAD, FINETUNE = "head", "finetune"


@dataclass
class TrainResult:
    run_dir: Path
    model: Path
    best_val_acc: float
    best_epoch: int
    epochs: int
    classes: list[str]
    num_train: int
    num_val: int
    skipped: list[dict]
    device: str
    seconds: float
    arch: str
    img_size: int
    weights: str
    layout: str
    class_counts: dict[str, int] = field(default_factory=dict)
    imbalanced: bool = False
    stopped_early: bool = False
    plots: list[str] = field(default_factory=list)
    history: list[dict] = field(default_factory=list)

    def to_json_dict(self) -> dict:
        d = {k: getattr(self, k) for k in ("best_val_acc", "best_epoch", "epochs", "classes", "num_train", "num_val",
                                            "skipped", "device", "seconds", "arch", "img_size", "weights", "layout",
                                            "class_counts", "imbalanced", "stopped_early", "plots")}
        return {"run_dir": str(self.run_dir), "model": str(self.model), **d}


def validate_config(cfg: TrainConfig) -> None:
    checks = [
        (0.0 < cfg.val_split < 1.0, f"--val-split must be between 0 and 1 (got {cfg.val_split})."),
        (cfg.epochs >= 1, f"--epochs must be at least 1 (got {cfg.epochs})."),
        (cfg.finetune_epochs >= 0, f"--finetune-epochs must be 0 or more (got {cfg.finetune_epochs})."),
        (cfg.views >= 1, f"--views must be at least 1 (got {cfg.views})."),
        (cfg.batch_size >= 1, f"--batch-size must be at least 1 (got {cfg.batch_size})."),
        (cfg.lr > 0, f"--lr must be positive (got {cfg.lr})."),
        (cfg.img_size is None or cfg.img_size >= 32, f"--img-size must be at least 32 (got {cfg.img_size})."),
        (cfg.workers is None or cfg.workers >= 0, f"--workers must be 0 or more (got {cfg.workers})."),
        (cfg.max_pixels >= 1, f"--max-pixels must be positive (got {cfg.max_pixels})."),
        (cfg.patience >= 0, f"--patience must be 0 (off) or more (got {cfg.patience})."),
        (0.0 <= cfg.label_smoothing < 1.0, f"--label-smoothing must be in [0, 1) (got {cfg.label_smoothing})."),
        (cfg.max_images_per_class is None or cfg.max_images_per_class >= 1,
         f"--max-images-per-class must be at least 1 (got {cfg.max_images_per_class})."),
    ]
    for ok, message in checks:
        if not ok:
            raise UsageError(message)


def refuse_output_inside_input(output: Path, data: Path) -> None:
    out, inp = output.resolve(), data.resolve()
    if out == inp or inp in out.parents:
        raise UsageError(f"--runs-dir {output} is inside the data folder {data}; outputs never go into your data. Pass a --runs-dir outside it.")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def warmup_cosine(step: int, total: int, warmup: int) -> float:
    """Learning-rate factor: linear warm-up, then cosine decay to zero."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def limit_per_class(samples: list[Sample], limit: int | None, seed: int) -> list[Sample]:
    """At most `limit` samples of each class, a seeded random choice (quick trials)."""
    if limit is None:
        return samples
    rng = random.Random(seed)
    by_class: dict[int, list[Sample]] = {}
    for s in samples:
        by_class.setdefault(s.label, []).append(s)
    kept = [s for members in by_class.values() for s in (rng.sample(members, limit) if len(members) > limit else members)]
    return sorted(kept, key=lambda s: str(s.path))


def is_imbalanced(counts: list[int]) -> bool:
    return min(counts) > 0 and max(counts) / min(counts) >= IMBALANCE_RATIO


def inverse_frequency_weights(counts: list[int]) -> torch.Tensor:
    """Each class weighs total / (classes x its count): rare classes count as much as common ones."""
    total, n = sum(counts), len(counts)
    return torch.tensor([total / (n * max(c, 1)) for c in counts], dtype=torch.float32)


def files_digest(split: DatasetSplit, data: Path) -> str:
    """A fingerprint of which files are in train and in val (relative to DATA, however it was spelt)."""
    import hashlib
    import os

    lines = [f"t {os.path.relpath(s.path, data)}" for s in split.train] + [f"v {os.path.relpath(s.path, data)}" for s in split.val]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def config_for_resume(run_dir: Path) -> TrainConfig:
    """The config a run was started with, read back from its folder."""
    if not (run_dir / "config.json").is_file():
        raise UsageError(f"--resume {run_dir}: not a run folder (no config.json). Pass a folder under runs/.")
    if (run_dir / "results.json").is_file():
        raise UsageError(f"--resume {run_dir}: this run already finished; its model is {run_dir / MODEL_FILENAME}.")
    saved = TrainConfig.from_json_dict(json.loads((run_dir / "config.json").read_text()))
    return replace(saved, resume=run_dir)


def train(cfg: TrainConfig, reporter: Reporter | None = None) -> TrainResult | None:
    """Train, save the run folder and return its summary.

    Under torchrun every rank calls this; rank 0 alone reports, writes
    and returns the result, the other ranks return None.
    """
    d, device_name = from_environment(cfg.device)
    try:
        result = _train(cfg, (reporter or Reporter()) if d.is_main else Reporter(), d, device_name)
    except KeyboardInterrupt:  # while starting (scan, weights): the training loop handles its own
        if cfg.resume is not None:
            raise TrainingInterrupted(f"training interrupted before it went on; continue with: finetune train --resume {cfg.resume}") from None
        raise TrainingInterrupted("training interrupted before its first epoch; nothing to resume: start it again.") from None
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


def scan_for_training(cfg: TrainConfig) -> DatasetSplit:
    split = scan_dataset(cfg.data, cfg.val_split, cfg.seed)
    split.train = limit_per_class(split.train, cfg.max_images_per_class, cfg.seed)
    split.val = limit_per_class(split.val, cfg.max_images_per_class, cfg.seed)
    return split


def new_run_dir(cfg: TrainConfig) -> Path:
    run_dir = create_run_dir(cfg.runs_dir, cfg.name)
    # Absolute paths, so that --resume works from any working directory.
    absolute = replace(cfg, data=cfg.data.resolve(), runs_dir=cfg.runs_dir.resolve(),
                       weights=cfg.weights.resolve() if cfg.weights else None)
    write_json(run_dir / "config.json", {k: v for k, v in absolute.to_json_dict().items() if k != "resume"})
    return run_dir


def _train(cfg: TrainConfig, reporter: Reporter, d: Dist, device_name: str) -> TrainResult | None:
    started = time.perf_counter()
    resume_from = cfg.resume
    if resume_from is not None:
        cfg = config_for_resume(resume_from)
    validate_config(cfg)
    refuse_output_inside_input(cfg.runs_dir, cfg.data)
    seed_everything(cfg.seed)
    device = pick_device(device_name)
    spec = get_arch(cfg.arch)
    pp = spec.preprocessing(cfg.img_size)
    split = share_outcome(d, lambda: scan_for_training(cfg))  # the folder is scanned once, not once per rank
    reporter.info(f"{cfg.data}: {len(split.classes)} classes, {len(split.train)} train / {len(split.val)} val images ({split.layout})")
    if cfg.pretrained:
        state, weights_source = resolve_pretrained(spec, cfg.weights)
    else:
        state, weights_source = None, "none (random init)"
    model = build_classifier(spec, len(split.classes), state).to(device).to(memory_format=torch.channels_last)
    reporter.info(f"{spec.name} at {pp.img_size}px on {device}, weights: {weights_source}")

    if d.active:
        reporter.info(f"distributed: {d.world} process{'es' if d.world > 1 else ''} ({'nccl' if device.type == 'cuda' else 'gloo'})")
    run_dir = resume_from if resume_from is not None else share_outcome(d, lambda: new_run_dir(cfg))
    session = _Session(cfg, split, pp, model, device, reporter, run_dir, d)
    try:
        session.run(resume=resume_from is not None)
    except KeyboardInterrupt:
        with sigint_ignored():
            saved = session.save_best()
            session.save_metrics()
        where = f"; the best model so far is in {saved}" if saved else ""
        same_processes = f" --devices {d.world}" if d.active and d.one_machine else ""
        again = (f" Continue with: finetune train --resume {run_dir}{same_processes}" if (run_dir / STATE_FILENAME).is_file()
                 else " It stopped before its first epoch finished; start it again to continue.")
        raise TrainingInterrupted(f"training interrupted{where}.{again}") from None
    except torch.cuda.OutOfMemoryError:
        raise GpuOutOfMemory(f"the GPU ran out of memory at --batch-size {cfg.batch_size}; "
                             f"start again with --batch-size {max(1, cfg.batch_size // 2)}.") from None
    if not d.is_main:
        return None
    with sigint_ignored():  # training is over: a Ctrl-C now must not leave the run folder half-written
        return finish_run(session, started, device, spec.name, pp, weights_source)


def finish_run(session: _Session, started: float, device: torch.device, arch: str, pp: Preprocessing,
               weights_source: str) -> TrainResult:
    """Write the model, plots and results.json; then drop the training state (nothing left to resume)."""
    split, run_dir = session.split, session.run_dir
    model_path = session.save_best()
    assert model_path is not None
    session.save_metrics()
    plots = session.save_plots()
    counts = count_per_class(split.train, len(split.classes))
    result = TrainResult(
        run_dir=run_dir, model=model_path, best_val_acc=round(session.best_acc, 4), best_epoch=session.best_epoch,
        epochs=len(session.history), classes=split.classes, num_train=session.num_train, num_val=session.num_val,
        skipped=split.skipped, device=str(device), seconds=round(time.perf_counter() - started, 2), arch=arch,
        img_size=pp.img_size, weights=weights_source, layout=split.layout,
        class_counts=dict(zip(split.classes, counts)), imbalanced=is_imbalanced(counts),
        stopped_early=session.stopped_early, plots=[str(p) for p in plots], history=session.history,
    )
    write_json(run_dir / "results.json", result.to_json_dict())  # first: with it, --resume says "finished"
    (run_dir / STATE_FILENAME).unlink(missing_ok=True)
    return result


def sigint_ignored():
    """Let a save finish when Ctrl-C is pressed (again) meanwhile. (Under `--devices`, torchrun
    answers a second Ctrl-C by terminating the ranks; the files are still written atomically.)"""
    return sigint_handler(signal.SIG_IGN)


class _Session:
    """State of one training run: the data, the model, the best epoch so far."""

    def __init__(self, cfg: TrainConfig, split: DatasetSplit, pp: Preprocessing, model: Classifier,
                 device: torch.device, reporter: Reporter, run_dir: Path, d: Dist = SINGLE):
        self.cfg, self.split, self.pp, self.model, self.d = cfg, split, pp, model, d
        self.files_digest = files_digest(split, cfg.data)  # of the scan as found, before bad files are dropped
        self.device, self.reporter, self.run_dir = device, reporter, run_dir
        self.amp = autocast_dtype(device)
        self.history: list[dict] = []
        self.best_acc, self.best_loss, self.best_epoch = -1.0, math.inf, 0
        self.best_state: dict | None = None
        self.saved_best_epoch: int | None = None  # the epoch whose model is in the model file
        self.num_train = self.num_val = 0
        self.resumed: tuple[dict, dict, dict] | None = None  # (tensors, optimizer state, info)
        self.best_val_pred: torch.Tensor | None = None  # val predictions of the best epoch
        self.stopped_early = False
        self.stopped_stage: str | None = None  # the stage that early stopping ended, for --resume
        self.loss_weights: torch.Tensor | None = None

    # -- the two stages -----------------------------------------------------------------
    def run(self, resume: bool) -> None:
        stage, done = HEAD, 0
        if resume:
            stage, done = self.restore()
        if stage == HEAD:
            train_feats, train_labels, val_feats, val_labels = self.extract_all_features()
            if self.d.is_main:  # the head trains in seconds: one process does it, the others wait
                self.train_head(train_feats, train_labels, val_feats, val_labels, done)
                self.save_best()
            self.share_head_stage_outcome()
            stage, done = FINETUNE, 0
            self.model.load_state_dict(self.best_state)
        if self.cfg.finetune_epochs > done:
            self.finetune_whole_network(done)

    def share_head_stage_outcome(self) -> None:
        """Give every rank rank 0's head-stage result (the best model, history, best metric)."""
        if not self.d.active:
            return
        keys = ("history", "best_acc", "best_loss", "best_epoch", "best_val_pred", "stopped_early", "stopped_stage")
        cpu_state = {k: v.cpu() for k, v in self.best_state.items()} if self.d.is_main else None
        shared = self.d.broadcast((cpu_state, {k: getattr(self, k) for k in keys}) if self.d.is_main else None)
        self.best_state = {k: v.to(self.device) for k, v in shared[0].items()}
        for k, v in shared[1].items():
            setattr(self, k, v)

    def extract_all_features(self):
        cfg = self.cfg
        train, train_feats = self.extract_sharded(self.split.train, cfg.views, "Features (train)")
        val, val_feats = self.extract_sharded(self.split.val, 1, "Features (val)")
        self.set_clean_samples(train, val)
        if self.d.is_main:  # the bad-file check is done: the list is final
            write_csv(self.run_dir / "skipped.csv", self.split.skipped, ["path", "reason"])
        train_labels = torch.tensor([s.label for s in train])
        val_labels = torch.tensor([s.label for s in val])
        return train_feats, train_labels, val_feats[:, 0], val_labels

    def set_clean_samples(self, train: list[Sample], val: list[Sample]) -> None:
        classes = self.split.classes
        counts = count_per_class(train, len(classes))
        for i, n in enumerate(counts):
            if n == 0:
                raise DataError(f"class '{classes[i]}' has no readable training images left after skipping bad files; add good images to it.")
        if not val:
            raise DataError("no readable validation images left after skipping bad files; add images to the val folder.")
        self.split.train, self.split.val = train, val
        self.num_train, self.num_val = len(train), len(val)
        if is_imbalanced(counts):
            detail = ", ".join(f"{c} {n}" for c, n in zip(classes, counts))
            hint = "class weights are on" if self.cfg.class_weights else "consider --class-weights"
            self.reporter.warn(f"classes are imbalanced ({detail}); {hint}.")
        if self.cfg.class_weights:
            self.loss_weights = inverse_frequency_weights(counts).to(self.device)

    def loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), y, weight=self.loss_weights, label_smoothing=self.cfg.label_smoothing)

    def patience_ran_out(self, stage: str, stage_first_epoch: int) -> bool:
        """True when `patience` epochs of this stage have passed without a better val accuracy."""
        if not self.cfg.patience:
            return False
        since = len(self.history) - max(self.best_epoch, stage_first_epoch - 1)
        if since >= self.cfg.patience:
            self.stopped_early, self.stopped_stage = True, stage
            self.reporter.info(f"early stop: no better val accuracy for {self.cfg.patience} epochs")
            return True
        return False

    def extract_sharded(self, samples: list[Sample], views: int, description: str) -> tuple[list[Sample], torch.Tensor]:
        """Features of `samples`, each rank computing its own share; every image is decoded once in all."""
        mine = self.d.shard(list(range(len(samples))))
        kept, feats, failed = self.extract_features([samples[i] for i in mine], views, description)
        kept_all, feats_all = self.d.gather_in_order([mine[i] for i in kept], feats)
        for i, reason in sorted(f for part in self.d.all_gather([(mine[i], reason) for i, reason in failed]) for f in part):
            self.split.skipped.append({"path": str(samples[i].path), "reason": reason})
            self.reporter.warn(f"skipped {samples[i].path}: {reason}")
        return [samples[i] for i in kept_all], feats_all

    @torch.inference_mode()
    def extract_features(self, samples: list[Sample], views: int, description: str) -> tuple[list[int], torch.Tensor, list[tuple[int, str]]]:
        """Decode each image once (this is also the bad-file check), run `views` crops through the frozen backbone.

        Returns the indices of the decoded samples, their features [n, views, dim] and the
        (index, reason) of those that failed.
        """
        dataset = ImageFileDataset([s.path for s in samples], self.pp, self.cfg.max_pixels, views=views)
        loader = make_loader(dataset, max(1, self.cfg.batch_size // views), self.cfg.workers,
                             pin_memory=self.device.type == "cuda", seed=self.cfg.seed)
        self.model.eval()
        kept, chunks, failures = [], [], []
        self.reporter.start(description, len(samples))
        t0 = time.perf_counter()
        done = 0
        for indices, batch, failed in loader:
            failures.extend(failed)
            if batch is not None:
                b, v = batch.shape[:2]
                x = to_model_input(batch.flatten(0, 1), self.device)
                with autocast(self.device, self.amp):
                    f = forward_in_chunks(self.model.features, x, self.device)
                chunks.append(f.view(b, v, -1).to("cpu", torch.float16))  # half the memory; ample precision for a linear head
                kept.extend(indices)
            done += len(indices) + len(failed)
            self.reporter.advance(len(indices) + len(failed), images_per_s=round(done * views / (time.perf_counter() - t0), 1))
        self.reporter.finish()
        feats = torch.cat(chunks) if chunks else torch.empty(0, views, self.model.head[1].in_features, dtype=torch.float16)
        return kept, feats, failures

    def train_head(self, train_feats, train_labels, val_feats, val_labels, done: int) -> None:
        cfg, head = self.cfg, self.model.head
        n, v, d = train_feats.shape
        x_all = train_feats.reshape(n * v, d).to(self.device)
        y_all = train_labels.repeat_interleave(v).to(self.device)
        x_val, y_val = val_feats.to(self.device), val_labels.to(self.device)
        steps_per_epoch = math.ceil(len(x_all) / cfg.batch_size)
        total = steps_per_epoch * cfg.epochs
        optimizer = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, total, steps_per_epoch))
        generator = torch.Generator().manual_seed(cfg.seed)
        if done:
            self.restore_optimization(optimizer, schedule, generator)
        self.reporter.start("Head (frozen backbone)", cfg.epochs)
        self.reporter.advance(done)
        for epoch in range(done + 1, cfg.epochs + 1):
            t0 = time.perf_counter()
            head.train()
            order = torch.randperm(len(x_all), generator=generator).to(self.device)
            loss_sum = correct = 0.0
            for start in range(0, len(order), cfg.batch_size):
                idx = order[start:start + cfg.batch_size]
                logits = head(x_all[idx].float())
                loss = self.loss(logits, y_all[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                loss_sum += loss.item() * len(idx)
                correct += (logits.argmax(1) == y_all[idx]).sum().item()
            head.eval()
            with torch.no_grad():
                val_logits = head(x_val.float())
            row = self.record_epoch(HEAD, len(x_all), loss_sum / len(x_all), correct / len(x_all),
                                    val_logits, y_val, optimizer, time.perf_counter() - t0)
            stop = self.patience_ran_out(HEAD, stage_first_epoch=len(self.history) - epoch + 1)
            self.save_state(HEAD, epoch, optimizer, schedule, generator)
            self.reporter.advance(1, loss=row["train_loss"], acc=row["train_acc"], val_acc=row["val_acc"])
            if stop:
                break
        self.reporter.finish()

    def finetune_whole_network(self, done: int) -> None:
        cfg, model = self.cfg, self.model
        train_ds = ImageFileDataset([s.path for s in self.split.train], self.pp, cfg.max_pixels, views=1, augment_all=True)
        val_mine = self.d.shard(list(range(len(self.split.val))))  # each rank validates its share
        val_ds = ImageFileDataset([self.split.val[i].path for i in val_mine], self.pp, cfg.max_pixels, views=1)
        labels = torch.tensor([s.label for s in self.split.train])
        val_labels = torch.tensor([s.label for s in self.split.val])
        pin = self.device.type == "cuda"
        # Each rank trains on its own shard. A single process uses the same sampler (one shard
        # of one), so a run under torchrun with one process sees the very batches of a plain run.
        sampler = DistributedSampler(train_ds, num_replicas=self.d.world, rank=self.d.rank, shuffle=True, seed=cfg.seed)
        net = model
        if self.d.active:  # DDP averages the gradients (and syncs the weights at the start)
            net = DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        train_loader = make_loader(train_ds, cfg.batch_size, cfg.workers, pin_memory=pin, seed=cfg.seed, sampler=sampler)
        val_loader = make_loader(val_ds, cfg.batch_size, cfg.workers, pin_memory=pin, seed=cfg.seed)
        steps_per_epoch = max(1, len(train_loader))
        total = steps_per_epoch * cfg.finetune_epochs
        optimizer = torch.optim.AdamW([
            {"params": model.backbone.parameters(), "lr": cfg.lr * cfg.backbone_lr_ratio},
            {"params": model.head.parameters(), "lr": cfg.lr},
        ], weight_decay=cfg.weight_decay)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, total, max(1, steps_per_epoch // 2)))
        if done:
            self.restore_optimization(optimizer, schedule, None)
        # fp16 needs loss scaling to keep small gradients; bf16 has fp32's range and does not.
        scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp == torch.float16)
        with interrupts_deferred(self.d) as interrupt:
            for epoch in range(done + 1, cfg.finetune_epochs + 1):
                # Shuffling, augmentation and worker seeds depend only on (seed, epoch, rank):
                # a resumed run sees the same batches.
                train_loader.generator.manual_seed(cfg.seed * 100_003 + epoch)
                torch.manual_seed(cfg.seed * 100_003 + epoch * 1_009 + self.d.rank)
                sampler.set_epoch(epoch)
                t0 = time.perf_counter()
                net.train()
                loss_sum = correct = seen = 0.0
                self.reporter.start(f"Fine-tune epoch {epoch}/{cfg.finetune_epochs}", len(sampler))
                for indices, batch, _failed in train_loader:
                    # All ranks take each step together: Ctrl-C stops them at the same step, and a
                    # batch whose files all failed to decode on one rank (deleted since stage 1, say)
                    # is skipped by every rank, so that optimizers and schedules stay in step.
                    stop, skip = self.d.any_of(interrupt.requested, batch is None)
                    if stop:
                        raise KeyboardInterrupt
                    if skip:
                        continue
                    x = to_model_input(batch[:, 0], self.device)
                    y = labels[indices].to(self.device)
                    with autocast(self.device, self.amp):
                        logits = net(x)
                        loss = self.loss(logits, y)
                    optimizer.zero_grad(set_to_none=True)
                    scaler.scale(loss).backward()
                    scaler.step(optimizer)
                    scaler.update()
                    schedule.step()
                    loss_sum += loss.item() * len(y)
                    correct += (logits.argmax(1) == y).sum().item()
                    seen += len(y)
                    self.reporter.advance(len(y), loss=round(loss_sum / seen, 4), acc=round(correct / seen, 4),
                                          images_per_s=round(seen / (time.perf_counter() - t0), 1))
                self.reporter.finish()
                loss_sum, correct, seen = self.d.sum(loss_sum, correct, seen)  # whole-epoch figures over all ranks
                val_logits, val_y = self.gather_val_logits(val_loader, val_labels, val_mine)
                improved_before = self.best_epoch
                self.record_epoch(FINETUNE, int(seen), loss_sum / max(1, seen), correct / max(1, seen), val_logits, val_y,
                                  optimizer, time.perf_counter() - t0)
                if self.best_epoch != improved_before:
                    self.save_best()  # the state file below may point at it, so it goes first
                stop = self.patience_ran_out(FINETUNE, stage_first_epoch=len(self.history) - epoch + 1)
                self.save_state(FINETUNE, epoch, optimizer, schedule, None)
                if stop:
                    break
                if epoch < cfg.finetune_epochs and self.d.any_of(interrupt.requested)[0]:  # a Ctrl-C during validation
                    raise KeyboardInterrupt

    @torch.inference_mode()
    def gather_val_logits(self, loader, labels: torch.Tensor, mine: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits for the whole val set, in order, on every rank (each rank computes its share)."""
        self.model.eval()
        outs, idx = [], []
        for indices, batch, _failed in loader:
            if batch is None:
                continue
            with autocast(self.device, self.amp):
                outs.append(forward_in_chunks(self.model, to_model_input(batch[:, 0], self.device), self.device).float().cpu())
            idx.extend(mine[i] for i in indices)
        all_idx, logits = self.d.gather_in_order(idx, torch.cat(outs) if outs else torch.empty(0, len(self.split.classes)))
        return logits.to(self.device), labels[all_idx].to(self.device)

    # -- bookkeeping --------------------------------------------------------------------
    def record_epoch(self, stage: str, n_images: int, train_loss: float, train_acc: float,
                     val_logits: torch.Tensor, val_y: torch.Tensor, optimizer, seconds: float) -> dict:
        val_loss = F.cross_entropy(val_logits.float(), val_y).item()
        val_acc = (val_logits.argmax(1) == val_y).float().mean().item()
        row = {
            "epoch": len(self.history) + 1, "stage": stage,
            "train_loss": round(train_loss, 4), "train_acc": round(train_acc, 4),
            "val_loss": round(val_loss, 4), "val_acc": round(val_acc, 4),
            "lr": f"{optimizer.param_groups[-1]['lr']:.3g}", "seconds": round(seconds, 3),
            "images_per_s": round(n_images / max(seconds, 1e-9), 1),
        }
        self.history.append(row)
        self.reporter.epoch(row)
        # Ties on accuracy go to the lower loss: the more confident, better calibrated model.
        if val_acc > self.best_acc or (val_acc == self.best_acc and val_loss < self.best_loss):
            self.best_acc, self.best_loss, self.best_epoch = val_acc, val_loss, row["epoch"]
            self.best_state = copy.deepcopy(self.model.state_dict())
            self.best_val_pred = val_logits.argmax(1).cpu()
        return row

    def save_best(self) -> Path | None:
        """The model file of the best epoch (written only when that epoch changed)."""
        if self.best_state is None or not self.d.is_main:
            return None
        path = self.run_dir / MODEL_FILENAME
        if self.saved_best_epoch != self.best_epoch:
            save_model(path, self.best_state, self.metadata())
            self.saved_best_epoch = self.best_epoch
        return path

    def save_metrics(self) -> None:
        if self.d.is_main:
            write_csv(self.run_dir / "metrics.csv", self.history, METRIC_FIELDS)

    def save_plots(self) -> list[Path]:
        """curves.png (loss/accuracy per epoch) and confusion_matrix.png (best epoch, val)."""
        from .report import confusion_matrix, plot_confusion_matrix, plot_curves

        if not self.d.is_main:
            return []
        paths = [plot_curves(self.history, self.run_dir / "curves.png")]
        if self.best_val_pred is not None:
            cm = confusion_matrix([s.label for s in self.split.val], self.best_val_pred.tolist(), len(self.split.classes))
            paths.append(plot_confusion_matrix(cm, self.split.classes, self.run_dir / "confusion_matrix.png",
                                               f"validation, best epoch {self.best_epoch}"))
        return paths

    def save_state(self, stage: str, epoch: int, optimizer, schedule, generator: torch.Generator | None) -> None:
        """After each completed epoch: trainable weights, optimizer, schedule, RNG, history, best."""
        if not self.d.is_main:
            return
        trainable = self.model.head if stage == HEAD else self.model
        prefix = "head." if stage == HEAD else ""
        tensors = {f"model.{prefix}{k}": v for k, v in trainable.state_dict().items()}
        if stage == HEAD:  # the best head is tiny: keep it here rather than rewrite the model file each epoch
            tensors.update({f"best.{k}": v for k, v in self.best_state.items() if k.startswith("head.")})
        if self.best_val_pred is not None:
            tensors["best.val_pred"] = self.best_val_pred
        tensors["rng.torch"] = torch.get_rng_state()
        if generator is not None:
            tensors["rng.generator"] = generator.get_state()
        if torch.cuda.is_available():
            for i, s in enumerate(torch.cuda.get_rng_state_all()):
                tensors[f"rng.cuda.{i}"] = s
        info = {
            "stage": stage, "epoch": epoch, "history": self.history, "schedule": schedule.state_dict(),
            "best": {"acc": self.best_acc, "loss": self.best_loss, "epoch": self.best_epoch},
            "skipped": self.split.skipped, "num_train": self.num_train, "num_val": self.num_val,
            "classes": self.split.classes, "stopped_early": self.stopped_early, "stopped_stage": self.stopped_stage,
            "files_digest": self.files_digest,
        }
        save_training_state(self.run_dir / STATE_FILENAME, tensors, optimizer, info)
        self.save_metrics()

    def restore(self) -> tuple[str, int]:
        """Load the training state; returns (stage, epochs completed in that stage)."""
        tensors, opt_state, info = load_training_state(self.run_dir / STATE_FILENAME)
        if info.get("classes", self.split.classes) != self.split.classes:
            raise DataError(f"{self.cfg.data}: its class folders changed since {self.run_dir} started "
                            f"({', '.join(info['classes'])} then, {', '.join(self.split.classes)} now); start a new run.")
        if info.get("files_digest", self.files_digest) != self.files_digest:
            raise DataError(f"{self.cfg.data}: images were added, removed or renamed since {self.run_dir} started, "
                            "so its train/val split would change; start a new run.")
        self.resumed = (tensors, opt_state, info)
        self.stopped_early = info.get("stopped_early", False)
        self.stopped_stage = info.get("stopped_stage")
        self.history = info["history"]
        best = info["best"]
        self.best_acc, self.best_loss, self.best_epoch = best["acc"], best["loss"], best["epoch"]
        own = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
        self.model.load_state_dict(own, strict=info["stage"] == FINETUNE)
        self.best_val_pred = tensors.get("best.val_pred")
        if info["stage"] == HEAD:
            self.best_state = copy.deepcopy(self.model.state_dict())
            self.best_state.update({k[len("best."):]: v.to(self.device) for k, v in tensors.items() if k.startswith("best.head.")})
        else:
            best_tensors, _ = read_safetensors(self.run_dir / MODEL_FILENAME)
            self.best_state = {k: v.to(self.device) for k, v in best_tensors.items()}
            self.saved_best_epoch = self.best_epoch  # that is the file it was just read from
            skipped = {s["path"] for s in info["skipped"]}
            self.split.skipped = info["skipped"]
            self.set_clean_samples([s for s in self.split.train if str(s.path) not in skipped],
                                   [s for s in self.split.val if str(s.path) not in skipped])
        self.reporter.info(f"resuming {self.run_dir} after epoch {len(self.history)} ({info['stage']} stage)")
        if self.stopped_stage == info["stage"]:  # that stage had ended by early stopping: do not train it further
            return info["stage"], self.cfg.epochs if info["stage"] == HEAD else self.cfg.finetune_epochs
        return info["stage"], info["epoch"]

    def restore_optimization(self, optimizer, schedule, generator: torch.Generator | None) -> None:
        tensors, opt_state, info = self.resumed
        optimizer.load_state_dict(opt_state)
        schedule.load_state_dict(info["schedule"])
        torch.set_rng_state(tensors["rng.torch"])
        if generator is not None:
            generator.set_state(tensors["rng.generator"])
        cuda_states = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
        if cuda_states and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(cuda_states)

    def metadata(self) -> dict:
        import torchvision

        return {
            "arch": self.cfg.arch,
            "classes": self.split.classes,
            "preprocessing": self.pp.to_dict(),
            "train_config": {k: v for k, v in self.cfg.to_json_dict().items() if k != "resume"},
            "best": {"epoch": self.best_epoch, "val_acc": round(self.best_acc, 4), "val_loss": round(self.best_loss, 4)},
            "num_train": self.num_train, "num_val": self.num_val,
            "versions": {"finetune": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__},
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
