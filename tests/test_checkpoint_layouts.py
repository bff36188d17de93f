"""Checkpoints as they come: fused or per-expert MoE weights, bf16 or fp32 tensors, sharded files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from lfm_edge.export.checkpoint import Checkpoint
from lfm_edge.export.exporter import export
from lfm_edge.runtime.backends.python import Cache, LfmSession
from tiny_models import build

PROMPT = [[5, 17, 99, 3, 250, 41, 8, 77]]


def _logits(bundle) -> np.ndarray:
    return Cache(LfmSession(bundle), 1, 16).step(np.array(PROMPT))


def _hf_logits(model) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(PROMPT), use_cache=False).logits.numpy()


@pytest.mark.slow
def test_fused_expert_layout_exports_the_same_model(tmp_path):
    model = build("moe_mixed", tmp_path / "per_expert")
    build("moe_mixed", tmp_path / "fused", fused_experts=True)
    fused = Checkpoint(tmp_path / "fused")
    assert "model.layers.1.feed_forward.experts.gate_up_proj" in set(fused.names())
    assert "model.layers.1.feed_forward.experts.3.w3.weight" in fused
    for ops in ("contrib", "portable"):
        a = _logits(export(tmp_path / "per_expert", tmp_path / f"a-{ops}", ops=ops).bundle)
        b = _logits(export(tmp_path / "fused", tmp_path / f"b-{ops}", ops=ops).bundle)
        np.testing.assert_array_equal(a, b)
        np.testing.assert_allclose(a, _hf_logits(model), atol=1e-4, rtol=0)


@pytest.mark.slow
def test_bf16_sharded_checkpoint(tmp_path):
    """Liquid ships bf16 weights in several shards; the reader widens bf16 exactly."""
    model = build("moe_mixed", tmp_path / "ckpt")
    tensors = load_file(tmp_path / "ckpt" / "model.safetensors")
    (tmp_path / "ckpt" / "model.safetensors").unlink()
    names = sorted(tensors)
    half = len(names) // 2
    for i, part in enumerate((names[:half], names[half:])):
        save_file({n: tensors[n].to(torch.bfloat16) for n in part},
                  tmp_path / "ckpt" / f"model-0000{i + 1}-of-00002.safetensors")
    (tmp_path / "ckpt" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {}}))
    with torch.no_grad():  # the reference holds the same bf16-rounded weights
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())
        for name, b in model.named_buffers():
            if name.endswith("expert_bias"):
                b.copy_(b.to(torch.bfloat16).float())
    got = _logits(export(tmp_path / "ckpt", tmp_path / "bundle").bundle)
    np.testing.assert_allclose(got, _hf_logits(model), atol=1e-4, rtol=0)


def test_unsupported_dtype_names_the_tensor(tmp_path):
    build("moe_mixed", tmp_path / "ckpt")
    tensors = load_file(tmp_path / "ckpt" / "model.safetensors")
    tensors["model.embedding_norm.weight"] = tensors["model.embedding_norm.weight"].to(torch.int32)
    save_file(tensors, tmp_path / "ckpt" / "model.safetensors")
    with pytest.raises(ValueError, match="'model.embedding_norm.weight' has dtype I32, expected a float type"):
        export(tmp_path / "ckpt", tmp_path / "bundle")
    assert not (tmp_path / "bundle").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # refused before any writing
