"""The one fit loop every stage goes through, and what the stages of a run share.

Per epoch: train the stage's batches, validate, record the epoch, keep its model or not (tracking.py),
decide on early stopping, save the resume state. A resumed stage restores its optimizer,
schedule and RNG first and goes on from the next epoch.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from .averaging import WeightAverage, named_in
from .checkpoint import model_metadata
from .cache import FeatureCache
from .config import MAX_EXTRA_VIEWS, TrainConfig
from .data import DatasetSplit, Preprocessing
from .device import autocast, synchronize
from .distributed import Dist, interrupts_deferred
from .errors import TrainingDiverged, UsageError
from .models import Classifier
from .progress import Reporter
from .records import EpochRecord, HeadChoice, Stage
from .resume import ResumeState, restore_rng, rng_state
from .runs import RunFolder
from .tracking import BestEpoch, EarlyStopping, best_val_epoch

REPORT_EVERY_S = 0.5  # how often a stage's bar shows its running loss and accuracy
SUM_EVERY_STEPS = 256  # steps whose losses and hits wait on the device before they are added up


def trained_on(cfg: TrainConfig, val_digest: str, val_content: str) -> dict:
    """The data and labels file a model learnt from, as absolute paths with links resolved
    (train_config keeps DATA absolute as spelt, links kept), and the digests of the val images it held out, of their
    names (data.held_out_digest) and of their contents (data.held_out_content_digest): evaluate knows
    DATA again from anywhere, whether reading it again finds the same val images, and a copy of it."""
    return {"data": str(Path(cfg.data).resolve()), "labels": str(Path(cfg.labels).resolve()) if cfg.labels else None,
            "val_digest": val_digest, "val_content": val_content}


@dataclass
class Run:
    """What the stages of one training run share: the model, the data it is trained on, what
    has been learnt so far (history, kept epoch, early stopping) and the folder it goes to."""

    cfg: TrainConfig
    model: Classifier
    split: DatasetSplit  # without the images that failed to decode, once the features are computed
    pp: Preprocessing
    folder: RunFolder
    reporter: Reporter
    files_digest: str
    history: list[EpochRecord] = field(default_factory=list)
    best: BestEpoch = field(default_factory=BestEpoch)
    early: EarlyStopping = field(init=False)
    head_choice: HeadChoice | None = None  # what the head reads, once chosen (recipe.py)
    candidates: list[dict] = field(default_factory=list)  # every candidate head's val figures
    views_computed: int | None = None  # views per training image the features were computed for
    cache: FeatureCache | None = None  # where the features are kept between runs (None: --no-cache)
    learning_curve: list[dict] = field(default_factory=list)  # {images, val_acc} per growth step (recipe.py)
    feature_pass: dict | None = None  # what computing the features took: image views, seconds (this process)
    no_tail: str | None = None  # why the feature pass keeps no activations for the tail stage; None: it keeps them
    tail_plan: dict | None = None  # the tail stage's epochs and why (recipe.plan_tail), once planned
    finetune_plan: dict | None = None  # fine-tuning's epochs and why (recipe.plan_finetune), once planned
    val_digest: str = ""  # held_out_digest of the split as scanned (`split` loses the files that fail to decode)
    val_content: str = ""  # held_out_content_digest of it
    started: float = field(default_factory=time.perf_counter)  # time.perf_counter() when this process began the run
    seconds_before: float = 0.0  # what the run took before it was resumed here (up to its last saved state)
    budget_reserve_s: float = 0.0  # what --time-budget keeps back for the test split's pass (once fine-tuning is planned)
    state_save_s: float = 0.0  # how long the last resume state took to write
    test_rows: tuple | None = None  # the test split's (decoded samples, cached rows [n, 1, dim], failures), when in memory
    suspects: list[dict] | None = None  # suspected label errors in train (run_report.training_suspects); None: not computed
    near_copies: list[dict] | None = None  # val/test images like training ones (run_report.held_out_near_copies); None: not compared
    likeness: dict | None = None  # val/test images' likeness to the training images (run_report.likeness_to_training)
    suspects_note: str = "Not computed: the run was resumed in its fine-tuning stage, after the features were let go."
    frozen_features: tuple | None = None  # the frozen backbone's features (every stage): train, val, val positions (training.frozen_sample)
    calibration: dict | None = None  # the model file's temperature and ECE (calibration.calibrate), once fitted
    unknown: dict | None = None  # the model file's unknown rule
    distance: object = None  # calibration.FeatureDistance: the unknown rule's tensors
    val_distance: torch.Tensor | None = None  # each val image's distance from the training images

    def __post_init__(self) -> None:
        self.early = EarlyStopping(self.cfg.patience)

    def save_best(self, force: bool = False) -> Path | None:
        """The model file of the kept epoch (with its calibration once fitted); `force`: written even
        when that epoch's file is already there."""
        meta = model_metadata(self.cfg.arch, self.split.classes, self.pp,
                              {k: v for k, v in self.cfg.to_json_dict().items() if k != "resume"},
                              {"epoch": self.best.epoch, "val_acc": self.best.acc, "val_loss": self.best.loss},
                              len(self.split.train), len(self.split.val), self.model.multi_layer)
        meta["trained_on"] = trained_on(self.cfg, self.val_digest, self.val_content)
        if self.calibration is not None:
            meta.update(calibration=self.calibration, unknown=self.unknown)
        extra = self.distance.tensors() if self.distance is not None else {}
        return self.folder.save_model(self.best, meta, extra, force)

    def resume_state(self, stage, epoch: int, optimizer, schedule, average: WeightAverage | None = None) -> ResumeState:
        """The state after `epoch` epochs of `stage` (a stages.HeadStage, TailStage or FinetuneStage)
        and its weights' average, if it keeps one."""
        trained = {k: v for k, v in self.model.state_dict().items() if k.startswith(stage.prefixes)}
        best = {k: v for k, v in self.best.state.items() if k.startswith(stage.prefixes)} if stage.best_in_state else {}
        return ResumeState(
            stage=stage.kind, epoch=epoch, history=self.history, trainable=trained, optimizer=optimizer.state_dict(),
            schedule=schedule.state_dict(), best_acc=self.best.acc, best_loss=self.best.loss, best_epoch=self.best.epoch,
            best_trainable=best, best_val_logits=self.best.val_logits, rng=rng_state(stage.generator),
            skipped=self.split.skipped, num_train=len(self.split.train), num_val=len(self.split.val),
            classes=self.split.classes, stopped_stage=self.early.stopped_stage, files_digest=self.files_digest,
            head_choice=self.head_choice, candidates=self.candidates, learning_curve=self.learning_curve,
            tail_plan=self.tail_plan, finetune_plan=self.finetune_plan, average=average.state_dict() if average is not None else {},
            seconds=self.seconds_so_far(),
        )

    def restore(self, state: ResumeState, device: torch.device) -> None:
        """Progress and weights as they were after the state's epoch."""
        self.history = list(state.history)
        self.best.acc, self.best.loss, self.best.epoch = state.best_acc, state.best_loss, state.best_epoch
        self.best.val_logits = state.best_val_logits
        self.best.follow(state.history)
        self.early.stopped_stage = state.stopped_stage
        # States written before heads were chosen had the final features of `views` views.
        self.head_choice = state.head_choice or HeadChoice(self.cfg.views or 1 + MAX_EXTRA_VIEWS, False)
        self.candidates = state.candidates
        self.learning_curve = state.learning_curve
        self.tail_plan = state.tail_plan
        self.finetune_plan = state.finetune_plan
        if self.finetune_plan is None and state.stage is Stage.FINETUNE:  # (saved before plans were: its config had the epochs)
            self.finetune_plan = {"epochs": self.cfg.finetune_epochs or 0, "why": "as asked by --finetune-epochs", "images_per_s": None}
        self.model.use_features(self.head_choice.multi_layer)  # shaped before its weights load
        self.model.load_state_dict(state.trainable, strict=state.stage is Stage.FINETUNE)
        if state.stage is Stage.FINETUNE:  # the kept model is the one in the model file
            from .files import read_safetensors

            best, _ = read_safetensors(self.folder.model_path)
            best = {k: v for k, v in best.items() if not k.startswith("distance.")}  # a finish that failed had added them
            self.folder.saved_epoch = state.best_epoch
        else:  # the frozen backbone as it is, with the best head (copies: the live weights train on)
            best = {**{k: v.clone() for k, v in self.model.state_dict().items()}, **state.best_trainable}
        self.best.state = {k: v.to(device) for k, v in best.items()}

    def adopt_head(self, head_state: ResumeState, device: torch.device) -> None:
        """Take a candidate head's training (recipe.try_head: the head stage on the same features,
        from the same seed) as this run's head stage, as if the stage had just ended: its epochs,
        weights and random streams, and its resume state in the run folder."""
        # (the state file's seconds: this run's so far; the candidate's own are part of them already)
        state = replace(head_state, files_digest=self.files_digest, head_choice=self.head_choice, candidates=self.candidates,
                        learning_curve=self.learning_curve, tail_plan=self.tail_plan, finetune_plan=self.finetune_plan,
                        seconds=self.seconds_so_far())
        self.restore(state, device)
        restore_rng(state.rng, None)  # (the candidate trained on forked streams: they go on from where it left them)
        for record in self.history:
            self.reporter.epoch(record)
        if self.early.stopped_stage is Stage.HEAD:  # (said by the candidate to no one)
            self.reporter.info(early_stop_message(self.early.patience))
        self.folder.save_state(state, self.history)

    def seconds_so_far(self) -> float:
        """The run's time: this process's, and a resumed run's before it (its time while stopped not counted)."""
        return self.seconds_before + time.perf_counter() - self.started

    def seconds_left(self) -> float | None:
        """What the run has left of --time-budget (None: no budget)."""
        return None if self.deadline is None else max(0.0, self.deadline - time.perf_counter())

    @property
    def deadline(self) -> float | None:
        """time.perf_counter() at which --time-budget runs out (None: no budget); counted from this
        process's start (a resumed run has its budget anew)."""
        return self.started + self.cfg.time_budget if self.cfg.time_budget else None

    def share_from_main(self, d: Dist) -> None:
        """Give every rank rank 0's progress (after a stage that only rank 0 ran)."""
        if not d.active:
            return
        mine = (self.history, self.best.acc, self.best.loss, self.best.epoch, self.best.val_logits, self.early.stopped_stage,
                self.head_choice, self.finetune_plan, {k: v.cpu() for k, v in self.best.state.items()}) if d.is_main else None
        (self.history, self.best.acc, self.best.loss, self.best.epoch, self.best.val_logits, self.early.stopped_stage,
         self.head_choice, self.finetune_plan, state) = d.broadcast(mine)
        self.best.follow(self.history)
        self.model.use_features(self.head_choice.multi_layer)
        device = next(self.model.parameters()).device
        self.best.state = {k: v.to(device) for k, v in state.items()}


def about(seconds: float) -> str:
    """A measured duration in words: 'about 12 s', or 'under a second' (not 'about 0 s')."""
    return "under a second" if seconds < 0.5 else f"about {seconds:.0f} s"


def no_time_for_another_epoch(run: Run, epoch_seconds: float) -> bool:
    """Whether what --time-budget has left, less what it keeps back for the test split, is less
    than an epoch takes (the one just done, its val pass and the files it writes included).
    Planning measured a stage's pace before it started; what it left out (the files written each
    epoch, a bigger share on small images) is caught here."""
    left = run.seconds_left()
    return left is not None and left - run.budget_reserve_s < epoch_seconds


def stop_for_the_time_budget(stage, run: Run, epoch: int, epoch_seconds: float) -> None:
    """End the stage as early stopping does (a resumed run counts it done), and say so where the plan is."""
    run.early.stopped_stage = stage.kind
    plan = {Stage.TAIL: run.tail_plan, Stage.FINETUNE: run.finetune_plan}.get(stage.kind)
    if plan is not None:
        plan["stopped_after"] = epoch
    # (not this rank's seconds left: under torchrun another rank's clock may have decided)
    run.reporter.info(f"time budget: another epoch ({about(epoch_seconds)}) would not fit in what is left: "
                      f"{stage.title.lower()} stops after epoch {epoch} of {stage.epochs}")


def early_stop_message(patience: int) -> str:
    return f"early stop: no better val epoch (higher accuracy, or as high with a lower loss) for {patience} epochs"


def warmup_cosine(step: int, total: int, warmup: int) -> float:
    """Learning-rate factor: linear warm-up, then cosine decay to zero."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def fit_stage(stage, run: Run, done: int = 0, resumed: ResumeState | None = None) -> None:
    """Train `stage` (stages.HeadStage, TailStage or FinetuneStage) from epoch `done` + 1 to its last epoch,
    or until early stopping ends it. `resumed`: the state to continue from when `done` > 0."""
    groups = [{**g, "params": list(g["params"])} for g in stage.param_groups()]  # (read twice below)
    optimizer = make_optimizer(groups, run.cfg, stage.device)
    total = stage.steps_per_epoch * stage.epochs
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, total, stage.warmup_steps))
    average = weight_average(stage, groups, run.cfg)
    if done:
        load_optimizer_state(optimizer, resumed.optimizer, run.folder.path)
        schedule.load_state_dict(resumed.schedule)
        restore_rng(resumed.rng, stage.generator)
        if average is not None:
            average.load_state_dict(resumed.average)
    scaler = loss_scaler(stage)
    first_epoch_of_stage = len(run.history) - done + 1
    reporter, d = run.reporter, stage.dist
    if not stage.bar_per_epoch:
        reporter.start(stage.title, stage.epochs)
        reporter.advance(done)
    with stage.batchnorm_folded(), interrupts_deferred(d) as interrupt:
        for epoch in range(done + 1, stage.epochs + 1):
            stage.start_epoch(epoch)
            t0 = time.perf_counter()
            if stage.bar_per_epoch:
                reporter.start(f"{stage.title} epoch {epoch}/{stage.epochs}", stage.epoch_size)
            totals = train_one_epoch(stage, optimizer, schedule, scaler, interrupt, reporter if stage.bar_per_epoch else None,
                                     average)
            if stage.bar_per_epoch:
                reporter.finish()
            if not math.isfinite(totals[0]):  # (the same sums on every rank: they all stop)
                run.folder.discard_state()  # (resumed, with its --lr, it would diverge again)
                raise TrainingDiverged(f"training diverged: the loss became {totals[0]} in {stage.title.lower()}, epoch "
                                       f"{epoch}, the learning rate too high; start again with a lower --lr (it is "
                                       f"{run.cfg.lr:g}, the default {TrainConfig.lr:g}). Nothing of that epoch was kept.")
            with average.in_model() if average is not None else nullcontext():
                val_logits, val_y = stage.validate()
                record = keep_epoch(stage, run, optimizer, (*totals, time.perf_counter() - t0), val_logits, val_y)
            stop = end_epoch(stage, run, epoch, first_epoch_of_stage, optimizer, schedule, average, time.perf_counter() - t0)
            if not stage.bar_per_epoch:
                reporter.advance(1, loss=round(record.train_loss, 4), acc=round(record.train_acc, 4),
                                 val_acc=round(record.val_acc, 4))
            if stop:
                break
            if epoch < stage.epochs and d.any_of(interrupt.requested)[0]:  # a Ctrl-C during validation
                raise KeyboardInterrupt
    if not stage.bar_per_epoch:
        reporter.finish()


def make_optimizer(groups: list[dict], cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    # Fused: one kernel per step instead of a few per tensor, which is most of a head's step on a
    # CPU (a 2,064 -> 2 head at batch 32: 1.71 -> 1.37 ms per step); equal to float rounding. Only
    # where every tensor is contiguous (the heads'): a channels_last weight whose moments come
    # back contiguous from a resumed state would not line up element for element.
    plain = all(p.is_contiguous() for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, weight_decay=cfg.weight_decay, fused=(plain and device.type in ("cpu", "cuda")) or None)


def weight_average(stage, groups: list[dict], cfg: TrainConfig) -> WeightAverage | None:
    """Stages that start from a trained model validate and keep their weights' average (averaging.py)."""
    if not (stage.averaged and cfg.average_epochs):
        return None
    return WeightAverage(named_in(stage.model, [p for g in groups for p in g["params"]]), cfg.average_epochs * stage.steps_per_epoch)


def loss_scaler(stage) -> torch.amp.GradScaler:
    # fp16 needs loss scaling to keep small gradients; bf16 has fp32's range and does not.
    return torch.amp.GradScaler(stage.device.type, enabled=stage.amp == torch.float16)


def take_step(stage, optimizer, scaler, average: WeightAverage | None, x: torch.Tensor,
              y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step of `stage` on a batch (the average updated after it): its logits and loss."""
    with autocast(stage.device, stage.amp):
        logits = stage.net(x)
        loss = stage.loss(logits, y)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    if average is not None:
        average.update()
    return logits, loss


@dataclass(frozen=True)
class Pace:
    """How fast a stage trains here, measured by measure_pace."""
    startup_s: float  # until its loader's first batch: the workers start anew for each pass (training, then val)
    images_per_s: float  # training images a second after that, each step's optimizer and loader included

    def epoch_seconds(self, train: int, val: int) -> float:
        """An epoch: its training steps, then its val pass (forward only: about a third of a step's time)."""
        return 2 * self.startup_s + (train + val / 3) / self.images_per_s


def measure_pace(stage, seconds: float) -> Pace | None:
    """Train `stage` (built on a copy of the model: its weights change) as fit_stage would, its loader,
    optimizer, weight average and folded BatchNorm included, for `seconds` after a first step that
    warms up (at least two steps more, at most an epoch), and time it. The parts left out of a pace
    measured from the network's passes alone cost about 45% on 64-px images on a 2-core CPU: the
    optimizer step, the loader's workers taking cores from the maths, and their start each epoch
    (BENCHMARKS.md, "Fine-tuning's planned pace"). The run's random streams are left as they were.
    None where no batch could be read (its files deleted since they were scanned, say)."""
    groups = [{**g, "params": list(g["params"])} for g in stage.param_groups()]
    optimizer, scaler = make_optimizer(groups, stage.cfg, stage.device), loss_scaler(stage)
    average = weight_average(stage, groups, stage.cfg)
    devices = [] if stage.device.type == "cpu" else [stage.device]
    images = steps = 0
    startup = t0 = None
    with torch.random.fork_rng(devices=devices, device_type=stage.device.type), stage.batchnorm_folded():
        stage.start_epoch(1)
        stage.train_mode()
        started = time.perf_counter()
        for batch in stage.batches():
            if batch is None:
                continue
            if startup is None:
                startup = time.perf_counter() - started
            take_step(stage, optimizer, scaler, average, *batch)
            synchronize(stage.device)
            if t0 is None:  # (the warm-up step: cuDNN chooses its algorithms, oneDNN builds its kernels)
                t0, first = time.perf_counter(), len(batch[1])
                continue
            images, steps = images + len(batch[1]), steps + 1
            if steps >= 2 and time.perf_counter() - t0 >= seconds:
                break
    if startup is None:
        return None
    if not steps:  # (an epoch of one batch: its warm-up step is all there is to time)
        return Pace(startup, first / max(t0 - started - startup, 1e-9))
    return Pace(startup, images / max(time.perf_counter() - t0, 1e-9))


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict, run_dir: Path) -> None:
    """The resumed stage's optimizer state; one saved with other parameter groups (by another
    version of this tool) is refused in one line."""
    try:
        optimizer.load_state_dict(state)
    except ValueError:
        raise UsageError(f"--resume {run_dir}: its training state was saved by another version of finetune "
                         "(its optimizer does not fit this stage); start a new run.") from None


def train_one_epoch(stage, optimizer, schedule, scaler, interrupt, reporter: Reporter | None,
                    average: WeightAverage | None = None) -> tuple[float, float, float]:
    """One pass over the stage's batches: (loss sum, correct, images) over all ranks. `reporter`:
    where the running figures go, if anywhere; `average`: updated after each step."""
    stage.train_mode()
    # Each step's loss and hits stay on the device until they are added up: reading one (.item())
    # makes the CPU wait for every step queued on a GPU. They are added up every SUM_EVERY_STEPS
    # steps (fixed, so that a run and its resumed twin add the same numbers in the same order)
    # and at the epoch's end; the bar reads them every REPORT_EVERY_S.
    pending = PendingSums()
    loss_sum = correct = 0.0
    seen = 0
    shown: dict[str, float] = {}
    t0 = last_shown = time.perf_counter()
    for batch in stage.batches():
        # All ranks take each step together: Ctrl-C stops them at the same step, and a batch
        # whose files all failed to decode on one rank (deleted since the features were
        # computed, say) is skipped by every rank, so optimizers and schedules stay in step.
        stop, skip = stage.dist.any_of(interrupt.requested, batch is None)
        if stop:
            raise KeyboardInterrupt
        if skip:
            continue
        x, y = batch
        logits, loss = take_step(stage, optimizer, scaler, average, x, y)
        schedule.step()
        pending.add(loss, (logits.argmax(1) == y).sum(), len(y))
        seen += len(y)
        if len(pending.sizes) == SUM_EVERY_STEPS:
            loss_sum, correct = pending.added_to(loss_sum, correct)
            pending = PendingSums()
        if reporter is not None:
            now = time.perf_counter()
            if now - last_shown >= REPORT_EVERY_S:
                shown_loss, shown_correct = pending.added_to(loss_sum, correct)
                shown = {"loss": round(shown_loss / seen, 4), "acc": round(shown_correct / seen, 4)}
                last_shown = now
            reporter.advance(len(y), **shown, images_per_s=round(seen / (now - t0), 1))
    return tuple(stage.dist.sum(*pending.added_to(loss_sum, correct), float(seen)))


@dataclass
class PendingSums:
    """Steps' losses (means over their images) and hit counts, still on the device."""

    losses: list[torch.Tensor] = field(default_factory=list)
    hits: list[torch.Tensor] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)

    def add(self, loss: torch.Tensor, hits: torch.Tensor, size: int) -> None:
        self.losses.append(loss.detach())
        self.hits.append(hits)
        self.sizes.append(size)

    def added_to(self, loss_sum: float, correct: float) -> tuple[float, float]:
        """The totals with these steps added (loss x images, hits), read from the device at once."""
        if not self.losses:
            return loss_sum, correct
        per_step = torch.stack(self.losses).float().cpu().double()  # (float64 on the CPU: MPS has none)
        loss_sum += float((per_step * torch.tensor(self.sizes, dtype=torch.float64)).sum())
        return loss_sum, correct + float(torch.stack(self.hits).cpu().sum())


def keep_epoch(stage, run: Run, optimizer, totals: tuple[float, float, float, float], val_logits: torch.Tensor,
               val_y: torch.Tensor) -> EpochRecord:
    """Record the epoch of the model as validated and keep that model or not (tracking.py)."""
    loss_sum, correct, seen, seconds = totals
    record = EpochRecord(
        epoch=len(run.history) + 1, stage=stage.kind, train_loss=loss_sum / max(1, seen), train_acc=correct / max(1, seen),
        val_loss=F.cross_entropy(val_logits.float(), val_y).item(),
        val_acc=(val_logits.argmax(1) == val_y).sum().item() / max(1, len(val_y)),  # exact, as evaluate's accuracy
        lr=optimizer.param_groups[-1]["lr"], seconds=seconds, images_per_s=seen / max(seconds, 1e-9),
    )
    run.history.append(record)
    run.reporter.epoch(record)
    if run.best.offer(record, run.model, val_logits, stage.prefixes) and not stage.best_in_state:
        run.save_best()  # the state file below may point at it, so it goes first
    return record


def end_epoch(stage, run: Run, epoch: int, first_epoch_of_stage: int, optimizer, schedule,
              average: WeightAverage | None, epoch_seconds: float) -> bool:
    """Decide on early stopping (returned) and save the resume state (the weights as trained).
    `epoch_seconds`: what the epoch took so far (its model file written, if it was kept)."""
    stop = run.early.should_stop(stage.kind, len(run.history), best_val_epoch(run.history), first_epoch_of_stage)
    epoch_seconds += run.state_save_s  # (the state this epoch writes below, as long as the last one took)
    if stop:
        run.reporter.info(early_stop_message(run.early.patience))
    elif (stage.kind is not Stage.HEAD and epoch < stage.epochs
          and stage.dist.any_of(no_time_for_another_epoch(run, epoch_seconds))[0]):
        # (the head's epochs take milliseconds, and its model is the least a run gives; every rank decides alike)
        stop_for_the_time_budget(stage, run, epoch, epoch_seconds)
        stop = True
    t0 = time.perf_counter()
    run.folder.save_state(run.resume_state(stage, epoch, optimizer, schedule, average), run.history)
    run.state_save_s = time.perf_counter() - t0
    return stop
