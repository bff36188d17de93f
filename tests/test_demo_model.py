"""The bundled demo model: small, trained, exported exactly, and writing recognisable English."""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

from lfm_edge.export.cli import demo_model_path
from lfm_edge.export.exporter import export
from lfm_edge.runtime import LfmModel
from lfm_edge.runtime.backends.python import Cache, LfmSession
from lfm_edge.runtime.generate import generate

DEMO = demo_model_path()


def test_demo_model_is_small_and_reproducible():
    weights = sum(p.stat().st_size for p in DEMO.iterdir() if p.suffix in (".safetensors", ".json", ".txt"))
    assert weights <= 10 * 1024 * 1024
    script = (DEMO / "train.py").read_text()
    assert "--seed" in script and "pydoc_data" in script


@pytest.fixture(scope="module")
def hf_model():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(DEMO, dtype=torch.float32).eval()


@pytest.mark.parametrize("ops", ["contrib", "portable"])
@pytest.mark.slow
def test_demo_export_matches_transformers_on_text(hf_model, tmp_path, ops):
    bundle = export(DEMO, tmp_path / ops, ops=ops).bundle
    tok = Tokenizer.from_file(str(DEMO / "tokenizer.json"))
    prompt = tok.encode("A class definition is an executable statement").ids
    with torch.no_grad():
        want = hf_model(torch.tensor([prompt])).logits.numpy()
    np.testing.assert_allclose(Cache(LfmSession(bundle), 1, len(prompt)).step(np.array([prompt])), want,
                               atol=1e-4, rtol=0)
    hf_model.generation_config.eos_token_id = None
    greedy = hf_model.generate(torch.tensor([prompt]), max_new_tokens=32, min_new_tokens=32, do_sample=False,
                               pad_token_id=0)[0, len(prompt):].tolist()
    assert generate(LfmSession(bundle), [prompt], 32, eos_token_ids=[])[0] == greedy


@pytest.mark.slow
def test_lfm_export_without_arguments_exports_the_demo(tmp_path):
    result = subprocess.run([sys.executable, "-m", "lfm_edge.export.cli", "--quiet"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "No checkpoint given: exporting the bundled demo model" in result.stdout
    bundle = tmp_path / "build" / "demo_model-fp32-contrib"
    model = LfmModel(bundle)
    text = model.tokenizer.decode(generate(model.session, [model.tokenizer.encode("The list").ids], 40,
                                           eos_token_ids=[])[0])
    words = re.findall(r"[A-Za-z]{3,}", text)
    from pydoc_data.topics import topics

    corpus = set(re.findall(r"[A-Za-z]{3,}", " ".join(topics.values())))  # the English the model learned
    known = [w for w in words if w in corpus or w.lower() in corpus]
    assert len(words) >= 10 and len(known) >= 0.8 * len(words), text
