"""`lfm-bench --long-context`: prefill and decode by depth, each run in a process of its own, a synthetic fill
for depths too deep to prefill here, refusals before running, and llama.cpp where it is installed."""

from __future__ import annotations

import json

import pytest
from shared_bundles import demo_bundle

from lfm_edge.device_bench import long_context as longctx
from lfm_edge.device_bench.cli import main
from lfm_edge.export.cli import demo_model_path


@pytest.fixture(scope="module")
def int8_cache_bundle(tmp_path_factory):
    return demo_bundle(tmp_path_factory.getbasetemp(), "int4-int8kv")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):  # for refusals, which any bundle gets: the session's most shared one
    return demo_bundle(tmp_path_factory.getbasetemp(), "int4")


@pytest.mark.slow
def test_long_context_bench_measures_each_depth_and_a_synthetic_fill(int8_cache_bundle, tmp_path):
    out = tmp_path / "out"
    code = main(["long-context", str(int8_cache_bundle), "--depths", "0,600", "--synthetic-depths", "2000",
                 "--decode", "16", "--threads", "1", "--runs", "1", "--peer", "none", "--out", str(out)])
    assert code == 0
    result = json.loads((out / "bench.json").read_text())
    section = result["long_context"]
    geo = section["geometry"]
    assert geo["kv_bits"] == 8 and geo["attention_layers"] == 2
    by_key = {(p["depth"], p["synthetic"]): p for p in section["points"]}
    assert set(by_key) == {(0, False), (600, False), (2000, True)}
    for (depth, _), point in by_key.items():
        (run,) = point["runs"]
        # the cache holds prompt + decode + 1 rows of int8 keys and values, as a generation reserves them
        assert run["kv_rows"] == depth + 16 + 1
        assert run["kv_bytes"] == longctx.kv_bytes(geo, depth + 17, 1)
        assert run["decode"]["steps"] == 16 and run["decode"]["tps"] > 0
        assert run["peak_rss_mb"] >= run["rss_after_load_mb"] * 0.5 > 0
    assert "prefill" not in by_key[(0, False)]["runs"][0]
    prefill = by_key[(600, False)]["runs"][0]["prefill"]
    assert prefill["tokens"] == 600 and prefill["at_depth"] == 0 and prefill["chunks"] == [88, 512]
    synthetic = by_key[(2000, True)]["runs"][0]["prefill"]
    assert synthetic["tokens"] == longctx.SYNTHETIC_TAIL and synthetic["at_depth"] == 2000 - longctx.SYNTHETIC_TAIL
    table = section["summary"]["table"]["ours"]
    assert set(table) == {"0", "600", "2000 synthetic"}
    ratio = section["summary"]["ratios"]["decode at 600 / at 0"]
    assert ratio == pytest.approx(table["600"]["decode_tps"] / table["0"]["decode_tps"])
    text = (out / "bench.md").read_text()
    assert "| ours | 2000 synthetic |" in text and "KV cache 8-bit" in text
    assert (out / "bench.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_long_context_bench_refuses_a_depth_beyond_the_context(int8_cache_bundle, tmp_path, capsys):
    code = main(["long-context", str(int8_cache_bundle), "--depths", "4090", "--decode", "16", "--peer", "none",
                 "--out", str(tmp_path / "out")])
    assert code == 2
    err = capsys.readouterr().err
    assert "4090 + 16 decoded tokens exceed the model's context length 4096" in err
    assert not (tmp_path / "out").exists()


def test_llama_peer_without_a_gguf_is_refused_before_measuring(bundle, tmp_path, capsys):
    for workload in (["long-context", str(bundle), "--depths", "64"],
                     ["conversation", str(bundle), "--script", "2:8:4"], ["speed", str(bundle)]):
        assert main([*workload, "--peer", "llama", "--out", str(tmp_path / "out")]) == 2
        assert "--peer llama needs --gguf FILE" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_long_context_refuses_a_point_whose_memory_exceeds_what_is_available_simulated_small_phone(
        bundle, monkeypatch):
    """MemAvailable stands in for a phone with little memory; the point is refused before any process runs."""
    monkeypatch.setattr(longctx, "available_memory", lambda: 1_000_000)
    section = longctx.run(bundle, [1000], 16, 1, None, [])
    (point,) = section["points"]
    assert point["runs"] == [] and "MemAvailable is 0.00 GB" in point["refused"]
    assert "KV cache for 1,017 rows" in point["refused"]
    need = longctx.memory_needed("ours", section["geometry"], 1000, 16, 0, longctx.PREFILL_BUDGET)
    assert point["memory_needed_bytes"] == need > section["geometry"]["weights_bytes"]


# skipped before its fixture exports a bundle (an importorskip inside would export it first)
@pytest.mark.llama
def test_llama_cpp_runs_beside_ours_with_both_of_its_caches(int8_cache_bundle, tmp_path):
    from lfm_edge.device_bench.peers.gguf_writer import write_gguf
    from lfm_edge.export.checkpoint import Checkpoint

    gguf = write_gguf(Checkpoint(demo_model_path()), tmp_path / "demo.gguf", f16=False)
    section = longctx.run(int8_cache_bundle, [700], 8, 1, str(gguf), [])
    runs = {p["system"]: p["runs"][0] for p in section["points"]}
    assert set(runs) == set(longctx.SYSTEMS)
    assert runs["llama.cpp f16"]["cache_type"] == "f16" and not runs["llama.cpp f16"]["flash_attn"]
    assert runs["llama.cpp q8_0+fa"]["flash_attn"] and runs["llama.cpp q8_0+fa"]["kv_rows"] % 256 == 0
    for run in runs.values():
        assert run["prefill"]["tokens"] == 700 and run["decode"]["steps"] == 8
    table = section["summary"]["table"]
    assert table["llama.cpp f16"]["700"]["kv_bytes"] == 2 * table["llama.cpp q8_0+fa"]["700"]["kv_bytes"] * 32 / 34
    assert "kv_bytes at 700 vs llama.cpp f16" in section["summary"]["ratios"]


@pytest.mark.slow
def test_long_context_bench_runs_ours_with_each_attention_kernel(int8_cache_bundle, tmp_path):
    out = tmp_path / "out"
    assert main(["long-context", str(int8_cache_bundle), "--depths", "300", "--synthetic-depths", "1200",
                 "--decode", "8", "--threads", "1", "--runs", "1", "--peer", "none", "--attention-kernel", "both",
                 "--out", str(out)]) == 0
    section = json.loads((out / "bench.json").read_text())["long_context"]
    assert {(p["system"], p["depth"]) for p in section["points"]} == {
        ("ours", 300), ("ours unfused", 300), ("ours", 1200), ("ours unfused", 1200)}
    table = section["summary"]["table"]
    assert table["ours unfused"]["1200 synthetic"]["decode_tps"] > 0
    assert "decode at 1200 synthetic / at 300 (ours unfused)" in section["summary"]["ratios"]
    assert main(["speed", str(int8_cache_bundle), "--attention-kernel", "both", "--peer", "none",
                 "--out", str(tmp_path / "x")]) == 2  # "both" is long-context's alone
