"""The soak script's short version: 8 threads on one model equal serial runs; memory flat over generations;
the same for conversations that keep their state."""

from __future__ import annotations

import pytest

from lfm_edge.device_bench.studies.soak import soak, soak_conversations
from lfm_edge.export.cli import demo_model_path
from lfm_edge.export.exporter import export


@pytest.mark.slow
def test_short_soak(tmp_path):
    bundle = export(demo_model_path(), tmp_path / "int4", quant="int4").bundle
    result = soak(bundle, threads=8, per_thread=5, generations=150, new_tokens=6)
    assert result["concurrent_generations"] == 40 and result["mismatches"] == 0
    assert result["growth_after_warmup_mb"] <= 20, result["rss_mb"]


@pytest.mark.slow
def test_short_conversation_soak(tmp_path):
    bundle = export(demo_model_path(), tmp_path / "int4", quant="int4").bundle
    result = soak_conversations(bundle, threads=4, conversations=12, turns=4, save_to=tmp_path)
    assert result["conversations"] == 12 and result["mismatches"] == 0
    assert result["growth_after_warmup_mb"] <= 20, result["rss_mb"]
