"""timm's models as backbones (`--arch timm/<name>` or `timm:<name>`), with the optional extra
`pip install -e ".[timm]"`: timm builds the model without its classifier (`num_classes=0`:
images -> pooled features), its `pretrained_cfg` gives the preprocessing and default size,
and its weights come from the Hugging Face hub cache (downloaded there once when online).
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import socket
from pathlib import Path

from .errors import UsageError, WeightsError

PREFIXES = ("timm/", "timm:")
HUB_HOST = "huggingface.co"


def is_timm_name(name: str) -> bool:
    return name.startswith(PREFIXES)


def model_name(arch: str) -> str:
    return arch.split("/", 1)[1] if arch.startswith("timm/") else arch.split(":", 1)[1]


def require_timm():
    try:
        import timm
    except ImportError:
        raise UsageError("timm models need the optional extra: pip install -e \".[timm]\" (or pip install timm).") from None
    return timm


def pretrained_cfg(name: str):
    """timm's pretrained config of `name` (input size, crop, mean, std, hub id); UsageError for unknown names."""
    timm = require_timm()
    from timm.models import get_pretrained_cfg

    try:
        cfg = get_pretrained_cfg(name) if timm.is_model(name) else None
    except RuntimeError:  # a tag timm does not know: resnet50.bogus
        cfg = None
    if cfg is None:
        known = sorted({n.split(".")[0] for n in timm.list_models(pretrained=True)})
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" Did you mean 'timm/{close[0]}'?" if close else ""
        raise UsageError(f"unknown timm model '{name}' (one with pretrained weights).{hint} 'finetune models timm/' lists them.")
    return cfg


def hub_cache() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def cached_weights_dir(cfg) -> Path | None:
    """The hub cache folder of these weights, when they are on this machine."""
    repo = getattr(cfg, "hf_hub_id", None)
    folder = hub_cache() / ("models--" + repo.replace("/", "--")) if repo else None
    return folder if folder is not None and (folder / "snapshots").is_dir() else None


@contextlib.contextmanager
def hub_offline():
    """The hub library told not to try the network (it reads its cache only)."""
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def load_pretrained(name: str) -> dict:
    """The backbone's pretrained weights (a state dict without the classifier), from the hub cache,
    else downloaded into it; WeightsError naming the cache and --weights when neither works."""
    timm = require_timm()
    cfg = pretrained_cfg(name)
    offline_fix = (f"put its weights into the Hugging Face cache {hub_cache()} (run python -c \"import timm; "
                   f"timm.create_model('{name}', pretrained=True)\" on a machine that is online and copy the cache), "
                   f"or pass --weights FILE with a state dict for it")
    if cached_weights_dir(cfg) is not None:
        try:
            with hub_offline():
                return timm.create_model(name, pretrained=True, num_classes=0).state_dict()
        except Exception as e:  # a cache folder without the weights file, or a damaged one
            raise WeightsError(f"cannot read timm weights for {name} from {cached_weights_dir(cfg)} ({type(e).__name__}). "
                               f"Fix: {offline_fix}.") from None
    try:
        socket.getaddrinfo(HUB_HOST, 443)
    except OSError:
        raise WeightsError(f"cannot get timm weights for {name}: this machine cannot reach {HUB_HOST}. Fix: {offline_fix}.") from None
    try:
        return timm.create_model(name, pretrained=True, num_classes=0).state_dict()
    except Exception as e:  # any failure to download is the same problem for the user
        raise WeightsError(f"cannot get timm weights for {name} ({type(e).__name__}). Fix: {offline_fix}.") from None


def timm_facts(arch: str) -> dict:
    """What models.py needs to describe `timm/<name>`: a builder (no classifier), its default size,
    preprocessing and classifier name from timm's pretrained config, and its weights' loader."""
    timm = require_timm()
    name = model_name(arch)
    cfg = pretrained_cfg(name)
    classifier = cfg.classifier if isinstance(cfg.classifier, str) else "head"
    return {"build": functools.partial(timm.create_model, name, pretrained=False, num_classes=0),
            "size": int(cfg.input_size[-1]), "mean": tuple(cfg.mean), "std": tuple(cfg.std),
            "resize_ratio": 1 / float(cfg.crop_pct or timm.data.DEFAULT_CROP_PCT), "head_keys": (classifier + ".",),
            "family": timm_family(name), "loader": functools.partial(load_pretrained, name)}


def timm_family(name: str) -> str:
    """'timm/convnext' for convnext_tiny.fb_in22k, 'timm/resnet' for resnet50.a1_in1k: how `models` groups them."""
    return "timm/" + name.split("_")[0].split(".")[0].rstrip("0123456789")


def list_timm(contains: str) -> list[dict]:
    """`finetune models timm/<filter>`: timm's models with pretrained weights whose names contain the filter."""
    timm = require_timm()
    from timm.models import get_pretrained_cfg

    rows = []
    for name in timm.list_models(f"*{model_name(contains) if is_timm_name(contains) else contains}*", pretrained=True):
        cfg = get_pretrained_cfg(name)
        cached = cached_weights_dir(cfg) if cfg is not None else None
        rows.append({"arch": f"timm/{name}", "family": timm_family(name),
                     "params": None, "img_size": int(cfg.input_size[-1]) if cfg else None, "imagenet_top1": None,
                     "offline_weights": str(cached) if cached else None})
    return rows
