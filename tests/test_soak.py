"""The soak script's short version: 8 threads on one model equal serial runs; memory flat over generations;
the same for conversations that keep their state."""

from __future__ import annotations

import pytest
from shared_bundles import demo_bundle

from lfm_edge.device_bench.studies.soak import soak, soak_conversations


@pytest.mark.slow
def test_short_soak(tmp_path_factory):
    bundle = demo_bundle(tmp_path_factory.getbasetemp(), "int4")
    result = soak(bundle, threads=8, per_thread=5, generations=150, new_tokens=6)
    assert result["concurrent_generations"] == 40 and result["mismatches"] == 0
    assert result["growth_after_warmup_mb"] <= 20, result["rss_mb"]


@pytest.mark.slow
def test_short_conversation_soak(tmp_path_factory, tmp_path):
    bundle = demo_bundle(tmp_path_factory.getbasetemp(), "int4")
    result = soak_conversations(bundle, threads=4, conversations=12, turns=4, save_to=tmp_path)
    assert result["conversations"] == 12 and result["mismatches"] == 0
    assert result["growth_after_warmup_mb"] <= 20, result["rss_mb"]
