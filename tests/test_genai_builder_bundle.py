"""Bundles written by onnxruntime-genai's own builder load and run in our runtime, token for token."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from lfm_edge.runtime.backends.python import LfmSession
from lfm_edge.runtime.generate import generate
from tiny_models import build


@pytest.mark.slow
def test_genai_builder_bundle_runs_in_our_runtime(tmp_path):
    pytest.importorskip("onnxruntime_genai")
    model = build("moe_mixed", tmp_path / "ckpt")
    out = tmp_path / "genai"
    result = subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(tmp_path / "ckpt"),
                             "-o", str(out), "-p", "fp32", "-e", "cpu", "-c", str(tmp_path / "cache")],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    prompt = [5, 17, 99, 3, 250, 41, 8]
    model.generation_config.eos_token_id = None
    want = model.generate(torch.tensor([prompt]), max_new_tokens=16, min_new_tokens=16, do_sample=False,
                          pad_token_id=0)[0, len(prompt):].tolist()
    session = LfmSession(out)
    assert session.share_buffer  # the builder's GroupQueryAttention shares past and present
    assert generate(session, [prompt], 16, eos_token_ids=[])[0] == want
