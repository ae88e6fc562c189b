"""Which epoch's model the run keeps, and when a stage should stop early."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch

from .records import EpochRecord, Stage


class BestEpoch:
    """The epoch whose model the run keeps, and its weights.

    Each stage ends on a converged model (its learning rate decays to zero), and picking the
    best of its own epochs on val picks among near-equal models by a handful of val images:
    noise that overstates val accuracy and moves test accuracy by the seed (chest X-rays, five
    seeds: test 0.9757-0.9872 for the best epoch, 0.9808-0.9872 for the last; BENCHMARKS.md).
    So within a stage a later epoch replaces an earlier one, as long as it is no worse on val
    than what the earlier stages kept (accuracy, then loss): the first stage keeps its last
    epoch; a later stage (the tail, fine-tuning) takes over only where it beats them, and its
    epochs that do not leave the earlier model kept."""

    def __init__(self) -> None:
        self.acc, self.loss, self.epoch = -1.0, math.inf, 0
        self.state: dict[str, torch.Tensor] | None = None
        self.val_logits: torch.Tensor | None = None  # its logits on the val set [images, classes]: the report, calibration
        self.stage: Stage | None = None  # the stage of the last epoch offered
        self.to_beat = (-1.0, math.inf)  # val accuracy and loss kept when that stage began

    def takes(self, record: EpochRecord) -> bool:
        """Whether this epoch (the next one of the run) replaces the kept one; follows the stages."""
        if record.stage != self.stage:
            self.stage, self.to_beat = record.stage, (self.acc, self.loss)
        acc, loss = self.to_beat
        return record.val_acc > acc or (record.val_acc == acc and record.val_loss <= loss)

    def offer(self, record: EpochRecord, model: torch.nn.Module, val_logits: torch.Tensor,
              trained: tuple[str, ...] = ("",)) -> bool:
        """Keep this epoch if the rule above takes it; returns whether it did. `trained`: the
        prefixes of what the stage trains (stages.*.prefixes)."""
        if self.takes(record):
            self.acc, self.loss, self.epoch = record.val_acc, record.val_loss, record.epoch
            self.state = self.copy_of(model.state_dict(), trained)
            self.val_logits = val_logits.float().cpu()
            return True
        return False

    def copy_of(self, live: dict[str, torch.Tensor], trained: tuple[str, ...]) -> dict[str, torch.Tensor]:
        """A copy of the model's weights. Every epoch of the head stage is kept now, and what it
        does not train (the backbone: 13 MB for efficientnet_lite0, 100 MB for a ResNet-50) is still
        as the kept copy has it: those tensors are shared with it, the stage's own are copied."""
        if self.state is None or self.state.keys() != live.keys():
            return copy.deepcopy(live)
        return {k: copy.deepcopy(v) if k.startswith(trained) else self.state[k] for k, v in live.items()}

    def follow(self, history: list[EpochRecord]) -> None:
        """Where the rule stands after `history` (a resumed run): the stage, and what it must beat."""
        replay = BestEpoch()
        for record in history:
            if replay.takes(record):
                replay.acc, replay.loss = record.val_acc, record.val_loss
        self.stage, self.to_beat = replay.stage, replay.to_beat


def best_val_epoch(history: list[EpochRecord]) -> int:
    """The epoch (1-based) with the best val accuracy, then the lower loss; 0 for none: what
    early stopping waits on."""
    if not history:
        return 0
    return max(range(len(history)), key=lambda i: (history[i].val_acc, -history[i].val_loss, -i)) + 1


@dataclass
class EarlyStopping:
    """Ends a stage after `patience` epochs without a better val epoch (0: never): a higher accuracy,
    or as high with a lower loss, as the kept epoch is chosen (on small val sets accuracy soon
    stops moving while the loss still falls)."""

    patience: int
    stopped_stage: Stage | None = None  # the last stage it ended

    @property
    def stopped_early(self) -> bool:
        return self.stopped_stage is not None

    def should_stop(self, stage: Stage, epochs_done: int, best_epoch: int, stage_first_epoch: int) -> bool:
        """Epochs are counted over the run; an improvement in an earlier stage does not count
        as one in this stage, but the stage's epochs before its first improvement do."""
        if not self.patience:
            return False
        if epochs_done - max(best_epoch, stage_first_epoch - 1) >= self.patience:
            self.stopped_stage = stage
            return True
        return False
