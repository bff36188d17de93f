"""The llama.cpp peer reads the same weights: our GGUF holds the checkpoint's tensors under llama.cpp's names,
and (where llama-cpp-python is installed) llama.cpp's logits match our export."""

from __future__ import annotations

import numpy as np
import pytest

from lfm_edge.device_bench.peers.gguf_writer import write_gguf
from lfm_edge.export.checkpoint import Checkpoint
from lfm_edge.export.cli import demo_model_path


@pytest.fixture(scope="module")
def demo_gguf(tmp_path_factory):
    return write_gguf(Checkpoint(demo_model_path()), tmp_path_factory.mktemp("gguf") / "demo.gguf", f16=False)


def test_gguf_holds_the_checkpoint_under_llama_cpp_names(demo_gguf):
    from gguf import GGUFReader

    reader = GGUFReader(demo_gguf)
    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    assert arch == "lfm2moe"
    names = {t.name for t in reader.tensors}
    assert {"token_embd.weight", "token_embd_norm.weight", "blk.0.shortconv.in_proj.weight",
            "blk.2.attn_q.weight", "blk.2.ffn_gate_exps.weight", "blk.2.exp_probs_b.bias"} <= names
    ckpt = Checkpoint(demo_model_path())
    embd = next(t for t in reader.tensors if t.name == "token_embd.weight")
    want = ckpt.tensor("model.embed_tokens.weight")
    np.testing.assert_array_equal(np.asarray(embd.data).reshape(want.shape), want)
    gate = next(t for t in reader.tensors if t.name == "blk.2.ffn_gate_exps.weight")
    expert3 = ckpt.tensor("model.layers.2.feed_forward.experts.3.w1.weight")
    np.testing.assert_array_equal(np.asarray(gate.data)[3], expert3)


@pytest.mark.llama
def test_llama_cpp_logits_match_our_export(demo_gguf, tmp_path):
    import llama_cpp

    from lfm_edge.export.exporter import export
    from lfm_edge.runtime.backends.python import Cache, LfmSession

    bundle = export(demo_model_path(), tmp_path / "fp32").bundle
    ids = list(range(20, 68))
    ours = Cache(LfmSession(bundle), 1, len(ids)).step(np.array([ids]))[0]
    llm = llama_cpp.Llama(str(demo_gguf), n_ctx=128, logits_all=True, verbose=False, type_k=0, type_v=0)
    llm.eval(ids)
    theirs = np.array(llm.scores[: len(ids)])
    np.testing.assert_allclose(theirs, ours, atol=1e-3, rtol=0)


@pytest.mark.llama
def test_quality_report_measures_llama_cpps_own_q4_0(tmp_path):
    from lfm_edge.device_bench.quality import _fp32_reference, _llama_cpp_rows

    checkpoint = demo_model_path()
    text = (checkpoint / "heldout.txt").read_text()[:3000]
    windows, reference = _fp32_reference(checkpoint, text, 64, 512, tmp_path)
    default, pure, q2k = _llama_cpp_rows(checkpoint, windows, reference, tmp_path,
                                         [("Q4_0", False), ("Q4_0", True), ("Q2_K", False)], lambda m: None)
    assert 0 < default.kl < pure.kl < 1 and default.tokens == pure.tokens > 100
    assert pure.bundle_mb < default.bundle_mb  # the default keeps the vocabulary at more bits
    assert (default.label, pure.label, q2k.label) == ("llama.cpp Q4_0", "llama.cpp Q4_0 pure", "llama.cpp Q2_K")
    # The demo model's 128-wide rows do not fit Q2_K's 256-wide super-blocks, so llama.cpp falls back to other
    # types and the file is no smaller: why the quality model (demo_model/train.py --preset quality) exists.
    assert q2k.tokens == default.tokens and q2k.kl > 0 and q2k.bundle_mb >= default.bundle_mb * 0.95


def test_quality_report_refuses_an_unknown_llama_cpp_format(tmp_path, capsys):
    from lfm_edge.device_bench.quality import main

    assert main(["--llama-cpp", "Q4_0,Q5_X", "--out", str(tmp_path)]) == 2
    assert "'Q5_X': expected a llama.cpp format" in capsys.readouterr().err


@pytest.mark.llama
def test_alternated_ab_measures_both_on_the_same_tokens(tmp_path, demo_gguf):
    from lfm_edge.device_bench.studies.ab import alternate
    from lfm_edge.export.exporter import export

    bundle = export(demo_model_path(), tmp_path / "int4", quant="int4").bundle
    said = []
    result = alternate(bundle, demo_gguf, threads=1, prompt=16, decode=8, rounds=2, warmup_s=0.3, progress=said.append)
    assert len(result["rounds"]) == 2
    assert said[0].startswith("warm-up: ") and int(said[0].split()[1]) >= 1  # at least one turn each side
    assert all(v > 0 for row in result["rounds"] for k, v in row.items() if k != "loadavg")
    assert all("copy_gbs" in row for row in result["rounds"])  # the host's memory speed beside each round
    assert all(len(row["loadavg"]) == 3 for row in result["rounds"]) and "loadavg" not in result["median"]
    ratios = [r["ours_decode"] / r["llama_decode"] for r in result["rounds"]]
    assert result["decode_ratio_per_round"] == pytest.approx(sorted(ratios)[0] / 2 + sorted(ratios)[1] / 2)


@pytest.mark.llama
def test_cold_start_races_llama_cpps_load_of_the_same_weights(demo_gguf, tmp_path, capsys):
    """coldstart --llama adds llama.cpp's load of the GGUF to every round, in fresh processes, order swapped each
    round, and reports our load over its load."""
    import json

    from lfm_edge.device_bench import coldstart
    from lfm_edge.export.exporter import export

    bundle = export(demo_model_path(), tmp_path / "int4", quant="int4").bundle
    assert coldstart.main([str(bundle), "--rounds", "2", "--decode", "2", "--threads", "1",
                           "--llama", str(demo_gguf)]) == 0
    out = capsys.readouterr().out
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{\"mode\"")]
    assert [row["mode"] for row in lines] == ["off", "use", "llama", "llama", "use", "off"]
    summary = json.loads(out[out.index("{\n"):])
    assert summary["llama"]["load_s"] > 0 and summary["llama"]["decode_tps"] > 0
    assert summary["load_s_ratio_off_over_llama"] > 0


def test_llama_bench_peer_reads_its_prompt_and_generation_speeds(tmp_path):
    """ab.py --llama-bench: one llama-bench run per round, its JSON's prompt and generation tok/s (a stand-in
    binary that records its arguments and prints llama-bench's output shape)."""
    from lfm_edge.device_bench.studies.ab import LlamaBench

    binary = tmp_path / "llama-bench"
    binary.write_text('#!/bin/sh\necho "$@" > "$(dirname "$0")/args"\n'
                      'echo \'[{"n_prompt": 64, "n_gen": 0, "avg_ts": 210.5}, {"n_prompt": 0, "n_gen": 32, '
                      '"avg_ts": 31.25}]\'\n')
    binary.chmod(0o755)
    bench = LlamaBench(str(binary), tmp_path / "m.gguf", threads=2)
    assert bench(list(range(64)), list(range(32))) == (210.5, 31.25)
    args = (tmp_path / "args").read_text().split()
    assert args[args.index("-p") + 1] == "64" and args[args.index("-n") + 1] == "32"
    assert args[args.index("-t") + 1] == "2" and "--no-warmup" not in args  # its warm-up pages the model in
