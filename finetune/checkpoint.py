"""Model files (safetensors + JSON metadata), written atomically; run folders."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .config import MODEL_FILENAME
from .data import Preprocessing
from .errors import ModelFileError, UsageError
from .files import FORMAT, read_safetensors, write_safetensors
from .models import model_from_state

FORMAT_VERSION = 1


@dataclass
class LoadedModel:
    path: Path
    model: torch.nn.Module
    meta: dict

    @property
    def classes(self) -> list[str]:
        return self.meta["classes"]

    @property
    def preprocessing(self) -> Preprocessing:
        return Preprocessing.from_dict(self.meta["preprocessing"])


def save_model(path: Path, state: dict[str, torch.Tensor], meta: dict) -> None:
    """A model file from a classifier's state dict (on any device) and its metadata."""
    write_safetensors(path, state, {"format": FORMAT, "format_version": FORMAT_VERSION, **meta})


def load_model(path: Path) -> LoadedModel:
    """Load a finetune model file: checks format, metadata and tensors agree; never unpickles."""
    if not path.is_file():
        raise ModelFileError(f"{path}: model file not found. Pass a model.safetensors or a run folder to --model.")
    if path.suffix in (".pt", ".pth", ".pkl", ".ckpt", ".bin"):
        raise ModelFileError(f"{path}: finetune model files are .safetensors; pickled files are never loaded as models (they can run code). Use --weights to start training from a state dict.")
    state, meta = read_safetensors(path)
    if meta.get("format") != FORMAT:
        raise ModelFileError(f"{path}: a safetensors file without finetune metadata, not a finetune model. Use a model.safetensors written by 'finetune train'.")
    try:
        classes = list(meta["classes"])
        arch = str(meta["arch"])
        Preprocessing.from_dict(meta["preprocessing"])
    except (KeyError, TypeError, ValueError):
        raise ModelFileError(f"{path}: finetune metadata lacks arch, classes or preprocessing; the file was damaged or edited.") from None
    head = state.get("head.1.weight")
    if head is None or head.shape[0] != len(classes):
        rows = "no head" if head is None else f"a head for {head.shape[0]} classes"
        raise ModelFileError(f"{path}: metadata lists {len(classes)} classes but the tensors hold {rows}; the file was damaged or edited.")
    model = model_from_state(arch, len(classes), state, path)
    model.eval()
    return LoadedModel(path, model, meta)


# --- run folders -------------------------------------------------------------------------

def create_run_dir(runs_dir: Path, name: str | None) -> Path:
    """runs/<name>, runs/<name>2, ... : a new folder each time, never an earlier run's."""
    base = name or "train"
    if Path(base).name != base or base in (".", "..") or not base.strip():
        raise UsageError(f"--name '{base}': a run name is one folder name (no '/', '..' or absolute path); use --runs-dir to choose where runs go.")
    try:
        runs_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--runs-dir {runs_dir}: cannot create it ({e.strerror or e}). Pass a writable folder.") from None
    for n in range(1, 100_000):
        candidate = runs_dir / (base if n == 1 else f"{base}{n}")
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue
        except OSError as e:
            raise UsageError(f"--runs-dir {runs_dir}: cannot create a run folder there ({e.strerror or e}). Pass a writable folder.") from None
    raise UsageError(f"{runs_dir}: too many runs named '{base}'; pass another --name.")


def newest_model(runs_dir: Path) -> Path:
    models = [p for p in runs_dir.glob(f"*/{MODEL_FILENAME}") if p.is_file()] if runs_dir.is_dir() else []
    if not models:
        raise UsageError(f"no trained model under {runs_dir}/. Train one with 'finetune train DATA', or pass --model FILE.")
    return max(models, key=lambda p: p.stat().st_mtime_ns)


def open_model(model: Path | None, runs_dir: Path) -> LoadedModel:
    """--model as given (a file or a run folder), or the newest run under runs_dir, loaded."""
    return load_model(resolve_model_path(model, runs_dir))


def resolve_model_path(model: Path | None, runs_dir: Path) -> Path:
    if model is None:
        return newest_model(runs_dir)
    if model.is_dir():
        candidate = model / MODEL_FILENAME
        if not candidate.is_file():
            raise ModelFileError(f"{model}: run folder has no {MODEL_FILENAME}. Pass a run folder of a finished training, or the model file.")
        return candidate
    return model


# --- training state (for --resume) ---------------------------------------------------------
STATE_FILENAME = "last_state.safetensors"
STATE_KEY = "finetune_state"


def save_training_state(path: Path, tensors: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer, info: dict) -> None:
    """Everything needed to continue after the last completed epoch, pickle-free.

    `tensors`: weights and RNG states by name; the optimizer's per-parameter tensors are
    flattened to `optim.<param>.<name>`, its hyper-parameters go into the JSON metadata.
    """
    opt = optimizer.state_dict()
    flat = dict(tensors)
    for param_id, param_state in opt["state"].items():
        for name, value in param_state.items():
            flat[f"optim.{param_id}.{name}"] = torch.as_tensor(value)
    write_safetensors(path, flat, {**info, "optimizer_param_groups": opt["param_groups"]}, STATE_KEY)


def load_training_state(path: Path) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """-> (named tensors without optimizer entries, optimizer state dict, info)."""
    if not path.is_file():
        raise UsageError(f"{path.parent}: nothing to resume (no {path.name}); a run can be resumed after its first epoch, until it finishes.")
    damaged = ModelFileError(f"{path}: training state is damaged; it cannot be resumed. Start a new run.")
    try:
        tensors, info = read_safetensors(path, STATE_KEY)
    except ModelFileError:
        raise damaged from None
    if "optimizer_param_groups" not in info:
        raise damaged
    state: dict[int, dict] = {}
    for key in [k for k in tensors if k.startswith("optim.")]:
        _, param_id, name = key.split(".", 2)
        state.setdefault(int(param_id), {})[name] = tensors.pop(key)
    return tensors, {"state": state, "param_groups": info.pop("optimizer_param_groups")}, info
