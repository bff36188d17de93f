"""Our bundle against llama.cpp on the very same GGUF (llama.cpp quantizes the demo model to Q4_0 itself):
tokenization, logits, and the alternated benchmark. Needs llama-cpp-python (the optional [llama] extra)."""

from __future__ import annotations

import pytest

from lfm_edge.device_bench.studies.gguf_crosscheck import TEXTS, crosscheck, demo_q4_0, llama_tokens
from lfm_edge.export.cli import demo_model_path

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is the optional [llama] extra")
pytestmark = pytest.mark.llama


@pytest.fixture(scope="module")
def demo_file(tmp_path_factory):
    return demo_q4_0(tmp_path_factory.mktemp("llama-q4_0"))


def test_rebuilt_tokenizer_tokenizes_as_llama_cpp(demo_file, tmp_path):
    from tokenizers import Tokenizer

    from lfm_edge.export.gguf_checkpoint import GgufCheckpoint

    tokenizer = Tokenizer.from_str(GgufCheckpoint(demo_file).files()["tokenizer.json"].decode())
    texts = TEXTS + [(demo_model_path() / "heldout.txt").read_text()[:3000]]
    for text, ids in zip(texts, llama_tokens(demo_file, texts), strict=True):
        assert tokenizer.encode(text).ids == ids, text


def test_bundle_matches_llama_cpp_on_the_same_file(demo_file, tmp_path):
    text = (demo_model_path() / "heldout.txt").read_text()
    result = crosscheck(demo_file, text, tmp_path, window=64, max_tokens=512)
    assert result["texts_tokenized_identically"] == result["texts"]
    assert result["kl_llama_vs_ours"] < 0.01 and result["greedy_agreement"] > 0.95, result


def test_ab_runs_on_a_bundle_made_from_the_file_it_compares_with(demo_file, tmp_path):
    from lfm_edge.device_bench.studies.ab import alternate, bundle_for

    bundle = bundle_for(demo_file, tmp_path / "bundle")
    result = alternate(bundle, demo_file, threads=1, prompt=16, decode=4, rounds=1)
    assert result["same_weights"] and result["median"]["ours_decode"] > 0 and result["median"]["llama_decode"] > 0
