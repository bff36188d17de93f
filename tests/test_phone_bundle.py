"""A phone bundle carries onnxruntime's mobile checks and the ORT format when the model fits in it."""

from __future__ import annotations

import json
import os
import tempfile

import numpy as np
import onnxruntime as ort
import pytest
from shared_bundles import demo_bundle

from lfm_edge.export.mobile import ort_warnings
from lfm_edge.export.options import TARGET_THREADS
from lfm_edge.runtime.backends.python import LfmSession
from lfm_edge.runtime.generate import generate


@pytest.mark.slow
def test_android_bundle_has_usability_report_and_ort_format(tmp_path_factory):
    bundle = demo_bundle(tmp_path_factory.getbasetemp(), "android")
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["target"] == "android"
    report = (bundle / "mobile_usability.txt").read_text()
    assert "NNAPI" in report and "CoreML" in report
    assert "\x1b" not in report  # the checker's terminal colours are not text
    usability = manifest["mobile_usability"]
    assert any("CPU EP" in line for line in usability["summary"])
    # the checker's own warnings (its session writes an optimised copy) are told apart from what an app meets
    assert set(usability["load_warnings"]) == {"model.onnx", "model.ort"}
    on_load = {w for found in usability["load_warnings"].values() for w in found}
    assert not on_load & set(usability["checker_warnings"])
    assert not any("dequantize + SGEMM" in w for w in on_load)  # an app's session prepacks the experts
    header = report.split("-" * 100)[0]
    assert all(w in header for w in usability["checker_warnings"]) and "README.md" in header
    if any("dequantize + SGEMM" in w for w in usability["checker_warnings"]):
        assert "is the checker's copy" in header
    assert manifest["ort_format"]["file"] == "model.ort"
    ops = (bundle / "required_operators.config").read_text()
    assert "MatMulNBits" in ops and "QMoE" in ops
    assert "# - model.ort\n" in ops and tempfile.gettempdir() not in ops  # not the converter's temporary folder
    readme = (bundle / "README.md").read_text()  # which file a phone loads, and what model.ort is for
    assert "## Which file a phone loads" in readme and "`model.onnx` with its weights in `model.onnx.data`" in readme
    assert "minimal (reduced) onnxruntime build" in readme and "README.md" in manifest["files"]
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
def test_targets_set_threads_for_their_cores(tmp_path_factory):
    for kind, threads in (("android", TARGET_THREADS["android"]), ("int4", None)):  # int4: the desktop target
        bundle = demo_bundle(tmp_path_factory.getbasetemp(), kind)
        options = json.loads((bundle / "genai_config.json").read_text())["model"]["decoder"]["session_options"]
        assert options.get("intra_op_num_threads") == threads


def test_warnings_are_read_without_colours_or_time_stamps():
    log = ("\x1b[0;93m2026-12-07 12:47:26.1 [W:onnxruntime:Default, moe_quantization_cpu.cc:1155 PrePackQNBitExperts] "
           "QMoE node '/QMoE': falling back.\x1b[m\nINFO:  Checking NNAPI\n"
           "2026-12-07 12:47:26.2 [W:onnxruntime:, graph.cc:1492 Graph] Initializer x appears in graph inputs\n"
           "2026-12-07 12:47:26.3 [W:onnxruntime:Default, moe_quantization_cpu.cc:1155 PrePackQNBitExperts] "
           "QMoE node '/QMoE': falling back.\n")
    assert ort_warnings(log) == ["QMoE node '/QMoE': falling back.", "Initializer x appears in graph inputs"]
