"""Faults for the distributed tests, put into torchrun's ranks through PYTHONPATH.

Python imports `sitecustomize` at start-up, so every rank that torchrun starts applies the
fault named by FINETUNE_TEST_FAULT before it trains. The launcher itself (no RANK) and
processes without that variable are untouched.
"""

import os

FAULT = os.environ.get("FINETUNE_TEST_FAULT")
RANK = os.environ.get("RANK")

if FAULT and RANK is not None:
    import signal

    import torch

    from finetune import data, train

    rank = int(RANK)
    original_finetune = train._Session.finetune_whole_network
    original_record = train._Session.record_epoch
    original_getitem = data.ImageFileDataset.__getitem__

    def finetune_with_fault(self, done):
        if FAULT == "oom-rank1" and rank == 1:
            raise torch.cuda.OutOfMemoryError("simulated: CUDA out of memory")
        if FAULT == "kill-rank1" and rank == 1:
            os.kill(os.getpid(), signal.SIGKILL)  # as the kernel's out-of-memory killer would
        return original_finetune(self, done)

    def record_with_fault(self, stage, *args, **kwargs):
        row = original_record(self, stage, *args, **kwargs)
        if FAULT == "ctrl-c" and rank == 0 and stage == train.FINETUNE:
            os.killpg(os.getpgrp(), signal.SIGINT)  # what a terminal's Ctrl-C does: the whole process group
        return row

    def getitem_with_fault(self, i):
        if FAULT == "undecodable-rank1" and rank == 1 and self.augment_all:  # stage 2's training images only
            return i, "simulated: the file vanished after the first stage"
        return original_getitem(self, i)

    train._Session.finetune_whole_network = finetune_with_fault
    train._Session.record_epoch = record_with_fault
    data.ImageFileDataset.__getitem__ = getitem_with_fault
