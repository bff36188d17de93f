"""A phone bundle carries onnxruntime's mobile checks and the ORT format when the model fits in it."""

from __future__ import annotations

import json
import os

import numpy as np
import onnxruntime as ort
import pytest

from lfm_edge.export.cli import demo_model_path
from lfm_edge.export.exporter import export
from lfm_edge.runtime.backends.python import LfmSession
from lfm_edge.runtime.generate import generate


@pytest.mark.slow
def test_android_bundle_has_usability_report_and_ort_format(tmp_path):
    bundle = export(demo_model_path(), tmp_path / "android", quant="int4", target="android").bundle
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["target"] == "android"
    report = (bundle / "mobile_usability.txt").read_text()
    assert "NNAPI" in report and "CoreML" in report
    assert any("CPU EP" in line for line in manifest["mobile_usability"]["summary"])
    assert manifest["ort_format"]["file"] == "model.ort"
    ops = (bundle / "required_operators.config").read_text()
    assert "MatMulNBits" in ops and "QMoE" in ops
    # the ORT-format model runs and agrees with the .onnx one
    prompt = np.array([[1, 6, 40, 41, 42, 43]], np.int64)
    session = LfmSession(bundle)
    feeds = {"input_ids": prompt, "attention_mask": np.ones_like(prompt)}
    for i, (h, k) in session.state.conv.items():
        feeds[f"past.{i}.conv"] = np.zeros((1, h, k), np.float32)
    types = {i.name: i.type for i in session.session.get_inputs()}
    for i, (heads, dim) in session.state.kv.items():
        for kv in ("key", "value"):  # the phone default: an int8 cache
            dtype = np.int8 if types[f"past_key_values.{i}.{kv}"] == "tensor(int8)" else np.float32
            feeds[f"past_key_values.{i}.{kv}"] = np.zeros((1, heads, prompt.shape[1], dim), dtype)
    want = session.session.run(["logits"], feeds)[0]
    got = ort.InferenceSession(str(bundle / "model.ort"), providers=["CPUExecutionProvider"]).run(["logits"], feeds)[0]
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    assert generate(session, [[1, 6, 40]], 4, eos_token_ids=[])
    # the target's thread count reaches genai and our runtime (capped at this machine's CPUs)
    genai = json.loads((bundle / "genai_config.json").read_text())
    assert genai["model"]["decoder"]["session_options"]["intra_op_num_threads"] == 4
    assert session.session.get_session_options().intra_op_num_threads == min(4, os.cpu_count())


@pytest.mark.slow
def test_targets_set_threads_for_their_cores(tmp_path):
    for target, threads in (("ios", 2), ("desktop", None)):
        bundle = export(demo_model_path(), tmp_path / target, quant="int4", target=target).bundle
        options = json.loads((bundle / "genai_config.json").read_text())["model"]["decoder"]["session_options"]
        assert options.get("intra_op_num_threads") == threads
