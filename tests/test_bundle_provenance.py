"""A bundle says which checkpoint it came from without carrying the exporting machine's paths."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import huggingface_hub
import pytest

from lfm_edge.export.cli import demo_model_path
from lfm_edge.export.exporter import export


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_no_file_in_the_bundle_holds_a_local_path(tmp_path):
    src = tmp_path / "home" / "alice" / "my-checkpoint"
    shutil.copytree(demo_model_path(), src, ignore=shutil.ignore_patterns("__pycache__", "*.py"))
    out = tmp_path / "bundles" / "phone"
    # android adds mobile_usability.txt and model.ort; eval_text adds quality.md/.json
    export(src, out, quant="int4", target="android", eval_text=(src / "heldout.txt").read_text()[:4000])
    names = {p.name for p in out.iterdir()}
    assert {"mobile_usability.txt", "quality.md", "genai_config.json", "model.ort"} <= names
    for file in out.iterdir():
        data = file.read_bytes()
        for path in (src, tmp_path, out, Path.home()):
            assert str(path).encode() not in data, f"{file.name} holds the local path {path}"
    source = json.loads((out / "manifest.json").read_text())["source"]
    assert source == {"name": "my-checkpoint", "config_sha256": _sha(src / "config.json"),
                      "weights_sha256": {"model.safetensors": _sha(src / "model.safetensors")}}


def test_hub_checkpoint_is_recorded_by_id_revision_and_blob_hashes(tmp_path, monkeypatch):
    # huggingface_hub's cache layout: snapshots/<commit>/<file> -> ../../blobs/<sha256 of the file>
    cache = tmp_path / "hub" / "models--LiquidAI--Tiny"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot, blobs = cache / "snapshots" / commit, cache / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for file in demo_model_path().iterdir():
        if file.suffix in (".json", ".safetensors"):
            blob = blobs / _sha(file)
            shutil.copyfile(file, blob)
            (snapshot / file.name).symlink_to(Path("../../blobs") / blob.name)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda **kwargs: str(snapshot))
    out = tmp_path / "bundle"
    export("LiquidAI/Tiny", out)
    manifest_text = (out / "manifest.json").read_text()
    assert str(tmp_path) not in manifest_text
    source = json.loads(manifest_text)["source"]
    assert source["hub_id"] == "LiquidAI/Tiny" and source["revision"] == commit
    assert source["weights_sha256"] == {"model.safetensors": _sha(demo_model_path() / "model.safetensors")}
    assert source["config_sha256"] == _sha(demo_model_path() / "config.json")
