"""Which epoch is best so far, and when a stage should stop early."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch

from .records import EpochRecord, Stage


class BestEpoch:
    """The epoch with the best validation accuracy so far, and the model's weights then."""

    def __init__(self) -> None:
        self.acc, self.loss, self.epoch = -1.0, math.inf, 0
        self.state: dict[str, torch.Tensor] | None = None
        self.val_logits: torch.Tensor | None = None  # its logits on the val set [images, classes]: the report, calibration

    @property
    def val_pred(self) -> torch.Tensor | None:
        return self.val_logits.argmax(1) if self.val_logits is not None else None

    @property
    def val_probs(self) -> torch.Tensor | None:
        return self.val_logits.softmax(1) if self.val_logits is not None else None

    def offer(self, record: EpochRecord, model: torch.nn.Module, val_logits: torch.Tensor) -> bool:
        """Keep this epoch if it is better; returns whether it was."""
        # Ties on accuracy go to the lower loss: the more confident, better calibrated model.
        if record.val_acc > self.acc or (record.val_acc == self.acc and record.val_loss < self.loss):
            self.acc, self.loss, self.epoch = record.val_acc, record.val_loss, record.epoch
            self.state = copy.deepcopy(model.state_dict())
            self.val_logits = val_logits.float().cpu()
            return True
        return False


@dataclass
class EarlyStopping:
    """Ends a stage after `patience` epochs without a better val accuracy (0: never)."""

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
