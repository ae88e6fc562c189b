"""Faults for the distributed tests, put into torchrun's ranks through PYTHONPATH.

Python imports `sitecustomize` at start-up, so every rank that torchrun starts applies the
fault named by FINETUNE_TEST_FAULT before it trains. The launcher itself (no RANK) and
processes without that variable are untouched. With FINETUNE_TEST_REPORT set, each rank
writes there how many optimizer steps it took in the fine-tuning stage.
"""

import os

FAULT = os.environ.get("FINETUNE_TEST_FAULT")
RANK = os.environ.get("RANK")

if FAULT and RANK is not None:
    import math
    import signal
    import sys
    from pathlib import Path

    import torch

    from finetune import data, features, stages, training

    rank = int(RANK)
    batch_size = int(sys.argv[sys.argv.index("--batch-size") + 1])
    steps = {"finetune": 0, "counting": False, "items": 0}
    original_fit_stage = training.fit_stage
    original_getitem = data.ImageFileDataset.__getitem__
    original_step = torch.optim.AdamW.step

    def fit_stage_with_fault(stage, *args, **kwargs):
        if FAULT == "term-launcher-finetune" and isinstance(stage, stages.FinetuneStage):
            stop_launcher()
        if not isinstance(stage, stages.FinetuneStage):
            return original_fit_stage(stage, *args, **kwargs)
        if FAULT == "oom-rank1" and rank == 1:
            raise torch.cuda.OutOfMemoryError("simulated: CUDA out of memory")
        if FAULT == "kill-rank1" and rank == 1:
            os.kill(os.getpid(), signal.SIGKILL)  # as the kernel's out-of-memory killer would
        if FAULT == "kill-launcher" and rank == 0:
            os.kill(os.getppid(), signal.SIGKILL)  # `kill -9` of `finetune train --devices 2`
        steps["counting"] = True
        try:
            return original_fit_stage(stage, *args, **kwargs)
        finally:
            steps["counting"] = False
            if os.environ.get("FINETUNE_TEST_REPORT"):
                Path(os.environ["FINETUNE_TEST_REPORT"], f"steps.rank{rank}").write_text(str(steps["finetune"]))


    def getitem_with_fault(self, i):
        if FAULT == "first-batch-fails-rank1" and rank == 1 and self.augment_all:  # stage 2's training images only
            per_epoch = math.ceil(len(self.paths) / int(os.environ["WORLD_SIZE"]))  # this rank's share
            position = steps["items"] % per_epoch
            steps["items"] += 1
            if position < batch_size:
                return i, "simulated: the file vanished after the first stage"
        return original_getitem(self, i)

    def counted_step(self, *args, **kwargs):
        if steps["counting"]:
            steps["finetune"] += 1
            if FAULT == "ctrl-c" and rank == 0 and steps["finetune"] == 3:  # mid-step, in the second epoch
                # What a terminal's Ctrl-C does: SIGINT to the foreground process group, which holds
                # the launcher (torchrun starts each rank in a session of its own).
                os.killpg(os.getpgid(os.getppid()), signal.SIGINT)
        return original_step(self, *args, **kwargs)

    def stop_launcher():
        if rank == 0:
            os.kill(os.getppid(), signal.SIGTERM)  # what `kill PID` or a scheduler does to `finetune train --devices 2`
            signal.pause()  # (until the launcher passes it on: no epoch ends meanwhile)

    original_features_of = features.FeatureExtractor.features_of

    def features_of_with_fault(self, *args, **kwargs):
        if FAULT == "term-launcher-start":  # (before the first epoch)
            stop_launcher()
        return original_features_of(self, *args, **kwargs)

    features.FeatureExtractor.features_of = features_of_with_fault
    training.fit_stage = fit_stage_with_fault
    data.ImageFileDataset.__getitem__ = getitem_with_fault
    torch.optim.AdamW.step = counted_step
