"""torchvision's classification zoo as backbones: every model torchvision lists with ImageNet
weights, its head replaced generically, its preprocessing and default size from its weights.

A model's classifier is the last layer that maps features to the 1,000 ImageNet classes
(`fc`, `classifier[-1]`, `heads.head`, `head`, ...: a Linear, or SqueezeNet's 1x1 Conv2d);
it becomes the identity, and what reaches it is the backbone's feature vector, whose width
is found by running the model on shapes only (the meta device: no memory, no compute).
"""

from __future__ import annotations

import functools
import re

import torch
from torch import nn

AUX_FAMILIES = {"googlenet": ("aux1.", "aux2."), "inception_v3": ("AuxLogits.",)}  # training-time side heads, left out


def family_of(name: str) -> str:
    """resnet18 -> resnet, efficientnet_v2_s -> efficientnet_v2, vit_b_16 -> vit, regnet_y_400mf -> regnet."""
    for prefix in ("efficientnet_v2", "efficientnet", "wide_resnet", "mobilenet_v3", "mobilenet_v2", "shufflenet_v2",
                   "swin_v2", "resnext", "regnet", "convnext", "densenet", "mnasnet", "squeezenet", "vit", "swin", "vgg",
                   "resnet", "maxvit"):
        if name.startswith(prefix):
            return prefix
    return re.split(r"[_\d]", name, maxsplit=1)[0] or name


@functools.cache
def zoo_names() -> tuple[str, ...]:
    """The classification models torchvision lists that have ImageNet weights."""
    import torchvision

    names = []
    for name in torchvision.models.list_models(module=torchvision.models):
        try:
            torchvision.models.get_model_weights(name)
        except (ValueError, KeyError):
            continue
        names.append(name)
    return tuple(sorted(names))


def classifier_name(model: nn.Module) -> str:
    """The dotted name of the model's ImageNet classifier layer (the last Linear, or a 1x1 Conv2d to 1000)."""
    found = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and module.out_features == 1000:
            found = name
        elif isinstance(module, nn.Conv2d) and module.out_channels == 1000 and module.kernel_size == (1, 1):
            found = name
    if found is None:
        raise ValueError("no 1000-class classifier layer found")
    return found


def replace_module(model: nn.Module, dotted: str, new: nn.Module) -> None:
    parent_name, _, child = dotted.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if isinstance(parent, nn.Sequential) and child.isdigit():
        parent[int(child)] = new
    else:
        setattr(parent, child, new)


def builder_options(name: str, crop: int) -> dict:
    """What torchvision's builder needs besides weights=None to take the default weights: no side
    heads; a ViT built for the size its weights were trained at (vit_h_14's are at 518)."""
    if name in AUX_FAMILIES:  # (transform_input: as torchvision sets it when it loads their ImageNet weights)
        return {"aux_logits": False, "init_weights": False, "transform_input": True}
    return {"image_size": crop} if family_of(name) == "vit" else {}


def build_headless(name: str, options: dict | None = None) -> nn.Module:
    """torchvision's `name` with random weights, its classifier the identity: images -> features."""
    import torchvision

    model = torchvision.models.get_model(name, weights=None, **(options or {}))
    replace_module(model, classifier_name(model), nn.Identity())
    return model


def on_meta(build) -> nn.Module:
    """build() with its parameters and buffers on the meta device: shapes only, no memory. (Under
    `torch.device("meta")` as a whole, builders that compute their layer widths with tensors, as
    RegNet's do, cannot run; so each tensor moves there as the module registers it.)"""
    try:
        with torch.device("meta"):
            return build()
    except NotImplementedError:
        pass
    old_param, old_buffer = nn.Module.register_parameter, nn.Module.register_buffer

    def param(self, name, value):
        old_param(self, name, None if value is None else nn.Parameter(value.to("meta"), value.requires_grad))

    def buffer(self, name, value, persistent=True):
        old_buffer(self, name, None if value is None else value.to("meta"), persistent)

    nn.Module.register_parameter, nn.Module.register_buffer = param, buffer
    try:
        return build()
    finally:
        nn.Module.register_parameter, nn.Module.register_buffer = old_param, old_buffer


def head_prefixes(name: str) -> tuple[str, ...]:
    """What an ImageNet state dict of `name` holds beyond the headless backbone: the classifier, the side heads."""
    import torchvision

    model = on_meta(lambda: torchvision.models.get_model(name, weights=None, **builder_options(name, 224)))
    return (classifier_name(model) + ".", *AUX_FAMILIES.get(name, ()))


def weights_facts(name: str) -> dict:
    """From the default weights' own metadata: crop and resize sizes, mean, std, ImageNet top-1, parameters."""
    import torchvision

    enum = torchvision.models.get_model_weights(name)
    default = enum.DEFAULT
    t = default.transforms()
    top1 = (default.meta.get("_metrics") or {}).get("ImageNet-1K", {}).get("acc@1")
    ordered = [default] + [w for w in enum if w is not default]
    return {"crop": int(t.crop_size[0]), "resize": int(t.resize_size[0]), "mean": tuple(t.mean), "std": tuple(t.std),
            "top1": top1, "params": default.meta.get("num_params"), "urls": tuple(w.url for w in ordered),
            "min_size": default.meta.get("min_size")}


def feature_dim(build, size: int) -> int:
    """The width of a backbone's features, from a forward pass on shapes only."""
    backbone = on_meta(build).eval()
    with torch.no_grad():
        return int(backbone(torch.empty(1, 3, size, size, device="meta")).shape[1])


def takes_size(build, size: int) -> bool:
    """Whether the backbone runs at `size` x `size` (ViT and MaxViT take one size only)."""
    try:
        feature_dim(build, size)
        return True
    except Exception:  # noqa: BLE001 - whatever a model raises on a size it cannot take
        return False
