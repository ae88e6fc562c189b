"""torchvision's classification zoo as backbones: every family builds, trains, saves, reloads and predicts."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from finetune.checkpoint import model_metadata, read_model_file, save_model
from finetune.cli import app
from finetune.models import build_classifier, get_arch
from finetune.catalogue import list_archs
from finetune.prediction import predict

from conftest import make_image, make_train_val

runner = CliRunner()


def smallest_of_each_family() -> list[str]:
    """One model per family; ResNeXt and Wide ResNet share resnet18's hand-made path (models.py), so it stands for them."""
    by_family = defaultdict(list)
    for row in list_archs():
        if row["family"] not in ("resnext", "wide_resnet"):
            by_family[row["family"]].append(row)
    return sorted(min(rows, key=lambda r: r["params"])["arch"] for rows in by_family.values())


FAMILIES = smallest_of_each_family()


def test_every_torchvision_family_is_offered():
    assert {"alexnet", "convnext_tiny", "efficientnet_b0", "efficientnet_v2_s", "maxvit_t", "mobilenet_v3_small",
            "regnet_y_400mf", "swin_t", "swin_v2_t", "vit_b_16", "squeezenet1_1", "resnet18", "efficientnet_lite0"} <= set(FAMILIES)
    assert len(FAMILIES) >= 19 and len(list_archs()) >= 80


@pytest.mark.parametrize("arch", FAMILIES)
def test_family_builds_saves_reloads_and_predicts(arch, tmp_path):
    torch.manual_seed(0)
    spec = get_arch(arch)
    model = build_classifier(spec, 3).eval()  # random weights: no network
    x = torch.rand(1, 3, spec.img_size, spec.img_size)
    with torch.no_grad():
        out = model.logits_and_stages(x)  # one pass: the logits, then every stage's features
    logits = out[:, :3]
    assert out.shape == (1, 3 + model.all_dim) and model.head[1].in_features == spec.feature_dim
    pp = spec.preprocessing()
    save_model(tmp_path / "m.safetensors", model.state_dict(), model_metadata(arch, ["a", "b", "c"], pp, {}, {}, 1, 1))
    loaded = read_model_file(tmp_path / "m.safetensors")
    with torch.no_grad():
        assert torch.allclose(loaded.model(x), logits, atol=1e-4)
    image = make_image(tmp_path / "x.jpg", (200, 30, 30), size=(spec.img_size + 10, spec.img_size))
    (row,) = list(predict(loaded, [image]))
    assert row.error is None and row.label in ("a", "b", "c")


def test_sizes_a_model_cannot_take_are_refused(tmp_path):
    data = make_train_val(tmp_path / "data", n_train=2, n_val=1)
    result = runner.invoke(app, ["train", str(data), "--arch", "vit_b_32", "--img-size", "160", "--runs-dir", str(tmp_path / "runs")])
    assert result.exit_code == 2 and "vit_b_32 cannot take that size" in result.stderr and result.stdout == ""
    unknown = runner.invoke(app, ["train", str(data), "--arch", "convnxt_tiny", "--runs-dir", str(tmp_path / "runs")])
    assert unknown.exit_code == 2 and "Did you mean 'convnext_tiny'" in unknown.stderr


def test_models_lists_families_with_metadata():
    rows = json.loads(runner.invoke(app, ["models", "convnext", "--json"]).stdout)
    assert [r["arch"] for r in rows] == ["convnext_tiny", "convnext_small", "convnext_base", "convnext_large"]
    assert all(r["family"] == "convnext" and r["img_size"] == 224 and r["imagenet_top1"] > 80 for r in rows)
    table = runner.invoke(app, ["models", "vit"])
    assert table.exit_code == 0 and "vit_h_14" in table.stdout and "518" in table.stdout
    none = runner.invoke(app, ["models", "nosuchnet"])  # (an empty table read as "none of them here")
    assert none.exit_code == 2 and none.stdout == ""
    assert none.stderr.strip() == "error: no --arch name contains 'nosuchnet'; 'finetune models' lists them all."


def test_a_non_resnet_model_with_local_weights_trains_predicts_and_exports(tmp_path, monkeypatch):
    import torchvision

    # ImageNet-style weights of mobilenet_v3_small (random here), in a torch hub cache under their URL's file name.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    url = torchvision.models.get_model_weights("mobilenet_v3_small").DEFAULT.url
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(torchvision.models.mobilenet_v3_small(weights=None).state_dict(), cache / Path(url).name)
    data = make_train_val(tmp_path / "data")
    result = runner.invoke(app, ["train", str(data), "--arch", "mobilenet_v3_small", "--img-size", "64", "--epochs", "2",
                                 "--workers", "0", "--runs-dir", str(tmp_path / "runs"), "--json", "--quiet"])
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["arch"] == "mobilenet_v3_small" and summary["weights"].endswith(Path(url).name)
    assert summary["recipe"]["head"]["multi_layer"] is False  # no stage features for this family: the final ones
    predicted = runner.invoke(app, ["predict", str(data / "val"), "--model", summary["run_dir"], "--format", "jsonl", "--workers", "0"])
    assert predicted.exit_code == 0 and len(predicted.stdout.splitlines()) == 9
    exported = runner.invoke(app, ["export", "--model", summary["run_dir"], "--format", "torchscript", "--json"])
    assert exported.exit_code == 0, exported.stderr
    assert json.loads(exported.stdout)["max_abs_diff"] <= 1e-4


TIMM_MODELS = ["timm/resnet18", "timm/convnext_atto", "timm/vit_tiny_patch16_224", "timm:efficientnet_b0"]


@pytest.mark.parametrize("arch", TIMM_MODELS)
def test_timm_models_build_save_reload_and_predict(arch, tmp_path):
    pytest.importorskip("timm")
    test_family_builds_saves_reloads_and_predicts(arch, tmp_path)


def fake_hub_cache(root: Path, repo: str, state: dict) -> None:
    """A Hugging Face hub cache holding `state` as the weights of `repo`, laid out as the hub library writes it."""
    from safetensors.torch import save_file

    folder = root / ("models--" + repo.replace("/", "--"))
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text("0" * 40)
    snapshot = folder / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(snapshot / "model.safetensors"))


def test_timm_weights_come_from_the_hub_cache_offline(tmp_path, monkeypatch):
    timm = pytest.importorskip("timm")
    from huggingface_hub import constants

    from finetune.errors import WeightsError
    from finetune.weights import resolve_pretrained

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr("socket.getaddrinfo", lambda *a, **k: (_ for _ in ()).throw(OSError("no network")))
    spec = get_arch("timm/resnet18")
    with pytest.raises(WeightsError, match=f"cannot reach huggingface.co.*{tmp_path / 'hub'}.*--weights"):
        resolve_pretrained(spec, None)
    torch.manual_seed(1)
    reference = timm.create_model("resnet18", pretrained=False)  # with its ImageNet classifier, as published
    fake_hub_cache(tmp_path / "hub", "timm/resnet18.a1_in1k", reference.state_dict())
    state, source = resolve_pretrained(spec, None)
    assert "timm" in source and "fc.weight" not in state
    assert torch.equal(state["conv1.weight"], reference.state_dict()["conv1.weight"])
    model = build_classifier(spec, 2, state)  # the backbone takes them
    assert torch.equal(model.backbone.conv1.weight, reference.conv1.weight)


def test_timm_names_are_checked_and_listed():
    pytest.importorskip("timm")
    bad = runner.invoke(app, ["train", "x", "--arch", "timm/resnet81"])
    assert bad.exit_code == 2 and "unknown timm model 'resnet81'" in bad.stderr
    rows = json.loads(runner.invoke(app, ["models", "timm/convnext_atto", "--json"]).stdout)
    assert rows and all(r["arch"].startswith("timm/convnext_atto") and r["img_size"] for r in rows)
