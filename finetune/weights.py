"""Where a backbone's pretrained weights come from: --weights FILE, the package that ships
them, torchvision's hub cache, or a download through torchvision (in that order)."""

from __future__ import annotations

import os
import pickle
import warnings
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

import torch

from .errors import ModelFileError, WeightsError
from .config import MODEL_FILENAME
from .files import FORMAT, file_digest, looks_like_safetensors, read_safetensors

if TYPE_CHECKING:
    from .models import ArchSpec


STATE_DICT_HINT = "Use a .pth saved with torch.save(model.state_dict()) or a .safetensors file."
OFFLINE_ARCH = "--arch efficientnet_lite0, whose weights install with pip and work offline"  # (the last fix for missing weights)

def hub_checkpoint_dir() -> Path:
    """torchvision's download folder: $TORCH_HOME/hub/checkpoints (default ~/.cache/torch/...)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def url_filename(url: str) -> str:
    return os.path.basename(urlparse(url).path)


def resolve_pretrained(spec: ArchSpec, weights_file: Path | None, tell=None) -> tuple[dict, str]:
    """ImageNet (or user) weights for the backbone, and a description of where they came from.

    Order: --weights FILE, then the package that ships them, then torchvision's hub cache,
    then a download through torchvision (`tell`, if given, gets a line saying so first).
    """
    if weights_file is not None:
        if weights_file.is_dir():  # (a run folder, as --model takes one)
            if not (weights_file / MODEL_FILENAME).is_file():
                raise WeightsError(f"{weights_file}: a folder without a model file ({MODEL_FILENAME}); give a state dict "
                                   f"file, or the folder of a run that finished.")
            weights_file = weights_file / MODEL_FILENAME
        return read_weights_file(weights_file, spec.name), str(weights_file)
    if spec.pretrained_loader is not None:  # timm: its own cache (the Hugging Face hub's)
        return spec.pretrained_loader(), f"timm pretrained weights ({spec.name})"
    local = local_weights_path(spec)
    if local is not None:
        try:
            return read_weights_file(local), str(local)
        except WeightsError as e:
            raise from_hub_cache(e, local, spec) from None
    url = spec.weight_urls[0]
    if tell is not None:
        tell(f"downloading {spec.name}'s ImageNet weights from {url} into {hub_checkpoint_dir()}")
    try:
        state = download_state_dict(url)
    except Exception as e:  # any failure to download is the same problem for the user
        raise WeightsError(
            f"cannot get ImageNet weights for {spec.name} ({type(e).__name__}: {e}). Fixes: "
            f"(1) put {url_filename(url)} into {hub_checkpoint_dir()} (download it from {url} on a machine that is online); "
            f"(2) pass --weights FILE with a state dict for {spec.name}; "
            f"(3) use {OFFLINE_ARCH}."
        ) from None
    return state, url


def weights_identity(source: str) -> str:
    """What names these weights in the feature cache's key (cache.py): a file by its name and the
    hash of its bytes, so that the same weights installed again (a new virtual environment) or
    read from another folder keep their cached features and changed bytes never do; a download
    by the file it left in torchvision's hub cache, where the next run finds it; anything else
    (timm's weights, by model name) as itself."""
    path = weights_file_of(source)
    return f"{path.name} blake2b:{file_digest(path)}" if path.is_file() else source


def weights_file_of(source: str) -> Path:
    """The file weights from `source` (resolve_pretrained's description) are in: a download's, in torchvision's hub cache."""
    return hub_checkpoint_dir() / url_filename(source) if urlparse(source).scheme in ("http", "https") else Path(source)


def download_state_dict(url: str) -> dict:
    """torchvision's weights downloaded into its hub cache, where the next run finds them, checked
    against the hash their name carries. Not torch.hub.load_state_dict_from_url: it writes a line to
    stdout, where `--json`'s result goes (and a library caller's own output)."""
    target = hub_checkpoint_dir() / url_filename(url)
    target.parent.mkdir(parents=True, exist_ok=True)
    named_hash = torch.hub.HASH_REGEX.search(target.name)
    torch.hub.download_url_to_file(url, str(target), named_hash.group(1) if named_hash else None, progress=False)
    return read_weights_file(target)


def from_hub_cache(error: WeightsError, path: Path, spec: ArchSpec) -> WeightsError:
    """A weights file in torchvision's hub cache that cannot be used (damaged, or another model's
    under this one's name), said with the fixes for that place rather than --weights' advice."""
    if path.parent != hub_checkpoint_dir():
        return error
    message = str(error).replace(f" {STATE_DICT_HINT}", "").removesuffix(".")
    url = next((u for u in spec.weight_urls if url_filename(u) == path.name), spec.weight_urls[0] if spec.weight_urls else "")
    return WeightsError(f"{message} (in torchvision's hub cache). Fixes: delete it and put the real {path.name} there "
                        f"(from {url} on a machine that is online); or pass --weights FILE with a state dict for "
                        f"{spec.name}; or use {OFFLINE_ARCH}.")


def weights_do_not_fit(error: WeightsError, source: str, spec: ArchSpec) -> WeightsError:
    """models.load_backbone_state's error, naming the file the weights came from."""
    path = weights_file_of(source)
    if path.parent == hub_checkpoint_dir():  # (not weights of the user's choosing: the fixes are the hub cache's)
        return from_hub_cache(WeightsError(f"{path}: {str(error).split(' Use weights made for')[0]}"), path, spec)
    return WeightsError(f"{path}: {error}")


def read_weights_file(path: Path, arch: str | None = None) -> dict:
    """A state dict from .safetensors (a finetune model file included: of `arch`, where given) or a
    weights-only torch file."""
    if not path.is_file():
        raise WeightsError(f"{path}: weights file not found. Pass an existing state dict file (or a run folder) to --weights.")
    if path.suffix == ".safetensors" or looks_like_safetensors(path):  # (a model file copied to best.pt is one)
        try:
            state, meta = read_safetensors(path)
        except ModelFileError:  # (its advice is for --model: a model file that finetune train wrote)
            raise WeightsError(f"{path}: not a readable safetensors file (truncated, or of another format). "
                               f"{STATE_DICT_HINT}") from None
        if meta.get("format") == FORMAT:  # a model we trained: reuse its backbone
            if arch is not None and meta.get("arch") not in (None, arch):  # (its tensors' names said only "120 missing")
                raise WeightsError(f"{path}: a finetune model of {meta['arch']}, not of {arch}; pass --arch {meta['arch']} "
                                   f"to start from it.")
            state = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
        return state
    try:
        with warnings.catch_warnings():  # torch's notes on pickle protocols mean nothing to a user
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)  # never unpickles code
    except Exception as e:
        raise WeightsError(unreadable_weights(path, e)) from None
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path}: does not hold a state dict of tensors.")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def unreadable_weights(path: Path, error: Exception) -> str:
    """Why torch.load(weights_only=True) refused `path`, in a user's words. Not torch's own: it
    advises weights_only=False (unpickling code: never done here), or says "KeyError: 101"."""
    if isinstance(error, OSError):
        return f"{path}: cannot read it ({error.strerror or error})."
    if isinstance(error, pickle.UnpicklingError) and written_by_torch_save(path):
        return f"{path}: holds Python objects besides tensors, which finetune does not unpickle (they can run code). {STATE_DICT_HINT}"
    return f"{path}: not a weights file torch.save wrote (or a damaged one). {STATE_DICT_HINT}"


def written_by_torch_save(path: Path) -> bool:
    """Whether the file looks like torch.save's: a zip archive (since torch 1.6) or a pickle
    (older files start with the protocol mark). An HTML page a failed download saved does not."""
    try:
        with open(path, "rb") as f:
            head = f.read(2)
    except OSError:
        return False
    return head == b"PK" or head[:1] == b"\x80"


def local_weights_path(spec: ArchSpec) -> Path | None:
    """The weights file on this machine: the package that ships them (WeightsError when it is
    not installed), else torchvision's hub cache; None when only a download would do."""
    if spec.packaged_weights is not None:
        return spec.packaged_weights()
    if spec.pretrained_loader is not None:
        from .timm_zoo import cached_weights_dir, model_name, pretrained_cfg

        return cached_weights_dir(pretrained_cfg(model_name(spec.name)))
    for url in spec.weight_urls:
        cached = hub_checkpoint_dir() / url_filename(url)
        if cached.is_file():
            return cached
    return None


def offline_weights(spec: ArchSpec) -> str | None:
    """Where pretrained weights are available without a network right now, or None."""
    try:
        path = local_weights_path(spec)
    except WeightsError:
        return None
    return str(path) if path is not None and path.is_file() else None
