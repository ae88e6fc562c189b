"""The training state that `--resume` continues from: one dataclass that is the whole file
format (`last_state.safetensors`), saved and loaded here and nowhere else.

After every completed epoch the run folder gets this state, so an interrupted run can go on
with the optimizer, schedule, RNG, history and best metric as they were. It is written
without pickle: tensors by name, everything else as JSON metadata.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from .config import MODEL_FILENAME, RESULTS_FILENAME, TrainConfig
from .data import DatasetSplit
from .digests import is_unreadable
from .device import mps_available
from .errors import DataError, ModelFileError, UsageError
from .files import name_bytes, read_safetensors, write_safetensors
from .records import EpochRecord, HeadChoice, Stage

STATE_FILENAME = "last_state.safetensors"
STATE_KEY = "finetune_state"


@dataclass
class ResumeState:
    stage: Stage  # the stage of the last completed epoch
    epoch: int  # epochs completed in that stage
    history: list[EpochRecord]
    trainable: dict[str, torch.Tensor]  # the weights that stage trains, named as in the model
    optimizer: dict  # the optimizer's state_dict
    schedule: dict  # the learning-rate schedule's state_dict
    best_acc: float
    best_loss: float
    best_epoch: int
    # The kept epoch's weights of the stage when they are not in the model file (the head
    # stage keeps its tiny best head here instead of rewriting the model file every epoch).
    best_trainable: dict[str, torch.Tensor]
    best_val_logits: torch.Tensor | None  # val logits of the kept epoch [images, classes]
    rng: dict[str, torch.Tensor]  # "torch", "generator" (the stage's own, if any), "cuda.<i>", "mps"
    skipped: list[dict]
    num_train: int
    num_val: int
    classes: list[str]
    stopped_stage: Stage | None  # the stage that early stopping ended
    files_digest: str  # which files were in train and val when the run started ("" in old states: not checked)
    head_choice: HeadChoice | None = None  # what the head reads (None in states written before it was chosen)
    candidates: list[dict] = field(default_factory=list)  # the candidate heads' val figures
    learning_curve: list[dict] = field(default_factory=list)  # {images, val_acc} per growth step of the training set
    tail_plan: dict | None = None  # the tail stage's epochs and why, once planned
    finetune_plan: dict | None = None  # fine-tuning's epochs and why, once planned (None in older states: the config's)
    average: dict[str, torch.Tensor] = field(default_factory=dict)  # the stage's weights' average (averaging.py), by name
    seconds: float = 0.0  # the run's time up to this state (0 in older states)

    @property
    def stopped_early(self) -> bool:
        return self.stopped_stage is not None

    def save(self, path: Path) -> None:
        tensors = {f"model.{k}": v for k, v in self.trainable.items()}
        tensors.update({f"best.{k}": v for k, v in self.best_trainable.items()})
        if self.best_val_logits is not None:
            tensors["best.val_logits"] = self.best_val_logits
        tensors.update({f"rng.{k}": v for k, v in self.rng.items()})
        tensors.update({f"average.{k}": v for k, v in self.average.items()})
        for param_id, param_state in self.optimizer["state"].items():  # per-parameter tensors by name
            for name, value in param_state.items():
                tensors[f"optim.{param_id}.{name}"] = torch.as_tensor(value)
        info = {
            "stage": self.stage.value, "epoch": self.epoch, "history": [r.to_dict() for r in self.history],
            "schedule": self.schedule, "best": {"acc": self.best_acc, "loss": self.best_loss, "epoch": self.best_epoch},
            "skipped": self.skipped, "num_train": self.num_train, "num_val": self.num_val, "classes": self.classes,
            "stopped_early": self.stopped_early, "stopped_stage": self.stopped_stage and self.stopped_stage.value,
            "files_digest": self.files_digest, "optimizer_param_groups": self.optimizer["param_groups"],
            "head_choice": self.head_choice.to_dict() if self.head_choice else None, "candidates": self.candidates,
            "learning_curve": self.learning_curve, "tail_plan": self.tail_plan,
            "finetune_plan": self.finetune_plan, "seconds": self.seconds,
        }
        write_safetensors(path, tensors, info, STATE_KEY)

    @classmethod
    def load(cls, path: Path) -> "ResumeState":
        if not path.is_file():
            raise UsageError(f"{path.parent}: nothing to resume (no {path.name}); a run can be resumed after its first epoch, until it finishes.")
        damaged = ModelFileError(f"{path}: training state is damaged; it cannot be resumed. Start a new run.")
        try:
            tensors, info = read_safetensors(path, STATE_KEY)
            optimizer: dict = {"state": {}, "param_groups": info["optimizer_param_groups"]}
            for key in [k for k in tensors if k.startswith("optim.")]:
                _, param_id, name = key.split(".", 2)
                optimizer["state"].setdefault(int(param_id), {})[name] = tensors.pop(key)
            best = info["best"]
            return cls(
                stage=Stage(info["stage"]), epoch=int(info["epoch"]),
                history=[EpochRecord.from_dict(r) for r in info["history"]],
                trainable=_with_prefix(tensors, "model."), optimizer=optimizer, schedule=info["schedule"],
                best_acc=best["acc"], best_loss=best["loss"], best_epoch=best["epoch"],
                best_trainable={k: v for k, v in _with_prefix(tensors, "best.").items() if k not in ("val_pred", "val_logits")},
                best_val_logits=_val_logits(tensors, len(info["classes"])), rng=_with_prefix(tensors, "rng."),
                skipped=info["skipped"], num_train=info["num_train"], num_val=info["num_val"], classes=info["classes"],
                stopped_stage=Stage(info["stopped_stage"]) if info.get("stopped_stage") else None,
                files_digest=info.get("files_digest", ""),
                head_choice=HeadChoice(**info["head_choice"]) if info.get("head_choice") else None,
                candidates=info.get("candidates", []), learning_curve=info.get("learning_curve", []),
                tail_plan=info.get("tail_plan"), finetune_plan=info.get("finetune_plan"), average=_with_prefix(tensors, "average."),
                seconds=float(info.get("seconds", 0.0)),
            )
        except (ModelFileError, KeyError, TypeError, ValueError):
            raise damaged from None

    def check_same_data(self, split: DatasetSplit, digest: str, data: Path, run_dir: Path) -> None:
        """Refuse to go on when the data folder's classes or files changed since the run started."""
        if self.classes != split.classes:
            raise DataError(f"{data}: its class folders changed since {run_dir} started "
                            f"({', '.join(self.classes)} then, {', '.join(split.classes)} now); start a new run.")
        if not self.files_digest:
            return
        now = digest if self.files_digest.startswith(CONTENTS) else files_digest(split, data, contents=False)
        if now != self.files_digest:
            raise DataError(f"{data}: images were added, removed, renamed or changed since {run_dir} started, so "
                            "its train/val split or the val figures it kept would no longer hold; start a new run.")


def _val_logits(tensors: dict[str, torch.Tensor], num_classes: int) -> torch.Tensor | None:
    """The kept epoch's val logits; states written before they were kept had its predictions only
    (read back as logits that put nearly all the probability on the predicted class)."""
    if "best.val_logits" in tensors:
        return tensors["best.val_logits"]
    pred = tensors.get("best.val_pred")
    return 10 * torch.nn.functional.one_hot(pred.long(), num_classes).float() if pred is not None else None


def _with_prefix(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def rng_state(generator: torch.Generator | None) -> dict[str, torch.Tensor]:
    """Every random-number state a stage's epochs depend on."""
    rng = {"torch": torch.get_rng_state()}
    if generator is not None:
        rng["generator"] = generator.get_state()
    if torch.cuda.is_available():
        rng.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    if mps_available():
        rng["mps"] = torch.mps.get_rng_state()
    return rng


def restore_rng(rng: dict[str, torch.Tensor], generator: torch.Generator | None) -> None:
    torch.set_rng_state(rng["torch"])
    if generator is not None:
        generator.set_state(rng["generator"])
    if torch.cuda.is_available():
        # By GPU number (not as text: "cuda.10" sorts before "cuda.2"), those this process sees:
        # a run started with more GPUs visible than it is resumed with goes on.
        states = {int(key[5:]): state for key, state in rng.items() if key.startswith("cuda.")}
        for index, state in states.items():
            if index < torch.cuda.device_count():
                torch.cuda.set_rng_state(state, index)
    if "mps" in rng and mps_available():  # (Apple GPUs: dropout's masks drawn there)
        torch.mps.set_rng_state(rng["mps"])


CONTENTS = "contents:"  # a files_digest that covers the files' bytes too (states written before it: names only)


def files_digest(split: DatasetSplit, data: Path, contents: bool = True) -> str:
    """A fingerprint of which files are in train and in val (relative to DATA, however it was spelt)
    and of their bytes (scan.py's hashes): a val image rewritten since, or no longer decoding, would
    leave the kept epoch's val figures about other images (the calibration and the unknown rule are
    fitted on them). `contents=False`: the names only, as in states written before."""
    def line(role: str, s) -> str:
        name = os.path.relpath(s.path, data)
        return f"{role} {name} {'unreadable' if is_unreadable(s.digest) else s.digest}" if contents else f"{role} {name}"

    lines = [line("t", s) for s in split.train] + [line("v", s) for s in split.val]
    digest = hashlib.sha256(name_bytes("\n".join(lines))).hexdigest()
    return CONTENTS + digest if contents else digest


def config_for_resume(run_dir: Path) -> TrainConfig:
    """The config a run was started with, read back from its folder."""
    if not (run_dir / "config.json").is_file():
        raise UsageError(f"--resume {run_dir}: not a run folder (no config.json). Pass a folder under runs/.")
    if (run_dir / RESULTS_FILENAME).is_file():
        raise UsageError(f"--resume {run_dir}: this run already finished; its model is {run_dir / MODEL_FILENAME}.")
    try:
        saved = TrainConfig.from_json_dict(json.loads((run_dir / "config.json").read_text()))
    except (OSError, ValueError, TypeError, AttributeError) as e:  # (ValueError: not JSON; TypeError: not a config)
        reason = e.strerror if isinstance(e, OSError) else "not the settings a run writes"
        raise UsageError(f"--resume {run_dir}: its config.json cannot be read ({reason}); the run cannot be resumed. "
                         f"Start a new run.") from None
    return replace(saved, resume=run_dir)


def require_state(run_dir: Path) -> None:
    """A run folder holding no state to resume from is refused now, not after the folder is scanned
    and the backbone loaded (a killed run's folder: its config alone)."""
    if not (run_dir / STATE_FILENAME).is_file():
        raise UsageError(f"--resume {run_dir}: nothing to resume (no {STATE_FILENAME}): the run stopped before it kept an "
                         f"epoch to resume from, or diverged; start it again with the command that started it.")
