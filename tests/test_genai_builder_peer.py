"""The onnxruntime-genai builder peer study runs end to end on a tiny lfm2_moe checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from lfm_edge.device_bench.peers.genai_builder import write_checkpoint
from tiny_models import build


@pytest.mark.slow
def test_study_exports_both_and_compares(tmp_path):
    pytest.importorskip("onnxruntime_genai")
    ckpt = tmp_path / "ckpt"
    build("moe_wide_256", ckpt)
    text = tmp_path / "heldout.txt"
    text.write_text(" ".join(f"w{(7 * i) % 290 + 3}" for i in range(300)))
    out = tmp_path / "result.json"
    # run as users run it (`python -m`): its memory part starts itself again by module name (it once passed
    # `__main__` there, which only an in-process call to main() hid)
    study = [sys.executable, "-m", "lfm_edge.device_bench.studies.genai_builder"]
    run = subprocess.run(study + ["--checkpoint", str(ckpt), "--work", str(tmp_path / "work"), "--rounds", "1",
                                  "--prompt", "16", "--decode", "4", "--quality-model", str(ckpt), "--text",
                                  str(text), "--out", str(out)], capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out.read_text())
    for side in ("ours", "builder"):
        run = result["export"][side]
        assert run["returncode"] == 0 and run["seconds"] > 0 and run["peak_rss_mb"] > 50 and run["bundle_mb"] > 0
        assert result["memory"][side]["peak_rss_mb"] >= result["memory"][side]["rss_after_load_mb"] > 50
    assert (tmp_path / "work" / "builder" / "genai_config.json").is_file()
    speed = result["speed"]
    assert len(speed["rounds"]) == 1 and speed["decode_ratio_per_round"] > 0 and speed["prefill_ratio_per_round"] > 0
    quality = result["quality"]
    # the builder's fp32 export and ours compute the same model: the common reference is sound
    assert quality["builder fp32"]["kl"] < 1e-3 and quality["builder fp32"]["top1"] > 0.98
    assert quality["builder int4"]["kl"] > 1e-3 and quality["ours int4"]["kl"] > 1e-3  # int4 is not fp32
    assert "| decode" in out.with_suffix(".md").read_text()


@pytest.mark.slow
def test_written_checkpoint_loads_in_transformers(tmp_path):
    """The random full-width checkpoint both exporters read is a valid transformers Lfm2Moe checkpoint whose
    tensors are export/random_weights.py's, rounded to bfloat16."""
    import torch
    from safetensors import safe_open
    from transformers import AutoConfig

    from lfm_edge.export.random_weights import RandomCheckpoint

    folder = write_checkpoint("lfm2.5-8b-a1b:1", tmp_path / "ckpt")
    config = AutoConfig.from_pretrained(folder)
    assert config.model_type == "lfm2_moe" and config.num_hidden_layers == 1 and config.hidden_size == 2048
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    name = "model.layers.0.conv.out_proj.weight"
    with safe_open(folder / index[name], "pt") as f:
        got = f.get_tensor(name)
    want = torch.from_numpy(RandomCheckpoint("lfm2.5-8b-a1b:1").tensor(name, (2048, 2048))).to(torch.bfloat16)
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)
    assert (folder / "tokenizer.json").is_file() and "lm_head.weight" not in index
