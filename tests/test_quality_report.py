"""The quantization quality report measures real differences between variants and writes table and plot."""

from __future__ import annotations

import json
import random

import pytest

from lfm_edge.device_bench.quality import Variant, evaluate
from lfm_edge.export.cli import demo_model_path
from lfm_edge.export.quality import write_report
from lfm_edge.quant.policy import get_policy
from tiny_models import build


@pytest.mark.slow
def test_report_orders_variants_by_precision(tmp_path):
    build("moe_mixed", tmp_path / "ckpt")
    rng = random.Random(0)
    text = " ".join(f"w{rng.randint(3, 299)}" for _ in range(400))
    # block 32: this model's widths (tens) would be padded to the default block of 128, which real widths
    # (multiples of 128) never are, and the size ordering checked below would not hold for padding's sake
    variants = [Variant("int4", get_policy("int4").with_overrides(block_size=32)), Variant("int8", get_policy("int8")),
                Variant("fp32", get_policy("fp32"))]
    results = evaluate(tmp_path / "ckpt", text, variants, window=64, max_tokens=256, progress=lambda m: None)
    by = {r.label: r for r in results}
    assert by["fp32"].kl < 1e-6 and by["fp32"].top1 == 1.0  # the same graph family, same weights
    assert by["fp32"].ppl == by["fp32"].ppl_fp32
    assert 0 < by["int8"].kl < by["int4"].kl
    assert by["int4"].top1 <= by["int8"].top1 <= 1.0
    assert by["int4"].bundle_mb < by["int8"].bundle_mb < by["fp32"].bundle_mb
    # the settings column is the policy as exported, not a hand-written label: block 32 everywhere
    assert by["int4"].settings == variants[0].policy.summary() + "; KV cache fp32"
    assert "linears 4-bit b32 gptq" in by["int4"].settings
    assert by["int8"].padding and all(f >= 1.0 for f in by["int8"].padding.values())
    files = write_report(results, tmp_path / "report", "tiny", "words.txt (sha256 0123)")
    assert [f.name for f in files] == ["quality.json", "quality.md", "quality.png"]
    assert json.loads(files[0].read_text())[0]["label"] == "int4"
    assert files[2].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = files[1].read_text()
    assert "words.txt (sha256 0123)" in report and by["int4"].settings in report
    assert f"{by['fp32'].tokens} next-token predictions in {by['fp32'].windows} windows" in report


def test_padding_counts_what_narrow_rows_store():
    from lfm_edge.export.config import Lfm2Config
    from lfm_edge.export.quant_ops import padding
    from lfm_edge.export.random_weights import preset

    demo = Lfm2Config.from_file(demo_model_path() / "config.json")  # hidden 128, experts 96 wide
    int4 = get_policy("int4")
    # QMoE pads both expert widths to 256: 256 * 256 / (128 * 96); the vocabulary's 128 to 256
    assert padding(int4, demo) == pytest.approx({"experts": 256 * 256 / (128 * 96), "vocabulary": 2.0,
                                                 "linears": padding(int4, demo)["linears"]})
    assert set(padding(int4.with_overrides(block_size=32), demo).values()) == {1.0}
    assert padding(get_policy("fp32"), demo) == {}
    full = Lfm2Config.from_dict(preset("lfm2.5-8b-a1b:3"))  # real widths are whole blocks
    assert set(padding(int4, full).values()) == {1.0}


@pytest.mark.slow
def test_quantized_bundle_carries_its_quality_section(tmp_path):
    from lfm_edge.export.exporter import export

    build("moe_mixed", tmp_path / "ckpt")
    text = " ".join(f"w{i % 290 + 3}" for i in range(300))
    bundle = export(tmp_path / "ckpt", tmp_path / "int4", quant="int4", eval_text=text,
                    eval_text_name="words.txt").bundle
    quality = json.loads((bundle / "quality.json").read_text())
    assert quality[0]["policy"] == "int4" and quality[0]["tokens"] > 100 and quality[0]["kl"] > 0
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert {"quality.json", "quality.md", "quality.png"} <= set(manifest["files"])
    # what the bundle's report says was exported is what its manifest records
    assert manifest["quant_policy"] == get_policy("int4").describe()
    assert manifest["kv_cache"]["bits"] == 32
    assert quality[0]["settings"] == get_policy("int4").summary() + "; KV cache fp32"
    assert "words.txt (sha256 " in (bundle / "quality.md").read_text()
    # lfm-bench quality on the same text cuts it the same way: the same fp32 perplexity, the same figures
    [again] = evaluate(tmp_path / "ckpt", text, [Variant("int4", get_policy("int4"))], progress=lambda m: None)
    assert (again.tokens, again.windows) == (quality[0]["tokens"], quality[0]["windows"])
    assert again.ppl_fp32 == pytest.approx(quality[0]["ppl_fp32"], rel=1e-9)
    assert again.kl == pytest.approx(quality[0]["kl"], rel=1e-9)
