"""The onnxruntime floor: pyproject.toml names the oldest version the bundles are tested with, bundles record it,
and a bundle that needs a newer onnxruntime than the installed one is refused at load with both versions named."""

from __future__ import annotations

import json
import re
from importlib.metadata import version
from pathlib import Path

import onnxruntime as ort
import pytest
from shared_bundles import demo_bundle

from lfm_edge.runtime import LfmModel
from lfm_edge.runtime.bundle import MIN_ONNXRUNTIME, BundleError, _version, read_bundle
from lfm_edge.runtime.cli.chat import main as chat_main

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return demo_bundle(tmp_path_factory.getbasetemp(), "int4")


def test_the_floor_is_the_tested_version():
    # tomllib is 3.11+, and the project supports 3.10
    (floor,) = re.findall(r'^\s*"onnxruntime>=([\d.]+)"', (ROOT / "pyproject.toml").read_text(), flags=re.M)
    assert floor == MIN_ONNXRUNTIME
    # the tests run on what is installed: the floor must not claim an older onnxruntime than that is
    assert _version(version("onnxruntime"))[:2] == _version(MIN_ONNXRUNTIME)[:2], \
        "the tests now run another onnxruntime: re-test and move MIN_ONNXRUNTIME and pyproject's floor with it"


@pytest.mark.slow
def test_bundle_records_what_it_needs_and_what_wrote_it(bundle):
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["requires"] == {"onnxruntime": MIN_ONNXRUNTIME}
    assert manifest["versions"]["onnxruntime"] == ort.__version__


def test_older_onnxruntime_is_refused_with_both_versions(bundle, monkeypatch):
    monkeypatch.setattr(ort, "__version__", "1.31.1")
    with pytest.raises(BundleError) as raised:
        LfmModel(bundle)
    message = str(raised.value)
    assert f"needs onnxruntime >= {MIN_ONNXRUNTIME}" in message and "this is onnxruntime 1.31.1" in message
    assert "manifest.json requires.onnxruntime" in message


def test_bundle_from_a_newer_exporter_is_refused(bundle, tmp_path, capsys):
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["requires"]["onnxruntime"] = "99.1"
    newer = tmp_path / "newer"
    newer.mkdir()
    for file in bundle.iterdir():
        (newer / file.name).symlink_to(file)
    (newer / "manifest.json").unlink()
    (newer / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=rf"needs onnxruntime >= 99\.1 .* this is onnxruntime {ort.__version__}"):
        LfmModel(newer)
    assert chat_main([str(newer), "-p", "hi"]) == 2
    assert "needs onnxruntime >= 99.1" in capsys.readouterr().err


def test_same_or_newer_onnxruntime_loads(bundle):
    for installed in (MIN_ONNXRUNTIME, MIN_ONNXRUNTIME + ".0", "1.40.0", "2.0.0.dev20270101"):
        read_bundle(bundle, onnxruntime_version=installed)
    # the phone backends reach onnxruntime through Java or Objective-C and pass no Python version
    read_bundle(bundle)
