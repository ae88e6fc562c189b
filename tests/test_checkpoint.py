"""Model files: round trip, atomic writes, and refusing anything unsafe or inconsistent."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from finetune import files
from finetune.checkpoint import load_model, save_model
from finetune.cli import app
from finetune.errors import ModelFileError
from finetune.models import build_classifier, get_arch

runner = CliRunner()


def meta(classes=("a", "b", "c"), arch="efficientnet_lite0"):
    return {"arch": arch, "classes": list(classes), "preprocessing": {"img_size": 64, "resize": 73, "mean": [0.5] * 3, "std": [0.5] * 3}}


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    model = build_classifier(get_arch("efficientnet_lite0"), 3).eval()
    path = tmp_path / "model.safetensors"
    save_model(path, model.state_dict(), meta())
    return model, path


def test_round_trip_gives_the_same_outputs(saved):
    model, path = saved
    loaded = load_model(path)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model(x), loaded.model(x), atol=1e-6)
    assert loaded.classes == ["a", "b", "c"] and loaded.preprocessing.img_size == 64
    assert loaded.meta["format"] == "finetune-model"


def test_save_is_atomic_and_leaves_no_temp_files(saved, monkeypatch):
    model, path = saved
    original = path.read_bytes()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(files.os, "replace", crash)
    with pytest.raises(OSError):
        save_model(path, model.state_dict(), meta(classes=("x", "y", "z")))
    assert path.read_bytes() == original
    assert [p.name for p in path.parent.iterdir()] == [path.name]


def test_a_failed_write_names_the_file_not_its_temporary_copy(tmp_path, monkeypatch):
    import errno

    def full_disk(self, data):
        raise OSError(errno.ENOSPC, "No space left on device", str(self))

    monkeypatch.setattr(files.Path, "write_bytes", full_disk)
    with pytest.raises(OSError) as info:
        files.atomic_write_text(tmp_path / "results.json", "{}")
    assert info.value.filename == str(tmp_path / "results.json") and list(tmp_path.iterdir()) == []


def test_truncated_file_is_a_clear_error(saved):
    _, path = saved
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ModelFileError, match="truncated"):
        load_model(path)


def test_foreign_safetensors_is_refused(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, path)
    with pytest.raises(ModelFileError, match="without finetune metadata"):
        load_model(path)


def test_metadata_that_disagrees_with_the_tensors_is_refused(tmp_path):
    model = build_classifier(get_arch("efficientnet_lite0"), 3)
    path = tmp_path / "m.safetensors"
    save_model(path, model.state_dict(), meta(classes=("a", "b")))
    with pytest.raises(ModelFileError, match="lists 2 classes but the tensors hold a head for 3"):
        load_model(path)


def test_a_malicious_pickle_is_never_run(tmp_path):
    sentinel = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(sentinel), "w"))

    bad = tmp_path / "model.pth"
    bad.write_bytes(pickle.dumps(Evil()))
    result = runner.invoke(app, ["predict", "x.jpg", "--model", str(bad)])
    assert result.exit_code == 2 and "never loaded as models" in result.stderr
    from finetune.weights import read_weights_file
    from finetune.errors import WeightsError

    with pytest.raises(WeightsError) as refused:
        read_weights_file(bad)
    assert "holds Python objects besides tensors, which finetune does not unpickle" in str(refused.value)
    assert "weights_only" not in str(refused.value)  # (torch's advice to load it anyway is not passed on)
    assert not sentinel.exists()
    for name, content in (("notes.pth", b"hello"), ("page.pth", b"<!DOCTYPE html><html>Not Found</html>"),
                          ("junk.pth", b"\x00\x01garbage")):  # (a failed download's page: not "Python objects")
        (tmp_path / name).write_bytes(content)
        with pytest.raises(WeightsError, match=rf"{name}: not a weights file torch.save wrote \(or a damaged one\)\."):
            read_weights_file(tmp_path / name)
    (tmp_path / "cut.safetensors").write_bytes(b"\x10\x00\x00")  # (its advice was to pass a finetune model file)
    with pytest.raises(WeightsError, match=r"cut.safetensors: not a readable safetensors file \(truncated, or of another "
                                           r"format\)\. Use a .pth saved with torch.save\(model.state_dict\(\)\) or a "):
        read_weights_file(tmp_path / "cut.safetensors")


def test_run_folder_and_cli_error_for_damaged_file(saved, tmp_path):
    _, path = saved
    path.write_bytes(b"\x00" * 10)
    result = runner.invoke(app, ["predict", "x.jpg", "--model", str(path.parent)])
    assert result.exit_code == 2 and result.stderr.startswith("error: ") and "Traceback" not in result.stderr
    empty = tmp_path / "emptyrun"
    empty.mkdir()
    assert "has no model.safetensors" in runner.invoke(app, ["predict", "x.jpg", "--model", str(empty)]).stderr


def test_metadata_is_readable_json_in_the_header(saved):
    _, path = saved
    header_len = int.from_bytes(path.read_bytes()[:8], "little")
    header = json.loads(path.read_bytes()[8:8 + header_len])
    assert json.loads(header["__metadata__"]["finetune"])["classes"] == ["a", "b", "c"]
