"""Export a trained model to ONNX or TorchScript, with its preprocessing, and verify it."""

from __future__ import annotations

import contextlib
import copy
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .checkpoint import LoadedModel, as_loaded, exported_from, sidecar_path
from .files import atomic_target, write_json
from .errors import FinetuneError, UsageError

FORMATS = ("onnx", "torchscript")
SUFFIX = {"onnx": ".onnx", "torchscript": ".pt"}
TOLERANCE = 1e-4


class ProbabilityModel(nn.Module):
    """float32 NCHW RGB in 0..1 -> calibrated softmax probabilities; normalisation and the
    model's temperature are inside the graph, so an exported model gives predict's numbers."""

    def __init__(self, classifier: nn.Module, temperature: float = 1.0):
        super().__init__()
        self.classifier = classifier
        self.register_buffer("temperature", torch.tensor(float(temperature)), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Called piecewise, not through Classifier.forward, to keep autocast out of the graph.
        return torch.softmax(self.classifier.head(self.classifier.features(x)) / self.temperature, dim=1)


@dataclass
class ExportResult:
    path: Path
    sidecar: Path
    format: str
    max_abs_diff: float

    def to_json_dict(self) -> dict:
        return {"path": str(self.path), "sidecar": str(self.sidecar), "format": self.format,
                "max_abs_diff": self.max_abs_diff, "tolerance": TOLERANCE}


def default_output(model_path: Path, fmt: str) -> Path:
    return model_path.with_suffix(SUFFIX[fmt])


def output_path(model_path: Path, fmt: str, out: Path | str | None) -> Path:
    """Where the export goes: `out`, or the default name (model.onnx, model.pt) next to the
    model or, when `out` is a folder, inside it: an existing one (a folder cannot be replaced by a
    file), or one named with a trailing separator (`exports/`), made if missing."""
    if out is None:
        return default_output(model_path, fmt)
    if not isinstance(out, (str, os.PathLike)):  # (a TypeError's traceback)
        raise UsageError(f"out: give a file or folder path (got {type(out).__name__}).")
    if not str(out).strip():  # (Path("") is the current folder: "$OUT" unset wrote ./model.onnx)
        raise UsageError("--out is empty (an unset shell variable?); name a file or folder, or leave --out out to write "
                         "next to the model.")
    folder = str(out).endswith(("/", os.sep))  # (pathlib drops the separator: read it from the string)
    out = Path(out)
    return out / default_output(model_path, fmt).name if folder or out.is_dir() else out


@contextlib.contextmanager
def writable(path: Path):
    """The OS refusing to write `path` (read-only disk, no permission, disk full) as one line that
    names it and the fix, not the temporary file's name: atomic_target has removed that already."""
    try:
        yield
    except OSError as e:
        raise UsageError(f"{path}: cannot write it ({e.strerror or e}). Pass --out with a writable location.") from None


def check_images(img_size: int, count: int = 3) -> torch.Tensor:
    """A few varied, deterministic inputs: gradients, a checkerboard and noise, in 0..1."""
    g = torch.Generator().manual_seed(0)
    ramp = torch.linspace(0, 1, img_size)
    gradient = torch.stack([ramp.view(1, -1).expand(img_size, -1), ramp.view(-1, 1).expand(-1, img_size),
                            torch.full((img_size, img_size), 0.5)])
    checker = ((torch.arange(img_size).view(-1, 1) // 16 + torch.arange(img_size) // 16) % 2).float().expand(3, -1, -1)
    noise = torch.rand(3, img_size, img_size, generator=g)
    return torch.stack([gradient, checker, noise][:count]).contiguous()


def sidecar_dict(loaded: LoadedModel, fmt: str, max_abs_diff: float) -> dict:
    pp = loaded.preprocessing
    return {
        "format": fmt, "arch": loaded.meta["arch"], "classes": loaded.classes,
        "resize": pp.resize, "input_size": [pp.img_size, pp.img_size], "mean": list(pp.mean), "std": list(pp.std),
        "fit": pp.fit,
        "input": ("float32 NCHW RGB in 0..1, dynamic batch. As predict reads an image: EXIF orientation applied, "
                  "transparent pixels composited on white, 16-bit greyscale stretched to 8 bits; the shorter side "
                  "resized to `resize` (PIL bilinear with reducing_gap=2.0), then " + (
                      "the whole image resized to `input_size` (torchvision's antialiased bilinear resize of the uint8 "
                      "image; its aspect given up: `fit` squash)" if pp.fit == "squash" else
                      "torchvision's antialiased bilinear resize of the uint8 image, centre-crop `input_size`")),
        "precision": ("float32; predict computes in bfloat16 where the CPU or GPU has it natively (as val was "
                      "measured in training), so its scores may differ from these by up to a few hundredths"),
        "output": "softmax probabilities over `classes`, calibrated (logits / `temperature`); mean/std normalisation is inside the graph",
        "temperature": loaded.temperature,
        "max_abs_diff_vs_pytorch": max_abs_diff, "source_model": os.path.abspath(loaded.path),  # (from anywhere)
    }


def export(loaded: LoadedModel | str | Path | None, fmt: str = "onnx", out: Path | str | None = None) -> ExportResult:
    """Write `loaded` as ONNX or TorchScript (normalisation and softmax inside the graph) with a
    JSON sidecar, after checking that the written file agrees with PyTorch within TOLERANCE.
    `loaded`: a load_model result, a model file or run folder, or None: the newest run under runs/."""
    if fmt not in FORMATS:
        raise UsageError(f"--format must be one of {', '.join(FORMATS)} (got '{fmt}').")
    loaded = as_loaded(loaded)  # (the Python API also takes a path)
    out = Path(os.path.abspath(output_path(loaded.path, fmt, out)))  # (as the results' paths: absolute)
    if out.resolve() == loaded.path.resolve():
        raise UsageError(f"--out {out} would overwrite the model file; choose another path.")
    sidecar = sidecar_path(out)
    ours = sidecar.is_file() and exported_from(sidecar) is not None  # (an earlier export's sidecar names its model)
    if out.is_file() and not ours:  # (a photo, or a state dict saved as .pt, named by mistake)
        raise UsageError(f"--out {out}: a file is there already, not one finetune exported (no sidecar of finetune's, "
                         f"{sidecar.name}, beside it); name a new file, or remove that one.")
    if sidecar.exists() and not ours:
        raise UsageError(f"--out {out}: {sidecar.name} is there already, not one finetune wrote; name a new file, or "
                         f"remove that one.")
    # (a copy: the caller's model keeps its device, dtype and mode)
    wrapper = ProbabilityModel(copy.deepcopy(loaded.model).float().cpu().eval(), loaded.temperature).eval()
    size = loaded.preprocessing.img_size
    images = check_images(size)
    with torch.no_grad():
        expected = wrapper(images)
    with writable(out), atomic_target(out) as tmp:  # written and verified there: only a verified export replaces `out`
        try:
            actual = (_export_onnx if fmt == "onnx" else _export_torchscript)(wrapper, size, tmp, images)
        except Exception as e:
            if interrupted_within(e):  # (torch's exporter wraps a Ctrl-C in errors of its own: a traceback)
                raise KeyboardInterrupt from None
            raise
        diff = float((torch.as_tensor(actual) - expected).abs().max())
        if not diff <= TOLERANCE:
            raise FinetuneError(f"{out}: the export differs from the PyTorch model by {diff:.2e} (more than {TOLERANCE:g}); it was not written.")
    with writable(sidecar):
        write_json(sidecar, sidecar_dict(loaded, fmt, diff))
    return ExportResult(out, sidecar, fmt, diff)


def interrupted_within(error: BaseException) -> bool:
    """Whether a KeyboardInterrupt is among the causes and contexts of `error`."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, KeyboardInterrupt):
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False


def _export_onnx(wrapper: nn.Module, size: int, path: Path, images: torch.Tensor):
    try:
        import onnxruntime as ort
        import onnxscript  # noqa: F401  (the torch.onnx exporter needs it)
    except ImportError:
        raise FinetuneError("ONNX export needs extra packages: pip install -e \".[export]\" (onnx, onnxscript, onnxruntime).") from None
    example = torch.rand(2, 3, size, size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            wrapper, (example,), dynamo=True, input_names=["input"], output_names=["probabilities"],
            dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=4096)}}, verbose=False,
        )
        program.save(str(path), external_data=False)
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: its warnings (telemetry where HOME cannot be written) came with raw colour codes
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: images.numpy()})[0]


def _export_torchscript(wrapper: nn.Module, size: int, path: Path, images: torch.Tensor):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(wrapper, torch.rand(2, 3, size, size), check_trace=False)
        traced.save(str(path))
        reloaded = torch.jit.load(str(path))  # the file itself is what gets verified
        with torch.no_grad():
            return reloaded(images)  # a batch of 3 after tracing with 2: the batch size is dynamic
