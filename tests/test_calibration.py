"""GPTQ's calibration a layer at a time (export/calibration.py LayerHessians) against the one pass that holds every
layer's H (linear_hessians): the same H, bit for bit, and the same bundle, byte for byte."""

from __future__ import annotations

import numpy as np
import pytest

from lfm_edge.export import exporter
from lfm_edge.export.calibration import LayerHessians, linear_hessians
from lfm_edge.export.checkpoint import Checkpoint
from lfm_edge.export.lfm2 import Lfm2Model
from lfm_edge.quant.policy import get_policy
from tiny_models import build

TOKENS = 512  # one window: the tiny models' calibration in seconds


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    folder = tmp_path_factory.mktemp("calibration") / "ckpt"
    build("moe_mixed", folder, seed=3)  # attention and conv layers, a dense layer: every kind of linear
    return Checkpoint(folder)


def test_layer_by_layer_hessians_are_the_one_pass_bits_and_one_layer_is_held(ckpt):
    wanted = get_policy("int4").calibrated
    whole, source = linear_hessians(ckpt, wanted, tokens=TOKENS)
    streamed = LayerHessians(ckpt, wanted, tokens=TOKENS)
    assert streamed.source == source and whole
    names = [w.name for w in Lfm2Model(ckpt.config).weights() if wanted(w.name)]
    assert set(names) == set(whole)
    for i, name in enumerate(names):
        h = streamed.get(name)
        assert h.dtype == np.float64 and np.array_equal(h, whole[name]), name
        layer = name.split(".")[2]
        # held: the rest of this layer's, none of an earlier layer's nor of the ones handed out
        assert set(streamed._hessians) == {n for n in names[i + 1:] if n.split(".")[2] == layer}
        if name.endswith("q_proj.weight"):
            with pytest.raises(ValueError, match="asked for twice"):
                streamed.get(name)
    assert streamed.get("model.layers.0.feed_forward.gate.weight") is None  # not a GPTQ weight: no pass
    with pytest.raises(ValueError, match=r"model\.layers\.0\.conv\.in_proj\.weight.*model's order"):
        streamed.get(names[0])


@pytest.mark.slow  # two int4 exports; the Hessians' bits are the fast tier's check
def test_streamed_export_is_byte_identical_to_the_one_pass_export(ckpt, tmp_path, monkeypatch):
    """The bundle exported with H streamed a layer at a time against the one exported with every layer's H computed
    up front (what the exporter did before): every file the same bytes."""
    policy = get_policy("int4")
    streamed = exporter.export(ckpt.folder, tmp_path / "streamed", quant=policy, calibration_tokens=TOKENS).bundle

    class OnePass(dict):
        def __init__(self, checkpoint, wanted, tokens, progress):
            hessians, self.source = linear_hessians(checkpoint, wanted, tokens=tokens, progress=progress)
            super().__init__(hessians)

    monkeypatch.setattr(exporter, "LayerHessians", OnePass)
    whole = exporter.export(ckpt.folder, tmp_path / "whole", quant=policy, calibration_tokens=TOKENS).bundle
    files = sorted(p.name for p in streamed.iterdir())
    assert files == sorted(p.name for p in whole.iterdir()) and "model.onnx.data" in files
    for name in files:
        assert (streamed / name).read_bytes() == (whole / name).read_bytes(), name
