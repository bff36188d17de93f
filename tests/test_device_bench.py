"""lfm-bench: the workload runs, the JSON keeps its schema, the roofline adds up, adb is built right."""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from shared_bundles import demo_bundle

from lfm_edge.device_bench import roofline, speed
from lfm_edge.device_bench.cli import main
from lfm_edge.device_bench.peers.llama_cpp import llama_decode_in_subprocess
from lfm_edge.device_bench.speed import adb_commands, ratios
from lfm_edge.export.cli import demo_model_path
from lfm_edge.runtime.bundle import TokenBytes
from without_module import run_without


@pytest.fixture(scope="module")
def demo_int4(tmp_path_factory):
    return demo_bundle(tmp_path_factory.getbasetemp(), "int4")


@pytest.mark.slow
def test_bench_writes_json_markdown_and_plot(demo_int4, tmp_path):
    out = tmp_path / "out"
    code = main([str(demo_int4), "--runs", "2", "--prompts", "16,32", "--depths", "0,24", "--decode", "8",
                 "--threads", "1", "--bandwidth", "30", "--out", str(out)])
    assert code == 0
    result = json.loads((out / "bench.json").read_text())
    assert result["schema"] == "lfm-bench/1"
    assert {"cpu_model", "cores", "threads", "onnxruntime"} <= set(result["device"])
    assert result["bundle"]["manifest"]["quant"] == "int4"
    assert {"load", "ttft", "prefill/16", "prefill/32", "decode/8@0", "decode/8@24", "peak_rss", "rss_decoding"} <= set(
        result["results"])
    decode = result["results"]["decode/8@0"]
    assert decode["runs"] == 2 and decode["min"] <= decode["median"] <= decode["max"] and decode["min"] > 0
    assert all("cpu_wait_share" in s and "loadavg" in s for s in decode["samples"])
    assert result["roofline"]["read_bandwidth_gbs"] == 30
    assert result["peers"]["onnxruntime-genai"]["decode_tps"] > 0
    genai_ratio = result["ratios"]["onnxruntime-genai"]["decode"]
    assert genai_ratio == pytest.approx(decode["median"] / result["peers"]["onnxruntime-genai"]["decode_tps"])
    assert result["memory"]["peak_rss_over_weights"] == pytest.approx(  # RSS in MiB, weights in bytes
        result["results"]["peak_rss"]["median"] * (1 << 20) / result["bundle"]["weights_bytes"])
    assert 0 < result["memory"]["rss_decoding_mb"] <= result["memory"]["peak_rss_mb"] + 1
    # resident memory split: the int4 demo's repacked weights are anonymous, its mapped bundle file-backed;
    # the parts add up to what the process holds
    mem = result["memory"]
    for when in ("after_load", "decoding"):
        assert mem[f"anon_{when}_mb"] > 0 and mem[f"file_{when}_mb"] > 0
        assert mem[f"anon_{when}_mb"] + mem[f"file_{when}_mb"] <= mem["peak_rss_mb"] + 1
    assert mem["anon_decoding_over_weights"] == pytest.approx(mem["anon_decoding_mb"] * (1 << 20)
                                                              / result["bundle"]["weights_bytes"])
    assert "While decoding: anonymous" in (out / "bench.md").read_text()
    assert (out / "bench.png").read_bytes()[:4] == b"\x89PNG"
    assert "Roofline:" in (out / "bench.md").read_text()
    # the phone table is about LFM2.5-8B-A1B int4, at the full model's recorded efficiency (the demo is tiny)
    roof = result["roofline"]
    pred = roof["phone_prediction"]
    assert pred["model"] == "LFM2.5-8B-A1B int4" and not pred["efficiency_measured_here"]
    assert pred["efficiency"] == roofline.FULL_MODEL_EFFICIENCY.fraction != roof["fraction_reached"]
    assert pred["bytes_per_token"] == roofline.REFERENCE_BYTES_PER_TOKEN
    assert pred["measured_bytes_per_token"] == result["bundle"]["bytes_per_token"]
    for p in roof["phones"]:
        assert p["predicted_tps"] == pytest.approx(p["bandwidth_gbs"] * 1e9 * pred["efficiency"]
                                                   / pred["bytes_per_token"], abs=0.05)
    # bench.md leads with what was measured; the phone table follows as a prediction, with its basis
    md = (out / "bench.md").read_text()
    best = max(result["results"]["decode/8@0"]["median"], result["results"]["decode/8@24"]["median"])
    headline = f"**Measured here: demo_model int4 decodes {best:.1f} tok/s** (8 tokens after "
    assert md.count("**") == 2 and md.index(headline) < md.index("| metric |")
    prediction = md.index("## Predicted, not measured: LFM2.5-8B-A1B int4 on phones\n\n45-74 tok/s predicted; ")
    assert md.index("Roofline:") < md.index("Peer onnxruntime-genai") < prediction
    assert md.index("the full model's measured efficiency", prediction) < md.index("| phone SoC |")
    assert f"predicted tok/s (at {pred['efficiency']:.0%})" in md
    assert result["bundle"]["label"] == "demo_model int4"


@pytest.mark.slow
def test_peak_memory_leaves_out_the_bandwidth_probe(demo_int4, tmp_path, monkeypatch):
    """The bandwidth probe reads a buffer far larger than the demo model (1 GiB by default: lfm-bench reported
    1093 MB of peak RSS on the demo, 92 MB with --bandwidth given); each run's peaks are its own."""
    from lfm_edge.runtime.memory import peak_rss_mb

    real, at_probe = roofline.read_bandwidth, []

    def probe(gib: float = 1.0, repeats: int = 5) -> float:  # a 512 MiB probe: quicker, as far above the demo
        gbs = real(0.5, 1)
        at_probe.append(peak_rss_mb())
        return gbs

    monkeypatch.setattr(roofline, "read_bandwidth", probe)
    out = tmp_path / "out"
    assert main([str(demo_int4), "--runs", "2", "--prompts", "16", "--depths", "0", "--decode", "8", "--threads", "1",
                 "--peer", "none", "--out", str(out)]) == 0
    result = json.loads((out / "bench.json").read_text())
    mem, peaks = result["memory"], result["results"]["peak_rss"]
    assert len(at_probe) == 1 and mem["peak_from"] == "each run"
    assert peaks["runs"] == 2 and peaks["max"] < at_probe[0] - 400  # the probe's 512 MiB counted in no run
    # the peak's parts, sampled: each at least what the run held after its load, neither holding the probe
    assert mem["anon_after_load_mb"] <= mem["peak_anon_mb"] + 1 and mem["file_after_load_mb"] <= mem["peak_file_mb"] + 1
    assert mem["peak_anon_mb"] < at_probe[0] - 400 and mem["peak_file_mb"] > 0
    assert f"Peak RSS {mem['peak_rss_mb']:.0f} MB" in (md := (out / "bench.md").read_text())
    assert "(each run's own, load included; anonymous " in md


@pytest.mark.slow
def test_bench_with_the_prepack_cache_reports_its_disk_and_memory(demo_int4, tmp_path, capsys):
    bundle = shutil.copytree(demo_int4, tmp_path / "bundle")
    out = tmp_path / "out"
    assert main([str(bundle), "--runs", "1", "--prompts", "16", "--depths", "0", "--decode", "8", "--threads", "1",
                 "--bandwidth", "30", "--peer", "none", "--prepack-cache", "auto", "--out", str(out)]) == 0
    result = json.loads((out / "bench.json").read_text())
    err = capsys.readouterr().err
    assert "prepack cache written and mapped" in err and "weights mapped from the prepack cache" in err
    assert result["settings"]["prepack_cache"] == "auto" and (bundle / "prepacked" / "cache.json").is_file()
    assert 1.5 < result["memory"]["prepack_cache_over_weights"] < 3
    assert result["memory"]["file_decoding_mb"] > 0 and result["memory"]["anon_decoding_mb"] > 0


class CountingSession:
    """Wraps a real session; counts single-token steps and runs `on_decode(count)` after each."""

    def __init__(self, session, on_decode=lambda n: None):
        self.session, self.on_decode, self.decode_steps = session, on_decode, 0

    def __getattr__(self, name):
        return getattr(self.session, name)

    def new_cache(self, *args, **kwargs):
        cache, outer = self.session.new_cache(*args, **kwargs), self

        class Cache:
            def step(self, ids, *rest, **kwargs):
                out = cache.step(ids, *rest, **kwargs)
                if ids.shape[1] == 1:
                    outer.decode_steps += 1
                    outer.on_decode(outer.decode_steps)
                return out

        return Cache()


def test_bench_uses_the_given_open_session_and_cancel_stops_within_one_decode_step(demo_int4):
    """The app passes its backend's open_session; Cancel pressed mid-decode (here: after the 3rd step) stops
    the run before the next step, with `Cancelled`."""
    from lfm_edge.runtime.backends.python import LfmSession

    cancel, opened, sessions = threading.Event(), [], []

    def open_session(bundle, threads):
        opened.append((bundle, threads))
        sessions.append(CountingSession(LfmSession(bundle, threads=threads),
                                        on_decode=lambda n: n == 3 and cancel.set()))
        return sessions[-1]

    with pytest.raises(speed.Cancelled):
        speed.run(demo_int4, 1, [16], [0], [64], 1, open_session=open_session, cancel=cancel)
    assert opened == [(demo_int4, 1)] and sessions[0].decode_steps == 3


def test_bench_cancel_set_by_the_progress_callback_stops_before_the_next_step(demo_int4):
    from lfm_edge.runtime.backends.python import LfmSession

    cancel, messages, sessions = threading.Event(), [], []

    def progress(message):
        messages.append(message)
        if "decode" in message:
            cancel.set()

    def open_session(bundle, threads):
        sessions.append(CountingSession(LfmSession(bundle, threads=threads)))
        return sessions[-1]

    with pytest.raises(speed.Cancelled, match="cancelled"):
        speed.run(demo_int4, 1, [16], [0], [64], 1, progress=progress, open_session=open_session, cancel=cancel)
    assert messages == ["warm-up: load", "warm-up: prefill 16", "warm-up: decode 64 at depth 0"]
    assert sessions[0].decode_steps == 0


def test_speed_plot_keeps_a_single_depth_and_the_target_visible():
    from lfm_edge.device_bench.report import depth_span, spread_out

    low, high = depth_span(0)  # one depth: a span a reader can see, not +-0.04 tokens, and little below 0
    assert high >= 256 and -0.1 * high <= low < 0
    low, high = depth_span(4096)
    assert low < 4096 < high and high - low >= 512
    assert spread_out([4726, 30, 573, 410])  # a cache-resident roofline: log scale, so 30 tok/s stays in sight
    assert not spread_out([38.8, 30, 27.6, 32.7])


def test_the_ab_memory_probe_times_copies_not_page_faults():
    """ab.py's per-round memory speed: its buffers are allocated and touched once, so every call times copies
    between resident pages (a first touch would time this VM's page faults, ~10x slower)."""
    from lfm_edge.device_bench.studies.ab import CopyBandwidth

    probe = CopyBandwidth(threads=2, mb=16, tries=2)
    buffers = [a.ctypes.data for a in probe.src + probe.dst]
    speeds = [probe() for _ in range(3)]
    assert [a.ctypes.data for a in probe.src + probe.dst] == buffers
    assert all(0.5 < s < 1000 for s in speeds)  # GB/s
    assert all((d == 1).all() for d in probe.dst)


def test_ratios_compare_like_for_like():
    def m(v):
        return {"median": v}

    summary = {"decode/128@0": m(30.0), "decode/128@512": m(20.0), "decode/256@0": m(35.0), "prefill/512": m(300.0),
               "prefill/128": m(200.0), "load": m(2.0), "peak_rss": m(5000.0)}
    peer = {"decode_tps": 25.0, "decode_tokens": 128, "prompt_tps": {"512": 100.0, "2048": 50.0}, "load_s": 4.0,
            "peak_rss_mb": 10000.0}
    assert ratios(summary, peer) == {"decode": 1.2, "prefill/512": 3.0, "load": 0.5, "peak_rss": 0.5}


def test_llama_peer_failure_names_the_file(tmp_path):
    missing = tmp_path / "none.gguf"
    with pytest.raises(RuntimeError, match="none.gguf"):
        llama_decode_in_subprocess(missing, 1, [8], 4, 1)


def test_bytes_per_token_counts_routed_experts_at_top_k(demo_int4):
    tb = roofline.bytes_per_token(demo_int4)
    config = json.loads((demo_int4 / "config.json").read_text())
    share = config["num_experts_per_tok"] / config["num_experts"]
    import onnx

    from lfm_edge.export.footprint import stored_bytes

    model = onnx.load(demo_int4 / "model.onnx", load_external_data=False)
    expert_bytes = sum(stored_bytes(i) for i in model.graph.initializer if ".experts." in i.name)
    assert tb.by_kind["experts (routed)"] == pytest.approx(expert_bytes * share)
    assert tb.total < tb.stored
    phones = roofline.phone_predictions(tb.total, 0.5)
    assert all(p["predicted_tps"] == pytest.approx(p["ceiling_tps"] * 0.5, rel=0.01) for p in phones)


def test_phone_predictions_are_for_the_full_model(demo_int4, tmp_path):
    """Whatever bundle was measured, phones are predicted for LFM2.5-8B-A1B int4: its bytes per token x an
    efficiency measured on a memory-bound model x each phone's bandwidth."""
    full = roofline.FULL_MODEL_EFFICIENCY.fraction
    ref = roofline.REFERENCE_BYTES_PER_TOKEN

    def predicted(p: roofline.PhonePrediction, bytes_per_token: float, efficiency: float) -> None:
        assert p.model == "LFM2.5-8B-A1B int4" and p.bytes_per_token == bytes_per_token and p.efficiency == efficiency
        assert [r["soc"] for r in p.phones] == list(roofline.PHONE_SOCS)
        for r in p.phones:
            tps = roofline.PHONE_SOCS[r["soc"]] * 1e9 * efficiency / bytes_per_token
            assert r["predicted_tps"] == round(tps, 1) and r["meets_target"] == (tps >= 30)

    # the demo (under 2 MB per token, in the caches): its 3% says nothing; the full model's recorded 77% is used
    small = roofline.bytes_per_token(demo_int4)
    p = roofline.phone_prediction(demo_int4, small, 0.03, cache_bytes=32 << 20)
    predicted(p, ref, full)
    assert not p.efficiency_measured_here and p.bytes_from == "its int4 bundle's manifest (recorded)"
    assert p.verdict() == "LFM2.5-8B-A1B int4 on phones: 45-74 tok/s predicted; reaches 30 tok/s on all 8"
    assert "the full model's measured efficiency (31.1 tok/s at 35.6 GB/s" in p.basis() and "1.6 MB" in p.basis()
    # no bytes per token for the measured bundle (a phone without onnx, a genai bundle): still the full model's
    p = roofline.phone_prediction(None, None, 0.5)
    predicted(p, ref, full)
    assert "; this bundle's bytes per token are unknown. That efficiency was measured on random weights" in p.basis()
    # a memory-bound bundle that is not the model (6 layers of its width): its own efficiency, the model's bytes
    six_layers = TokenBytes(358e6, {}, int(1.04e9))
    p = roofline.phone_prediction(demo_int4, six_layers, 0.6, cache_bytes=32 << 20)
    predicted(p, ref, 0.6)
    assert p.efficiency_measured_here and "measured here on this bundle (358 MB per token" in p.basis()
    # ... unless this CPU's cache is so large that 358 MB is under 8x it
    predicted(roofline.phone_prediction(demo_int4, six_layers, 0.6, cache_bytes=64 << 20), ref, full)
    # the model itself: its manifest's bytes per token and its own efficiency
    bundle = tmp_path / "lfm25-int4"
    bundle.mkdir()
    (bundle / "manifest.json").write_text(json.dumps({"model_type": "lfm2_moe", "quant": "int4"}))
    itself = TokenBytes(878_804_076.0, {}, 4_639_796_268)  # an exported bundle's manifest (+50 kB of graph)
    p = roofline.phone_prediction(bundle, itself, 0.7)
    predicted(p, itself.total, 0.7)
    assert p.bytes_from == "this bundle's manifest" and roofline.is_reference_bundle(bundle, itself)
    # another policy or geometry is not the model
    (bundle / "manifest.json").write_text(json.dumps({"model_type": "lfm2_moe", "quant": "int4-hq"}))
    assert not roofline.is_reference_bundle(bundle, itself)
    assert not roofline.is_reference_bundle(demo_int4, small)
    # below every phone's target: the verdict says so
    slow = roofline.phone_prediction(None, None, 0.0)
    slow.phones = roofline.phone_predictions(ref, 0.2)
    assert slow.verdict().endswith("tok/s predicted; below the 30 tok/s target on all 8")


def test_a_share_above_the_ceiling_is_capped_and_random_weights_are_named(tmp_path):
    """The app measured the full geometry's random-weights bundle at 38.6 tok/s x 879 MB per token against less
    bandwidth than that (113%): no phone reads faster than its bandwidth, so the efficiency is capped at 1, and
    the basis says that it comes from random weights and that the bandwidth measured was low (a token reads the
    geometry's bytes: studies/expert_reads.py counted them from the router)."""
    bundle = tmp_path / "lfm25-int4"
    bundle.mkdir()
    manifest = {"model_type": "lfm2_moe", "quant": "int4", "source": {"random_weights": "lfm2.5-8b-a1b"}}
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    itself = TokenBytes(878_804_076.0, {}, 4_639_796_268)
    above = 38.6 * itself.total / 30e9
    p = roofline.phone_prediction(bundle, itself, above)
    assert p.efficiency == 1.0 and p.capped_from == above and p.random_weights
    for r in p.phones:  # each phone at its peak bandwidth, no faster
        assert r["predicted_tps"] == round(r["bandwidth_gbs"] * 1e9 / itself.total, 1)
    assert f"Capped at 100%: decode here reached {above:.0%} of the ceiling" in p.basis()
    assert "the bandwidth measured here is low" in p.basis()
    assert "measured on random weights" in p.basis()
    assert "more than the measured bandwidth allows" in roofline.share_of_ceiling(above)
    assert roofline.share_of_ceiling(0.77) == "77% of it"
    # a trained bundle below the ceiling: its share as measured, neither caveat
    (bundle / "manifest.json").write_text(json.dumps(manifest | {"source": {"hub_id": "LiquidAI/LFM2-8B-A1B"}}))
    p = roofline.phone_prediction(bundle, itself, 0.7)
    assert p.efficiency == 0.7 and not p.capped_from and not p.random_weights
    assert "Capped" not in p.basis() and "random weights" not in p.basis()
    # the recorded efficiency small bundles borrow was itself measured on random weights: it says so
    p = roofline.phone_prediction(None, None, 0.0)
    assert roofline.FULL_MODEL_EFFICIENCY.random_weights and p.random_weights and "random weights" in p.basis()


def test_memory_bound_threshold_follows_the_cache():
    assert roofline.memory_bound_bytes(32 << 20) == 8 * (32 << 20)  # this machine's L3: 268 MB
    assert roofline.memory_bound_bytes(8 << 20) == roofline.MEMORY_BOUND_MIN_BYTES  # a phone's: the 256 MB floor
    cache = roofline.last_level_cache_bytes()
    assert cache is None or cache >= 1 << 15
    assert roofline.memory_bound_bytes() == roofline.memory_bound_bytes(cache or roofline.ASSUMED_CACHE_BYTES)


def test_the_full_models_bytes_per_token_and_recorded_efficiency():
    """The reference bytes per token are the full model's int4 bundle's manifest figure, the bundle the recorded
    efficiency was measured on (device_bench/RESULTS.md); the phone policy is the one exports for phones use."""
    from lfm_edge.export.options import TARGET_QUANT

    assert TARGET_QUANT["android"] == TARGET_QUANT["ios"] == roofline.REFERENCE_POLICY
    eff = roofline.FULL_MODEL_EFFICIENCY
    assert roofline.reference_bytes_per_token()[0] == roofline.REFERENCE_BYTES_PER_TOKEN == eff.bytes_per_token
    root = Path(__file__).resolve().parent.parent
    results = root / "device_bench" / "results"
    ab = json.loads((results / "2026-11-30-ab-int4-block256-vs-llama-q4_0-10rounds.json").read_text())
    run = json.loads((results / "2026-11-22-lfm25-8b-a1b-int4-b128.json").read_text())  # the machine's bandwidth
    assert eff.decode_tps == round(ab["median"]["ours_decode"], 2) and len(ab["rounds"]) == 10
    assert eff.read_bandwidth_gbs == run["roofline"]["read_bandwidth_gbs"]
    assert eff.fraction == pytest.approx(0.767, abs=0.001)


def test_bytes_per_token_are_computed_once_at_export_and_read_back(demo_int4, tmp_path):
    """lfm-export records the roofline's input in manifest.json (export/footprint.py); everyone reads it from
    there (runtime/bundle.py token_bytes), and a bundle without the entry (onnxruntime-genai's builder) is
    measured by the same function."""
    from lfm_edge.export.footprint import bytes_per_token
    from lfm_edge.runtime.bundle import token_bytes

    manifest = json.loads((demo_int4 / "manifest.json").read_text())
    computed = bytes_per_token(demo_int4, manifest["quant_policy"]["rescore"]["top"])
    assert token_bytes(demo_int4) == computed == roofline.bytes_per_token(demo_int4)
    bare = tmp_path / "bare"
    shutil.copytree(demo_int4, bare)
    del manifest["bytes_per_token"]
    (bare / "manifest.json").write_text(json.dumps(manifest))
    assert token_bytes(bare) is None
    assert roofline.bytes_per_token(bare).stored == computed.stored  # without the manifest's rescore rows
    for broken in ({"total": "x", "by_kind": {}, "stored": 1}, [1, 2], {"total": 1.0}):
        manifest["bytes_per_token"] = broken
        (bare / "manifest.json").write_text(json.dumps(manifest))
        assert token_bytes(bare) is None


def test_bytes_per_token_needs_no_onnx_for_an_exported_bundle(demo_int4):
    code = (
        "import json, dataclasses, sys\n"
        "from lfm_edge.device_bench import roofline\n"
        f"tokens = roofline.bytes_per_token({str(demo_int4)!r})\n"
        "assert 'onnx' not in sys.modules\n"
        "print(json.dumps(dataclasses.asdict(tokens)))\n")
    out = run_without("onnx", code)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout)["total"] == roofline.bytes_per_token(demo_int4).total


def test_adb_commands_push_run_and_pull(tmp_path):
    bundle = tmp_path / "demo-int4"
    steps = adb_commands("R5CT", bundle, tmp_path / "out", [str(bundle), "--adb", "R5CT", "--runs", "5",
                                                            "--out", "x"])
    assert steps[1] == ["adb", "-s", "R5CT", "push", str(bundle), "/data/local/tmp/lfm-edge"]
    assert steps[2][-1] == ("python -m lfm_edge.device_bench.cli speed /data/local/tmp/lfm-edge/demo-int4 "
                            "--out /data/local/tmp/lfm-edge/out --runs 5")
    assert steps[3][-2:] == ["/data/local/tmp/lfm-edge/out/bench.json", str(tmp_path / "out" / "bench.json")]


@pytest.mark.slow
def test_adb_without_a_phone_fails_clearly(tmp_path):
    """No phone is reachable here: the command must say so, not hang or crash."""
    result = subprocess.run([sys.executable, "-m", "lfm_edge.device_bench.cli", str(tmp_path), "--adb", "R5CT"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "needs the Android platform tools (adb)" in result.stderr or "no such device attached" in result.stderr


def _conversation_checks(c: dict, turns: int, answer: int) -> None:
    """What must hold of any lfm-bench conversation result, whatever the timings."""
    assert [row["turn"] for row in c["turns"]] == list(range(1, turns + 1))
    for row in c["turns"]:
        for system in ("kept", "reprefilled"):
            m = row[system]
            assert m["runs"] == c["rounds"] and m["min"] <= m["median"] <= m["max"] and m["min"] > 0
            assert all("cpu_wait_share" in s and "loadavg" in s for s in m["samples"])
            assert all(len(d["loadavg"]) == 3 for d in m["detail"])
        for kept, fresh in zip(row["kept"]["detail"], row["reprefilled"]["detail"], strict=True):
            assert kept["as_scripted"] and kept["generated"] == answer  # forced answers, never cut short by EOS
            assert kept["prompt"] == fresh["prompt"] == row["prompt_tokens"]  # the same conversation, rendered alike
            assert fresh["reused"] == 0 and fresh["prefilled"] == fresh["prompt"]
            if row["turn"] == 1:
                assert kept["reused"] == 0
            else:
                assert 0 < kept["reused"] and kept["prefilled"] < fresh["prefilled"]
    prompts = [row["prompt_tokens"] for row in c["turns"]]
    assert prompts == sorted(prompts) and len(set(prompts)) == turns
    mem = c["memory"]
    assert 0 < mem["snapshots_bytes"] <= mem["snapshot_bytes_limit"]
    assert mem["snapshots_and_prefix_budget_over_weights"] == pytest.approx(
        (mem["snapshots_bytes"] + mem["prefix_cache_budget_bytes"]) / mem["weights_bytes"])


@pytest.mark.slow
def test_conversation_bench_keeps_state_and_restores(demo_int4, tmp_path):
    """lfm-bench conversation on the demo bundle (its own tokenizer and template): kept-state turns prefill only what is
    new, a re-prefilled turn all of it; a saved conversation restores with its whole state reused."""
    out = tmp_path / "conv"
    code = main(["conversation", str(demo_int4), "--script", "3:24:8", "--runs", "2", "--threads", "1",
                 "--restore-tokens", "150", "--restore-follow", "6", "--out", str(out)])
    assert code == 0
    result = json.loads((out / "bench.json").read_text())
    assert result["schema"] == "lfm-bench/1" and "results" not in result
    c = result["conversation"]
    assert c["spec"] == {"turns": 3, "user": 24, "answer": 8, "reasoning": 0} and c["tokenizer"] == "the bundle's"
    _conversation_checks(c, 3, 8)
    for row in c["turns"][1:]:  # no reasoning to drop: everything before the new user message is reused
        assert all(d["reused"] >= prev["prompt_tokens"] for d in row["kept"]["detail"]
                   for prev in c["turns"][:row["turn"] - 1])
    r = c["restore"]
    assert r["state_tokens"] >= 150 and r["file_bytes"] > 0 and r["runs"] == 2
    assert all(d["reused"] == r["state_tokens"] and d["prefilled"] > 0 for d in r["restored_detail"])
    assert {"load", "restored_ttft", "restored_total", "reprefilled_ttft"} <= set(r["metrics"])
    assert r["speedup"] == pytest.approx(r["metrics"]["reprefilled_ttft"]["median"] /
                                         r["metrics"]["restored_total"]["median"])
    assert c["summary"]["last_over_first_kept"] == pytest.approx(
        c["turns"][-1]["kept"]["median"] / c["turns"][0]["kept"]["median"])
    assert (out / "bench.png").read_bytes()[:4] == b"\x89PNG"
    assert "| 3 |" in (out / "bench.md").read_text()


def test_conversation_bench_without_a_tokenizer_drops_past_reasoning(demo_int4, tmp_path):
    """A bundle with no tokenizer (as random-weight exports are) gets a word-level one and LFM2.5-8B-A1B's
    template; with <think> blocks in the answers, the end of each answer already re-prefilled it without its
    reasoning (the conversation prepares its next turn), so each turn prefills only its new message."""
    from lfm_edge.device_bench import conversation as convbench

    bare = tmp_path / "bare"
    shutil.copytree(demo_int4, bare)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (bare / name).unlink()
    c = convbench.run(bare, "3:20:10", threads=1, rounds=1, reasoning=4)
    assert c["tokenizer"].startswith("synthetic") and c["template"].startswith("lfm2.5-8b-a1b")
    _conversation_checks(c, 3, 10)
    for prev, row in zip(c["turns"], c["turns"][1:], strict=False):
        (kept,) = row["kept"]["detail"]
        assert kept["reused"] > prev["prompt_tokens"]  # past the answer's start: prepared without its <think>
        assert kept["prefilled"] <= row["user_tokens"] + 8  # the message and the template's headers
    with pytest.raises(ValueError, match="TURNS:USER:ANSWER"):
        convbench.parse_spec("10:400")


@pytest.mark.llama
def test_conversation_bench_llama_cpp_peer_reuses_its_prefix(demo_int4, tmp_path):
    """llama.cpp on the same token script: it reuses its prefix where the history only grows; where LFM2.5's
    template drops past reasoning, it re-evaluates everything by default (a hybrid model's recurrent state
    cannot be cut back) and rolls back with --llama-rollback."""
    from lfm_edge.device_bench import conversation as convbench
    from lfm_edge.device_bench.peers.gguf_writer import write_gguf
    from lfm_edge.export.checkpoint import Checkpoint

    gguf = write_gguf(Checkpoint(demo_model_path()), tmp_path / "demo.gguf", f16=False)
    grows = convbench.run(demo_int4, "3:20:8", threads=1, rounds=1, gguf=str(gguf))
    bare = tmp_path / "bare"
    shutil.copytree(demo_int4, bare)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (bare / name).unlink()
    dropped = convbench.run(bare, "3:20:8", threads=1, rounds=1, reasoning=4, gguf=str(gguf))
    rolled = convbench.run(bare, "3:20:8", threads=1, rounds=1, reasoning=4, gguf=str(gguf), llama_rollback=16)
    assert rolled["peer"]["n_rs_seq"] == 16 and dropped["peer"]["n_rs_seq"] == 0
    for c in (grows, dropped, rolled):
        ahead = set()
        for row in c["turns"]:
            (llama,) = row["llama.cpp"]["detail"]
            (kept,) = row["kept"]["detail"]
            assert llama["as_scripted"] and llama["prompt"] == row["prompt_tokens"]
            if row["turn"] == 1:
                assert llama["prefilled"] == llama["prompt"]
            elif c is dropped:
                assert llama["prefilled"] == llama["prompt"]  # everything again
            else:
                # what is new since the common prefix, as ours; ours prefilled the opening of the next user
                # turn (Conversation's preparation) before this turn's call, the same few tokens every turn
                ahead.add(llama["prefilled"] - kept["prefilled"])
        assert len(ahead) <= 1 and all(0 < n < 16 for n in ahead)


def test_step_profile_counts_nodes_and_splits_a_step_into_weight_kernels_and_overhead(demo_int4):
    from lfm_edge.device_bench.studies.step_profile import WEIGHT_OPS, format_table, profile_decode

    result = profile_decode(demo_int4, steps=6, prompt=8, threads=1, rounds=3)
    ops = result["ops"]
    assert ops["QMoE"]["nodes"] == 4 and ops["MatMulNBits"]["nodes"] > 0  # the demo's four MoE layers
    assert result["nodes_per_step"] == sum(t["nodes"] for t in ops.values())
    assert result["steps"] == 3 * 6 - 1  # every decode step but the first profiled
    assert all(ops[op]["us"] > 0 for op in WEIGHT_OPS if op in ops)
    # each step's overhead is its time less its weight kernels' (so within the step); medians of timings on a
    # shared machine agree with nothing tighter
    assert 0 <= result["overhead_us"] <= result["step_us"] and 0 <= result["overhead_share_of_step"] <= 1
    assert len(result["rounds"]) == 3
    for turn in result["rounds"]:
        assert 0 < turn["weights_us"] < turn["step_unprofiled_us"] * 5
        assert turn["overhead_unprofiled_us"] == pytest.approx(turn["step_unprofiled_us"] - turn["weights_us"])
    assert result["overhead_unprofiled_share"] == pytest.approx(statistics.median(
        t["overhead_unprofiled_us"] / t["step_unprofiled_us"] for t in result["rounds"]))
    assert "unprofiled: step" in format_table(result)


@pytest.mark.slow
def test_overhead_ablation_runs_the_bundles_weight_kernels_alone_on_its_weights(demo_int4, tmp_path):
    """The weights-only graph holds exactly the bundle's QMoE and MatMulNBits nodes, reading the bundle's own
    initializers (linked, not rewritten), and runs on random activations to the shapes the kernels give; the
    ablation measure pairs each decode step with a run of it."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    from lfm_edge.device_bench.studies.overhead import _feeds, weight_nodes, weights_only_graph

    path = weights_only_graph(demo_int4, tmp_path / "alone")
    full = onnx.load(demo_int4 / "model.onnx", load_external_data=False).graph
    alone = onnx.load(path, load_external_data=False).graph
    kept = [n for n in full.node if n.op_type in ("QMoE", "MatMulNBits")]

    def weights(node):  # the inputs that are initializers: all but the activation and QMoE's router inputs
        return node.op_type, node.name, list(node.input[2:14] if node.op_type == "QMoE" else node.input[1:])

    assert [weights(n) for n in kept] == [weights(n) for n in alone.node]
    assert weight_nodes(demo_int4) == {"QMoE": 4, "MatMulNBits": len(kept) - 4}
    assert (tmp_path / "alone" / "model.onnx.data").stat().st_ino == (demo_int4 / "model.onnx.data").stat().st_ino
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    outputs = dict(zip([o.name for o in session.get_outputs()],
                       session.run(None, _feeds(session, 1, np.random.default_rng(0))), strict=True))
    for node in alone.node:
        y = outputs[node.output[0]]
        k = {v.name: v.type.tensor_type.shape.dim[-1].dim_value for v in alone.input}[node.input[0]]
        width = next(a.i for a in node.attribute if a.name == "N") if node.op_type == "MatMulNBits" else k
        assert y.shape == (1, 1, width) and np.isfinite(y).all() and np.abs(y).max() > 0

    from lfm_edge.device_bench.studies.overhead import main

    assert main([str(demo_int4), "--rounds", "2", "--steps", "5", "--prompt", "8", "--threads", "1",
                 "--json", str(tmp_path / "o.json")]) == 0
    result = json.loads((tmp_path / "o.json").read_text())
    assert len(result["rounds"]) == 2 and result["weight_nodes"] == weight_nodes(demo_int4)
    for row in result["rounds"]:
        assert 0 < row["weights_ms"] and 0 < row["step_ms"]
        assert row["share"] < 1
    assert (tmp_path / "o.png").read_bytes()[:4] == b"\x89PNG"


def test_load_memory_study_tables_each_stage_against_the_weights(demo_int4, tmp_path, capsys):
    from lfm_edge.device_bench.studies.load_memory import main

    assert main([str(demo_int4), "--prefill", "16", "--threads", "1", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "load_memory.json").read_text())
    stages = {s["stage"]: s for s in result["stages"]}
    assert list(stages)[:3] == ["before import", "onnxruntime imported", "after load"]
    weights = result["weights_mib"]
    assert 0 < weights < 10 and stages["after load"]["peaks"]["anonymous"] >= stages["after load"]["anonymous"] > 0
    assert "| after load |" in capsys.readouterr().out and (tmp_path / "load_memory.md").exists()


def test_load_memory_study_prefills_in_the_runtimes_chunks(demo_int4, tmp_path):
    """A long prompt goes through runtime.Generation's chunks (one 32K-wide step would need tens of GB), and the
    prefill's peak RSS is reported against the weights."""
    from lfm_edge.device_bench.studies.load_memory import main

    assert main([str(demo_int4), "--prefill", "40", "--prefill-chunk", "16", "--threads", "1",
                 "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "load_memory.json").read_text())
    assert result["prefill"] | {"seconds": 0} == {"tokens": 40, "chunk": 16, "chunks": 3, "seconds": 0}
    prefill = next(s for s in result["stages"] if s["stage"] == "after a 40-token prefill")
    assert prefill["peaks"]["rss"] > 0 and "peak RSS during it" in (tmp_path / "load_memory.md").read_text()


@pytest.mark.slow  # an export in a child process
def test_export_memory_study_reads_each_exports_own_peak_and_samples_its_rss(tmp_path, capsys):
    from lfm_edge.device_bench.studies.export_memory import main

    keep = tmp_path / "bundle"
    assert main(["--run", "--quant fp32", "--out", str(tmp_path), "--name", "m", "--keep", str(keep)]) == 0
    run = json.loads((tmp_path / "m.json").read_text())["runs"][0]
    assert run["args"] == "--quant fp32" and (keep / "manifest.json").is_file()
    # lfm-export's own line (VmHWM, printed to 0.01 GiB) is at least every sample of its RSS
    assert run["peak_gib_printed"] * 1024 + 5.2 >= run["peak_own_mib_sampled"] > 0 and run["series"]
    assert "| `--quant fp32` |" in capsys.readouterr().out
    assert (tmp_path / "m.png").read_bytes()[:4] == b"\x89PNG"
