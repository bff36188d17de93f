"""The speed/quality frontier (device_bench/frontier.py): which of our policies answers each llama.cpp format,
the Q4_0 goal, bad input, and (with the [llama] extra) a real run on the demo model."""

import json

import pytest

from lfm_edge.device_bench.frontier import main, summarize
from lfm_edge.export.cli import demo_model_path


def _pair(ours: float, theirs: float, ratio: float) -> dict:
    return {"median": {"ours_decode": ours, "llama_decode": theirs, "ours_prefill": 80.0, "llama_prefill": 50.0},
            "decode_ratio_per_round": ratio, "prefill_ratio_per_round": 1.6, "rounds": [{}] * 4, "prompt": 512}


QUALITY = [
    {"label": "int4", "policy": "int4", "kl": 0.040, "top1": 0.88, "ppl": 20.1},
    {"label": "int2-experts", "policy": "int2-experts", "kl": 0.120, "top1": 0.80, "ppl": 22.0},
    {"label": "llama.cpp Q4_0", "policy": "llama.cpp", "kl": 0.045, "top1": 0.87, "ppl": 20.2},
    {"label": "llama.cpp Q4_K_M", "policy": "llama.cpp", "kl": 0.030, "top1": 0.90, "ppl": 20.0},
    {"label": "llama.cpp Q2_K", "policy": "llama.cpp", "kl": 0.200, "top1": 0.75, "ppl": 25.0},
]


def test_each_llama_format_is_answered_by_the_fastest_policy_as_good_in_kl():
    pairs = {("int4", "Q4_0"): _pair(33, 29, 1.13), ("int4", "Q4_K_M"): _pair(33, 27, 1.22),
             ("int4", "Q2_K"): _pair(32, 30, 1.08), ("int2-experts", "Q4_0"): _pair(36, 29, 1.24),
             ("int2-experts", "Q4_K_M"): _pair(36, 27, 1.33), ("int2-experts", "Q2_K"): _pair(36, 30, 1.20)}
    result = summarize(pairs, QUALITY)
    verdicts = {v["llama"]: v for v in result["verdicts"]}
    assert list(verdicts) == ["Q2_K", "Q4_0", "Q4_K_M"]  # worst quality first
    # Q2_K: both policies are as good; int2-experts is faster against it.
    assert verdicts["Q2_K"]["best"] == "int2-experts" and verdicts["Q2_K"]["dominates"]
    # Q4_0: only int4 is as good in KL (int2-experts is faster but worse), 1.13x < 1.15x.
    assert verdicts["Q4_0"]["best"] == "int4" and not verdicts["Q4_0"]["dominates"]
    # Q4_K_M is better than every policy: nothing answers it.
    assert verdicts["Q4_K_M"]["best"] is None and not verdicts["Q4_K_M"]["dominates"]
    assert not result["frontier_dominates"]
    assert result["default_vs_q4_0"]["met"]  # 1.13x >= 1.1x and KL 0.040 <= 0.045
    speeds = {p["system"]: p["decode"] for p in result["points"]}
    assert speeds == {"int4": 33, "int2-experts": 36, "llama.cpp Q4_0": 29, "llama.cpp Q4_K_M": 27,
                      "llama.cpp Q2_K": 30}


def test_default_policy_misses_the_goal_when_its_kl_is_worse_than_q4_0s():
    quality = [dict(q, kl=0.05) if q["label"] == "int4" else q for q in QUALITY]
    result = summarize({("int4", "Q4_0"): _pair(33, 29, 1.13)}, quality)
    assert not result["default_vs_q4_0"]["met"] and result["verdicts"][0]["best"] is None


def test_bad_input_is_named(tmp_path, capsys):
    quality = tmp_path / "quality.json"
    quality.write_text(json.dumps(QUALITY))
    bundle = tmp_path / "b"
    bundle.mkdir()
    gguf = tmp_path / "q.gguf"
    gguf.write_bytes(b"")
    with pytest.raises(SystemExit):
        main(["--ours", f"int3-experts={bundle}", "--llama", f"Q4_0={gguf}", "--quality", str(quality)])
    assert "no row 'int3-experts'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--ours", str(bundle), "--llama", f"Q4_0={gguf}", "--quality", str(quality)])
    assert "expected NAME=PATH" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--ours", f"int4={tmp_path / 'missing'}", "--llama", f"Q4_0={gguf}", "--quality", str(quality)])
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.llama
def test_frontier_runs_real_pairs_on_the_demo_model(tmp_path):
    from lfm_edge.device_bench.peers.gguf_writer import write_gguf
    from lfm_edge.device_bench.peers.llama_cpp import quantize
    from lfm_edge.device_bench.quality import Variant, evaluate
    from lfm_edge.export.checkpoint import Checkpoint
    from lfm_edge.export.exporter import export
    from lfm_edge.export.quality import write_report
    from lfm_edge.quant.policy import get_policy

    ckpt = demo_model_path()
    text = (ckpt / "heldout.txt").read_text()[:2000]
    results = evaluate(ckpt, text, [Variant("int4", get_policy("int4"))], window=64, max_tokens=256,
                       progress=lambda m: None, llama_cpp=[("Q4_0", False)])
    write_report(results, tmp_path / "quality", "demo", "heldout.txt")
    gguf = quantize(write_gguf(Checkpoint(ckpt), tmp_path / "f32.gguf", f16=False), tmp_path / "q4_0.gguf")
    bundle = export(ckpt, tmp_path / "int4", quant="int4").bundle
    out = tmp_path / "frontier"
    assert main(["--ours", f"int4={bundle}", "--llama", f"Q4_0={gguf}", "--quality",
                 str(tmp_path / "quality" / "quality.json"), "--rounds", "1", "--prompt", "32", "--decode", "8",
                 "--out", str(out)]) == 0
    result = json.loads((out / "frontier.json").read_text())
    pair = result["pairs"][0]
    assert (pair["ours"], pair["llama"], pair["rounds"]) == ("int4", "Q4_0", 1) and pair["decode_ratio"] > 0
    assert result["default_vs_q4_0"]["kl"] == pytest.approx(results[0].kl)
    assert (out / "frontier.png").stat().st_size > 10_000 and "llama.cpp Q4_0" in (out / "frontier.md").read_text()
