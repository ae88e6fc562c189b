"""`finetune models`: every --arch name, by family, with what its weights' metadata says of it."""

from __future__ import annotations

from .models import ARCHS
from .timm_zoo import is_timm_name, list_timm
from .weights import hub_checkpoint_dir, offline_weights, url_filename
from .zoo import family_of, on_meta, weights_facts, zoo_names


def backbone_parameter_count(spec) -> int:
    backbone = on_meta(spec.build_backbone)  # shapes only: no memory, no initialisation cost
    return sum(p.numel() for p in backbone.parameters())


def list_archs(contains: str = "") -> list[dict]:
    """Every --arch name (containing `contains`), by family: parameters, default image size, ImageNet
    top-1 of its weights (their own metadata), and where its weights are on this machine."""
    if is_timm_name(contains):
        return list_timm(contains)
    rows = []
    for name in sorted(set(ARCHS) | set(zoo_names())):
        if is_timm_name(name):
            continue
        if contains.lower() not in name.lower():
            continue
        if name in ARCHS and ARCHS[name].packaged_weights is not None:
            spec = ARCHS[name]
            imagenet_head = spec.feature_dim * 1000 + 1000  # counted as torchvision counts its models: with the 1000-class head
            rows.append({"arch": name, "family": spec.family, "params": backbone_parameter_count(spec) + imagenet_head,
                         "img_size": spec.img_size, "imagenet_top1": spec.top1, "offline_weights": offline_weights(spec)})
            continue
        facts = weights_facts(name)
        local = next((str(p) for p in (hub_checkpoint_dir() / url_filename(u) for u in facts["urls"]) if p.is_file()), None)
        rows.append({"arch": name, "family": family_of(name), "params": facts["params"],
                     "img_size": ARCHS[name].img_size if name in ARCHS else facts["crop"], "imagenet_top1": facts["top1"],
                     "offline_weights": local})
    return sorted(rows, key=lambda r: (r["family"], r["params"] or 0, r["arch"]))
