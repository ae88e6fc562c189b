"""The kinds of training stage. A stage says what is trained, on which batches, with which
learning rates and how it is validated; `fit.fit_stage` runs any of them the same way.

- HeadStage: a new head on the cached features of the frozen backbone (seconds);
  StreamedHeadStage the same over features kept in a file (store.py), block by block.
- TailStage: the backbone's last blocks and the head, on the activations entering those blocks
  that the feature pass kept (no decoding: about 200 image views a second on a 2-core CPU).
- FinetuneStage: the whole network on freshly augmented images, the backbone at a lower
  learning rate (minutes per epoch on a CPU), on every rank under torchrun.
"""

from __future__ import annotations

import contextlib
import math
import time
from typing import Callable, ContextManager, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data.distributed import DistributedSampler

from .config import TrainConfig
from .data import DatasetSplit, ImageFileDataset, Preprocessing, make_loader
from .device import autocast, autocast_dtype, forward_in_chunks, synchronize, to_model_input
from .distributed import SINGLE, Dist
from .features import FeatureSet
from .fold import folded_while_frozen, probe_images
from .models import Classifier
from .records import Stage

Batch = tuple[torch.Tensor, torch.Tensor]  # model input, labels; None for a batch whose images all failed
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def make_loss(cfg: TrainConfig, class_counts: list[int], device: torch.device) -> LossFn:
    """Cross-entropy with label smoothing, and inverse-frequency class weights when asked for: each
    image's loss weighs its class's weight (a weighted mean over the batch). Not cross_entropy's
    `weight=`, which weighs the smoothing's share of each class by that class's weight too: at 20:1
    the rare class's share outweighed a common image's own label (its best answer was the rare
    class: a trial's X-rays, val 0.97 -> 0.54)."""
    smoothing = cfg.label_smoothing
    if not cfg.class_weights:
        return lambda logits, y: F.cross_entropy(logits.float(), y, label_smoothing=smoothing)
    weights = inverse_frequency_weights(class_counts).to(device)

    def weighted(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        w = weights[y]
        return (F.cross_entropy(logits.float(), y, reduction="none", label_smoothing=smoothing) * w).sum() / w.sum()

    return weighted


def inverse_frequency_weights(counts: list[int]) -> torch.Tensor:
    """Each class weighs total / (classes x its count): rare classes count as much as common ones."""
    total, n = sum(counts), len(counts)
    return torch.tensor([total / (n * max(c, 1)) for c in counts], dtype=torch.float32)


class HeadStage:
    """Epochs take milliseconds, so one process trains it (under torchrun the other ranks wait
    for its outcome) and the progress bar counts epochs, not batches."""

    kind = Stage.HEAD
    title = "Head (frozen backbone)"
    bar_per_epoch = False
    dist = SINGLE
    amp = None  # the head always runs in fp32
    prefixes = ("feature_norm.", "head.")  # what it sets and trains, by name in the model
    best_in_state = True  # the best head is tiny: kept in the state file, not rewritten to the model file each epoch
    averaged = False  # the head validates and keeps its weights as trained (the later stages: averaging.py)

    def __init__(self, model: Classifier, features: FeatureSet, loss: LossFn, cfg: TrainConfig, device: torch.device):
        n, views, dim = features.train.shape
        self.model, self.loss, self.device = model, loss, device
        self.net = nn.Sequential(model.feature_norm, model.head)  # on raw cached features; the norm is fixed
        self.x, self.y = features.train.reshape(n * views, dim).to(device), features.train_labels.repeat_interleave(views).to(device)
        self.x_val, self.y_val = features.val.to(device), features.val_labels.to(device)
        self.epochs, self.batch_size, self.lr = cfg.epochs, cfg.batch_size, cfg.lr
        self.steps_per_epoch = math.ceil(len(self.x) / cfg.batch_size)
        self.warmup_steps = self.steps_per_epoch
        self.epoch_size = len(self.x)
        self.generator = torch.Generator().manual_seed(cfg.seed)  # the shuffling; saved with the resume state

    def param_groups(self) -> list[dict]:
        return [{"params": self.net.parameters(), "lr": self.lr}]

    def start_epoch(self, epoch: int) -> None:
        pass

    def train_mode(self) -> None:
        self.net.train()

    def batchnorm_folded(self) -> ContextManager:
        """What the stage trains within: the head has no BatchNorm (the later stages: fold.py)."""
        return contextlib.nullcontext()

    def batches(self) -> Iterator[Batch]:
        order = torch.randperm(len(self.x), generator=self.generator).to(self.x.device)
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            yield self.x[idx].float(), self.y[idx]

    @torch.no_grad()
    def validate(self) -> tuple[torch.Tensor, torch.Tensor]:
        self.net.eval()
        return self.net(self.x_val.float()), self.y_val


class StreamedHeadStage(HeadStage):
    """The head stage over a feature table kept in a file (store.DiskRows): each epoch reads the
    blocks in a random order and shuffles the rows within each block, so that memory holds one
    block at a time whatever the number of images."""

    def __init__(self, model: Classifier, features: FeatureSet, loss: LossFn, cfg: TrainConfig, device: torch.device):
        n, views, dim = features.train.shape
        self.model, self.loss, self.device = model, loss, device
        self.net = nn.Sequential(model.feature_norm, model.head)
        self.rows, self.labels, self.views = features.train, features.train_labels, views
        self.val_rows, self.y_val = features.val, features.val_labels.to(device)
        self.epochs, self.batch_size, self.lr = cfg.epochs, cfg.batch_size, cfg.lr
        self.steps_per_epoch = sum(math.ceil((stop - start) * views / cfg.batch_size) for start, stop in self.rows.blocks())
        self.warmup_steps = self.steps_per_epoch
        self.epoch_size = n * views
        self.generator = torch.Generator().manual_seed(cfg.seed)

    def batches(self) -> Iterator[Batch]:
        blocks = self.rows.blocks()
        # (One block: the very batches HeadStage draws from the same features in memory.)
        for b in torch.randperm(len(blocks), generator=self.generator).tolist() if len(blocks) > 1 else [0]:
            start, stop = blocks[b]
            x = self.rows.block(start, stop).reshape(-1, self.rows.shape[-1])
            y = self.labels[start:stop].repeat_interleave(self.views)
            order = torch.randperm(len(x), generator=self.generator)
            for first in range(0, len(order), self.batch_size):
                idx = order[first:first + self.batch_size]
                yield x[idx].float().to(self.device), y[idx].to(self.device)

    @torch.no_grad()
    def validate(self) -> tuple[torch.Tensor, torch.Tensor]:
        self.net.eval()
        logits = [self.net(self.val_rows.block(start, stop).reshape(stop - start, -1).float().to(self.device))
                  for start, stop in self.val_rows.blocks()]
        return torch.cat(logits), self.y_val


def head_stage(model: Classifier, features: FeatureSet, loss: LossFn, cfg: TrainConfig, device: torch.device) -> HeadStage:
    """The head stage for where the features are: in memory, or in a file read block by block."""
    kind = StreamedHeadStage if features.on_disk else HeadStage
    return kind(model, features, loss, cfg, device)


class _TailNet(nn.Module):
    """Cached rows -> logits: the tail run on the kept activations, the head on every stage."""

    def __init__(self, model: Classifier):
        super().__init__()
        self.model = model

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        return self.model.logits_of_stages(self.model.stages_from_rows(rows))


class TailStage(HeadStage):
    """It starts from the trained head, with BatchNorm's statistics frozen and the whole stage at
    the backbone's learning rate (lr x backbone_lr_ratio), so that it starts from the head's
    model; it validates the average of its weights (averaging.py), and that is kept where it
    is no worse on val than the head (tracking.py). Like the head, one process trains it.
    Its blocks train and validate in the precision the device runs natively (bf16 on AMX CPUs
    and recent GPUs), as fine-tuning and prediction run them; the head stays in fp32."""

    kind = Stage.TAIL
    title = "Tail (last blocks)"
    bar_per_epoch = True
    best_in_state = True  # the tail's weights are a small part of the backbone: kept in the state file
    averaged = True  # it starts from a trained model: validates and keeps its weights' average (averaging.py)
    VAL_CHUNK = 256

    def __init__(self, model: Classifier, rows: FeatureSet, loss: LossFn, cfg: TrainConfig, device: torch.device, epochs: int):
        super().__init__(model, rows, loss, cfg, device)
        self.net = _TailNet(model)
        self.prefixes = (*model.tail_prefixes(), "feature_norm.", "head.")
        self.epochs, self.lr = epochs, cfg.lr * cfg.backbone_lr_ratio
        self.warmup_steps = self.steps_per_epoch  # (the textures' first-epoch dip on val was the same with half an epoch)
        self.amp = autocast_dtype(device)

    def param_groups(self) -> list[dict]:
        return [{"params": [*self.model.tail_parameters(), *self.model.head.parameters()], "lr": self.lr}]

    def train_mode(self) -> None:
        self.net.train()
        freeze_batchnorm(self.model)

    def batchnorm_folded(self) -> ContextManager:
        """BatchNorm's frozen statistics computed inside the convolutions (fold.py), checked on two rows."""
        return folded_while_frozen(self.model, lambda: self.net(self.x[:2].float()))

    @torch.no_grad()
    def validate(self) -> tuple[torch.Tensor, torch.Tensor]:
        self.net.eval()
        with autocast(self.device, self.amp):
            logits = [self.net(self.x_val[i:i + self.VAL_CHUNK].float()) for i in range(0, len(self.x_val), self.VAL_CHUNK)]
        return torch.cat(logits), self.y_val

    def measure_seconds_per_epoch(self) -> float:
        """A training epoch's time on this device, from two forward and backward passes of a batch
        (after one that warms up); the weights are left as they were (no optimizer step)."""
        x, y = self.x[:self.batch_size].float(), self.y[:self.batch_size]

        def step() -> None:
            with autocast(self.device, self.amp):
                loss = self.loss(self.net(x), y)
            loss.backward()

        with self.batchnorm_folded():  # (as the stage trains)
            self.train_mode()
            seconds = fastest_pass(step, self.device)
        self.net.zero_grad(set_to_none=True)
        return seconds * len(self.x) / len(x)


def freeze_batchnorm(model: nn.Module) -> None:
    """BatchNorm layers keep their running statistics (and use them) while the rest trains."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def finetune_train_images(split: DatasetSplit, pp: Preprocessing, cfg: TrainConfig, light: bool) -> ImageFileDataset:
    """The training images as fine-tuning reads them: each decoded and augmented anew."""
    return ImageFileDataset([s.path for s in split.train], pp, cfg.max_pixels, views=1, augment_all=True, light=light)


def fastest_pass(step: Callable[[], None], device: torch.device) -> float:
    """Seconds of the faster of two timed calls of `step` (a training pass), after one that warms
    up (cuDNN chooses its algorithms then), the device's queued work waited for. Dropout draws
    random numbers: the run's streams are left as they were, so a planned stage trains as one
    asked for does."""
    times = []
    with torch.random.fork_rng(devices=[] if device.type == "cpu" else [device], device_type=device.type):
        for _ in range(3):
            synchronize(device)
            t0 = time.perf_counter()
            step()
            synchronize(device)
            times.append(time.perf_counter() - t0)
    return min(times[1:])


def finetune_param_groups(model: Classifier, lr: float, early_ratio: float) -> list[dict]:
    """Whole-network fine-tuning's learning rates. The head is trained already: at the head
    stage's rate it would first move away from what it learnt while the features under it
    change, so it goes at `lr`, the backbone's pace, with the tail's blocks. The blocks before
    those compute the general features the head and the tail were fitted on: at `lr` they moved
    enough to take the textures' val from 0.9750 to 0.9625 in the first epoch; at a tenth of it
    (`early_ratio`) that epoch read 0.9792 (BENCHMARKS.md)."""
    late = {id(p) for p in model.tail_parameters()}
    if not late:  # (an arch without tail blocks here: the whole backbone at one rate)
        return [{"params": list(model.backbone.parameters()), "lr": lr}, {"params": list(model.head.parameters()), "lr": lr}]
    backbone = list(model.backbone.parameters())
    return [{"params": [p for p in backbone if id(p) not in late], "lr": lr * early_ratio},
            {"params": [p for p in backbone if id(p) in late], "lr": lr},
            {"params": list(model.head.parameters()), "lr": lr}]


class FinetuneStage:
    """Every rank trains on its shard of the images (DDP averages the gradients) and validates
    its share of the val set; an epoch gets a progress bar of its own."""

    kind = Stage.FINETUNE
    title = "Fine-tune"
    bar_per_epoch = True
    prefixes = ("",)  # the whole model
    best_in_state = False  # the kept model is in the model file, written when it changes
    averaged = True  # as the tail stage
    generator = None

    def __init__(self, model: Classifier, split: DatasetSplit, pp: Preprocessing, loss: LossFn, cfg: TrainConfig,
                 device: torch.device, d: Dist, epochs: int, light_augmentation: bool = False):
        self.model, self.loss, self.cfg, self.device, self.dist = model, loss, cfg, device, d
        self.amp, self.img_size = autocast_dtype(device), pp.img_size
        self.epochs = epochs
        train_ds = finetune_train_images(split, pp, cfg, light_augmentation)
        self.val_mine = d.shard(list(range(len(split.val))))  # each rank validates its share
        val_ds = ImageFileDataset([split.val[i].path for i in self.val_mine], pp, cfg.max_pixels, views=1)
        self.labels = torch.tensor([s.label for s in split.train])
        self.val_labels = torch.tensor([s.label for s in split.val])
        pin = device.type == "cuda"
        # Each rank trains on its own shard. A single process uses the same sampler (one shard
        # of one), so a run under torchrun with one process sees the very batches of a plain run.
        self.sampler = DistributedSampler(train_ds, num_replicas=d.world, rank=d.rank, shuffle=True, seed=cfg.seed)
        self.net = model
        if d.active:  # DDP averages the gradients (and syncs the weights at the start)
            self.net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        self.train_loader = make_loader(train_ds, cfg.batch_size, cfg.workers, pin_memory=pin, seed=cfg.seed, sampler=self.sampler)
        self.val_loader = make_loader(val_ds, cfg.batch_size, cfg.workers, pin_memory=pin, seed=cfg.seed)
        self.steps_per_epoch = max(1, len(self.train_loader))
        self.warmup_steps = self.steps_per_epoch  # a whole epoch of warm-up, as the tail stage
        self.epoch_size = len(self.sampler)

    def param_groups(self) -> list[dict]:
        return finetune_param_groups(self.model, self.cfg.lr * self.cfg.backbone_lr_ratio, self.cfg.early_lr_ratio)

    def train_mode(self) -> None:
        """Training mode with BatchNorm's statistics frozen: the first steps then start from the
        very model the head stage ended with (batch statistics of small batches would first
        make it worse), and the weights, BatchNorm's affine ones included, still learn."""
        self.net.train()
        freeze_batchnorm(self.model)

    def batchnorm_folded(self) -> ContextManager:
        """BatchNorm's frozen statistics computed inside the convolutions (fold.py), checked on two images."""
        return folded_while_frozen(self.model, lambda: self.model(probe_images(self.img_size, self.device)))

    def start_epoch(self, epoch: int) -> None:
        # Shuffling, augmentation and worker seeds depend only on (seed, epoch, rank): a resumed
        # run sees the same batches.
        seed = self.cfg.seed
        self.train_loader.generator.manual_seed(seed * 100_003 + epoch)
        torch.manual_seed(seed * 100_003 + epoch * 1_009 + self.dist.rank)
        self.sampler.set_epoch(epoch)

    def batches(self) -> Iterator[Batch | None]:
        for indices, batch, _failed in self.train_loader:
            yield None if batch is None else (to_model_input(batch[:, 0], self.device), self.labels[indices].to(self.device))

    @torch.inference_mode()
    def validate(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits for the whole val set, in order, on every rank (each rank computes its share)."""
        self.model.eval()
        outs, idx = [], []
        for indices, batch, _failed in self.val_loader:
            if batch is None:
                continue
            with autocast(self.device, self.amp):
                outs.append(forward_in_chunks(self.model, to_model_input(batch[:, 0], self.device), self.device, self.amp).float().cpu())
            idx.extend(self.val_mine[i] for i in indices)
        classes = self.model.head[1].out_features
        all_idx, logits = self.dist.gather_in_order(idx, torch.cat(outs) if outs else torch.empty(0, classes))
        return logits.to(self.device), self.val_labels[all_idx].to(self.device)
