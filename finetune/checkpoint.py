"""Model files: a classifier's tensors plus JSON metadata in safetensors, written atomically,
and loaded back (checked, never unpickled) from a file, a run folder or the newest run."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from . import __version__
from .config import DEFAULT_RUNS_DIR, MODEL_FILENAME, RESULTS_FILENAME
from .data import Preprocessing
from .errors import ModelFileError, UsageError
from .files import FORMAT, iso_time, looks_like_safetensors, read_safetensors, write_safetensors
from .models import build_classifier, get_arch, with_versions

FORMAT_VERSION = 1


@dataclass
class LoadedModel:
    path: Path
    model: torch.nn.Module
    meta: dict
    distance: object = None  # calibration.FeatureDistance of the unknown rule; None in files from before it

    @property
    def temperature(self) -> float:
        """What the logits are divided by before the softmax (1.0 in files from before calibration)."""
        return float((self.meta.get("calibration") or {}).get("temperature", 1.0))

    @property
    def distance_threshold(self) -> float | None:
        """Beyond this distance from the training images, an image is unknown (None: no rule in the file)."""
        rule = self.meta.get("unknown") or {}
        return float(rule["threshold"]) if self.distance is not None and rule.get("threshold") is not None else None

    @property
    def classes(self) -> list[str]:
        return self.meta["classes"]

    @property
    def preprocessing(self) -> Preprocessing:
        return Preprocessing.from_dict(self.meta["preprocessing"])

    def __repr__(self) -> str:  # (the dataclass's printed the whole network: thousands of characters)
        return f"LoadedModel(path={str(self.path)!r}, arch={self.meta.get('arch')!r}, classes={self.classes!r})"


def model_metadata(arch: str, classes: list[str], pp: Preprocessing, train_config: dict, best: dict,
                   num_train: int, num_val: int, multi_layer: bool = False) -> dict:
    """What a model file says about itself besides its tensors (README: Model file format)."""
    import torchvision

    return {
        "arch": arch, "classes": classes, "preprocessing": pp.to_dict(), "features": {"multi_layer": multi_layer},
        "train_config": train_config, "best": best,
        "num_train": num_train, "num_val": num_val,
        "versions": {"finetune": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__},
        "created": iso_time(),
    }


def save_model(path: Path, state: dict[str, torch.Tensor], meta: dict) -> None:
    """A model file from a classifier's state dict (on any device) and its metadata."""
    write_safetensors(path, state, {"format": FORMAT, "format_version": FORMAT_VERSION, **meta})


def load_model(model: Path | str | None = None, runs_dir: Path | str = DEFAULT_RUNS_DIR) -> LoadedModel:
    """A model file, or a run folder's model, or (None) the newest run's model under runs_dir."""
    for name, value in (("model", model), ("runs_dir", runs_dir)):
        if not isinstance(value, (str, os.PathLike, type(None))):  # (a TypeError's traceback)
            raise UsageError(f"{name}: give the path of a model file or run folder (got {type(value).__name__}).")
    return read_model_file(resolve_model_path(Path(model) if model is not None else None, Path(runs_dir)))


def as_loaded(model, default: Path | None = None, runs_dir: Path | str = DEFAULT_RUNS_DIR) -> LoadedModel:
    """`model` as the Python API takes it: a LoadedModel, or the path (str or Path) of a model file or
    a run folder, loaded; None: `default` (a PredictConfig's model), else the newest run under
    runs_dir, as the CLI without --model; anything else is a UsageError naming what is wanted."""
    if isinstance(model, LoadedModel):
        return model
    if isinstance(model, (str, os.PathLike)):
        return load_model(model)
    if model is None:
        return load_model(default, runs_dir)
    raise UsageError(f"a model is a finetune.load_model(...) result or the path of a model file or run folder "
                     f"(got {type(model).__name__}).")


def export_details(path: Path) -> dict | None:
    """What `finetune info` shows of an export (ONNX, TorchScript), given it or its sidecar: the
    sidecar, which names the model it came from; None where `path` is no export of finetune's."""
    export, sidecar = read_sidecar(path)
    try:
        return {"path": str(Path(os.path.abspath(export))), "file_size": export.stat().st_size, **sidecar} if sidecar else None
    except OSError:  # (the sidecar without its export)
        return None


def sidecar_path(export: Path) -> Path:
    """Where an export's JSON sidecar is: beside it, its name and `.json`."""
    return export.with_name(export.name + ".json")


def read_sidecar(path: Path) -> tuple[Path, dict | None]:
    """The export `path` is (or whose sidecar it is), and its sidecar where it is finetune's (it names
    the model it was exported from); None otherwise."""
    import json

    export, sidecar = (path.with_suffix(""), path) if path.suffix == ".json" else (path, sidecar_path(path))
    try:
        content = json.loads(sidecar.read_text())
    except (OSError, ValueError):
        return export, None
    return export, content if isinstance(content, dict) and content.get("source_model") else None


def exported_from(path: Path) -> str | None:
    """The model file an export (or its .json sidecar) was made from, where `path` is one."""
    sidecar = read_sidecar(path)[1]
    return str(sidecar["source_model"]) if sidecar else None


def read_model_file(path: Path) -> LoadedModel:
    """Load a finetune model file: checks format, metadata and tensors agree; never unpickles."""
    if not path.is_file():
        raise ModelFileError(f"{path}: model file not found: give the path of a model.safetensors or of a run folder.")
    if not looks_like_safetensors(path):  # (by its bytes: a model file copied to best.pt still loads)
        export = exported_from(path)
        if export is not None:
            raise ModelFileError(f"{path}: an exported model, for other runtimes; finetune predicts with the model file it "
                                 f"was exported from: --model {export}")
        if path.suffix in (".pt", ".pth", ".pkl", ".ckpt", ".bin"):
            raise ModelFileError(f"{path}: not a finetune model file (those are safetensors); pickled files are never "
                                 f"loaded as models (they can run code). Use --weights to start training from a state dict.")
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
    multi_layer = bool((meta.get("features") or {}).get("multi_layer", False))  # absent in older files
    from .calibration import FeatureDistance

    try:
        distance = FeatureDistance.from_tensors({k: state.pop(k) for k in [k for k in state if k.startswith("distance.")]})
    except ValueError as e:
        raise ModelFileError(f"{path}: the unknown rule's tensors are damaged ({e}); the file was damaged or edited.") from None
    model = model_from_state(arch, len(classes), state, path, multi_layer)
    model.eval()
    return LoadedModel(Path(os.path.abspath(path)), model, meta, distance)  # (absolute: the caller may change folder)


def newest_model(runs_dir: Path) -> Path:
    """The model of the newest run under `runs_dir` that finished (its results.json written); of the
    newest run where none did. A run still training writes its kept epoch's model file as it goes,
    without the calibration and unknown rule the finished one gets."""
    models = [p for p in runs_dir.glob(f"*/{MODEL_FILENAME}") if p.is_file()] if runs_dir.is_dir() else []
    if not models:
        raise UsageError(f"no trained model under {runs_dir}/. Train one with 'finetune train DATA', or pass --model FILE.")
    return max([p for p in models if run_finished(p.parent)] or models, key=lambda p: p.stat().st_mtime_ns)


def newer_unfinished_run(model_path: Path) -> Path | None:
    """The newest run beside `model_path`'s that is newer and has not finished (training now, or stopped), if any."""
    newer = [p.parent for p in model_path.parent.parent.glob(f"*/{MODEL_FILENAME}")
             if not run_finished(p.parent) and p.stat().st_mtime_ns > model_path.stat().st_mtime_ns]
    return max(newer, key=lambda run: (run / MODEL_FILENAME).stat().st_mtime_ns) if newer else None


def run_finished(run_dir: Path) -> bool:
    return (run_dir / RESULTS_FILENAME).is_file()


def resolve_model_path(model: Path | None, runs_dir: Path) -> Path:
    """--model as given (a file, or a run folder's model), or the newest run's model under runs_dir."""
    if model is None:
        return newest_model(runs_dir)
    if model.is_dir():
        candidate = model / MODEL_FILENAME
        if not candidate.is_file():
            if any(model.glob(f"*/{MODEL_FILENAME}")):  # (the runs folder itself)
                raise ModelFileError(f"{model}: a folder of runs, not a run; --runs-dir {model} uses the newest of them, "
                                     f"--model {model / '<run>'} one of them.")
            raise ModelFileError(f"{model}: run folder has no {MODEL_FILENAME}. Pass a run folder of a finished training, or the model file.")
        return candidate
    return model


def model_from_state(arch: str, num_classes: int, state: dict, source: Path, multi_layer: bool = False) -> torch.nn.Module:
    """Rebuild a trained classifier from a model file's tensors (no pretrained download)."""
    spec = get_arch(arch)
    model = build_classifier(spec, num_classes, multi_layer=multi_layer)
    # Files written before the feature norm existed have none: theirs is the identity.
    state = {**{f"feature_norm.{k}": v for k, v in model.feature_norm.state_dict().items()}, **state}
    try:
        model.load_state_dict(with_versions(state, model), strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
        raise ModelFileError(f"{source}: tensors do not match its metadata (arch {arch}, {num_classes} classes): {first}. The file is damaged or was edited; retrain or use another file.") from None
    return model
