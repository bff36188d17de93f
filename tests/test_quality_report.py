"""The quantization quality report measures real differences between variants and writes table and plot."""

from __future__ import annotations

import json
import random

import pytest

from lfm_edge.device_bench.quality import Variant, evaluate
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
    files = write_report(results, tmp_path / "report", "tiny")
    assert [f.name for f in files] == ["quality.json", "quality.md", "quality.png"]
    assert json.loads(files[0].read_text())[0]["label"] == "int4"
    assert files[2].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_quantized_bundle_carries_its_quality_section(tmp_path):
    from lfm_edge.export.exporter import export

    build("moe_mixed", tmp_path / "ckpt")
    text = " ".join(f"w{i % 290 + 3}" for i in range(300))
    bundle = export(tmp_path / "ckpt", tmp_path / "int4", quant="int4", eval_text=text).bundle
    quality = json.loads((bundle / "quality.json").read_text())
    assert quality[0]["policy"] == "int4" and quality[0]["tokens"] > 100 and quality[0]["kl"] > 0
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert {"quality.json", "quality.md", "quality.png"} <= set(manifest["files"])
