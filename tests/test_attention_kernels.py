"""GroupQueryAttention's two onnxruntime kernels (runtime/kernels.py): the same results, the environment
variable onnxruntime reads set only while a session builds, and prefill chunks sized for the unfused scores."""

from __future__ import annotations

import os

import numpy as np
import pytest
from shared_bundles import demo_bundle

from lfm_edge.runtime import kernels
from lfm_edge.runtime.backends.python import LfmSession
from lfm_edge.runtime.generate import Generation, prefill_ranges


@pytest.fixture(scope="module")
def int8_cache_bundle(tmp_path_factory):
    return demo_bundle(tmp_path_factory.getbasetemp(), "int4-int8kv")


def test_building_sets_the_variable_only_while_a_session_builds(monkeypatch):
    monkeypatch.setenv(kernels.FLASH_OFF, "0")
    with kernels.building("unfused"):
        assert os.environ[kernels.FLASH_OFF] == "1"
    assert os.environ[kernels.FLASH_OFF] == "0"
    with kernels.building("flash"):
        assert kernels.FLASH_OFF not in os.environ  # the caller's choice wins over the environment
    assert os.environ[kernels.FLASH_OFF] == "0"
    with pytest.raises(ValueError, match="attention_kernel 'fast': expected one of flash, unfused"):
        kernels.check("fast")


@pytest.mark.slow
def test_unfused_kernel_gives_the_flash_kernels_results(int8_cache_bundle):
    flash = LfmSession(int8_cache_bundle, threads=1)
    unfused = LfmSession(int8_cache_bundle, threads=1, attention_kernel="unfused")
    assert (flash.attention_kernel, unfused.attention_kernel) == ("flash", "unfused")
    assert kernels.FLASH_OFF not in os.environ
    ids = np.arange(10, 300, dtype=np.int64)[None]
    a, b = flash.new_cache(1, 400), unfused.new_cache(1, 400)
    np.testing.assert_allclose(a.step(ids, last=1), b.step(ids, last=1), atol=2e-3)
    for t in (5, 77, 1000):  # decode steps at depth
        step = np.array([[t]], dtype=np.int64)
        np.testing.assert_allclose(a.step(step), b.step(step), atol=2e-3)
    prompt = list(range(20, 120))
    assert list(Generation(flash, [prompt], 12, eos_token_ids=[])) == \
        list(Generation(unfused, [prompt], 12, eos_token_ids=[]))
    with pytest.raises(ValueError, match="attention_kernel 'x'"):
        LfmSession(int8_cache_bundle, attention_kernel="x")


def test_unfused_prefill_chunks_shrink_sooner():
    """Unfused scores are 4 bytes per query head and pair: with LFM2.5's 32 heads a 256 MB budget allows
    512-token chunks to depth ~3K instead of 16K."""
    flash = kernels.prefill_bytes_per_pair("flash", 32)
    unfused = kernels.prefill_bytes_per_pair("unfused", 32)
    assert (flash, unfused) == (32, 32 + 128)
    budget = 256 << 20
    sizes = {kind: {s: e - s for s, e in prefill_ranges(0, 40_000, 512, [], per_pair, budget)}
             for kind, per_pair in (("flash", flash), ("unfused", unfused))}
    assert sizes["flash"][8192] == 512 and sizes["unfused"][8192] == 128
    assert sizes["flash"][32_768] == 128 and sizes["unfused"][32_768] == 32
    for kind, per_pair in (("flash", flash), ("unfused", unfused)):
        assert all(per_pair * n * (s + n) <= budget for s, n in sizes[kind].items())
