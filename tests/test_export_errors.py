"""Bad input fails early with a message naming what is wrong, and never leaves a half-written bundle."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from lfm_edge.export.checkpoint import CheckpointError
from lfm_edge.export.config import ConfigError, Lfm2Config
from lfm_edge.export.exporter import ExportError, export
from tiny_models import build


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ckpt") / "tiny"
    build("moe_mixed", folder)
    return folder


@pytest.fixture
def copy(checkpoint, tmp_path) -> Path:
    target = tmp_path / "ckpt"
    shutil.copytree(checkpoint, target)
    return target


def _edit_config(folder: Path, **changes) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("changes, message", [
    ({"model_type": "llama"}, "model_type 'llama' is not supported"),
    ({"layer_types": ["conv"] * 3}, "layer_types has 3 entries, expected num_hidden_layers = 4"),
    ({"num_experts_per_tok": 9}, "num_experts_per_tok 9 is larger than num_experts 4"),
    ({"num_key_value_heads": 3}, "num_attention_heads 4 is not divisible by num_key_value_heads 3"),
    ({"hidden_size": -64}, "'hidden_size' = -64, expected a positive integer"),
    ({"num_dense_layers": 7}, "num_dense_layers 7 is outside [0, 4]"),
    ({"vocab_size": "300"}, "'vocab_size' = '300', expected int"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6}}, "rope_type 'yarn' is not supported"),
])
def test_bad_config_names_the_field(copy, tmp_path, changes, message):
    _edit_config(copy, **changes)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")) as err:
        export(copy, tmp_path / "out")
    assert "config.json" in str(err.value)
    assert not (tmp_path / "out").exists()


def test_unreadable_config(copy, tmp_path):
    (copy / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="config.json: unreadable config"):
        export(copy, tmp_path / "out")


def test_missing_layer_types(copy):
    cfg = json.loads((copy / "config.json").read_text())
    del cfg["layer_types"]
    with pytest.raises(ConfigError, match="needs 'layer_types' or 'full_attn_idxs'"):
        Lfm2Config.from_dict(cfg)


def test_missing_tensor_named_before_any_work(copy, tmp_path):
    tensors = load_file(copy / "model.safetensors")
    del tensors["model.layers.3.self_attn.k_proj.weight"]
    save_file(tensors, copy / "model.safetensors")
    with pytest.raises(CheckpointError, match="tensor 'model.layers.3.self_attn.k_proj.weight' is missing"):
        export(copy, tmp_path / "out")
    assert _leftovers(tmp_path) == []


def test_wrong_shape_names_tensor_and_expected_shape(copy, tmp_path):
    tensors = load_file(copy / "model.safetensors")
    tensors["model.layers.0.conv.conv.weight"] = tensors["model.layers.0.conv.conv.weight"][:, :, :2].contiguous()
    save_file(tensors, copy / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"'model.layers.0.conv.conv.weight' has shape \[64, 1, 2\], "
                                              r"expected \[64, 1, 3\]"):
        export(copy, tmp_path / "out")


def test_truncated_safetensors_names_the_file(copy, tmp_path):
    data = (copy / "model.safetensors").read_bytes()
    (copy / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors: tensor .* ends past the end of the file"):
        export(copy, tmp_path / "out")


def test_pickled_weights_are_refused(copy, tmp_path):
    (copy / "model.safetensors").rename(copy / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="no \\*.safetensors weights .*pytorch_model.bin: pickled weights are "
                                              "never loaded"):
        export(copy, tmp_path / "out")


def test_output_that_cannot_be_created(checkpoint, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(ExportError, match="--out .*file/sub/bundle: cannot create its parent folder"):
        export(checkpoint, blocker / "sub" / "bundle")
    with pytest.raises(ExportError, match="--out .*: exists and is not a folder"):
        export(checkpoint, blocker)


def test_unknown_op_set(checkpoint, tmp_path):
    with pytest.raises(ExportError, match="--ops 'fast': expected one of"):
        export(checkpoint, tmp_path / "out", ops="fast")


def test_failed_export_keeps_previous_bundle(checkpoint, tmp_path):
    out = tmp_path / "bundle"
    export(checkpoint, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    seen = []

    def interrupt(tensor: str) -> None:
        seen.append(tensor)
        if len(seen) == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        export(checkpoint, out, ops="portable", progress=interrupt)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert _leftovers(tmp_path) == []


def test_reexport_replaces_bundle(checkpoint, tmp_path):
    out = tmp_path / "bundle"
    export(checkpoint, out, ops="portable")
    export(checkpoint, out, ops="contrib")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["ops"] == "contrib"
    assert _leftovers(tmp_path) == []


@pytest.mark.slow
@pytest.mark.parametrize("tokens", [0, 63, 1 << 21, 2.5, True])
def test_calibration_tokens_out_of_range(checkpoint, tmp_path, tokens):
    with pytest.raises(ExportError, match=f"--calibration-tokens {tokens!r}: expected an integer in 64.."):
        export(checkpoint, tmp_path / "out", quant="int4", calibration_tokens=tokens)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_cli_reports_errors_without_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "lfm_edge.export.cli", str(tmp_path / "nope"), "--out",
                             str(tmp_path / "out")], capture_output=True, text=True)
    assert result.returncode == 2
    assert "lfm-export: error:" in result.stderr and "nope: no such checkpoint folder" in result.stderr
    assert "Traceback" not in result.stderr


def test_hub_id_without_network_is_a_clear_error(tmp_path, monkeypatch):
    """Hub ids go to huggingface_hub (tested up to the download: there is no network here)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(CheckpointError, match="LiquidAI/LFM2-8B-A1B: could not download from the Hugging Face hub"):
        export("LiquidAI/LFM2-8B-A1B", tmp_path / "out")


def test_unknown_target(checkpoint, tmp_path):
    with pytest.raises(ExportError, match="--target 'watch': expected one of"):
        export(checkpoint, tmp_path / "out", target="watch")
