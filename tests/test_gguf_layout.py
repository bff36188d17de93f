"""--gguf-layout: a quantized GGUF's blocks kept exactly (`exact`) or re-laid into the policy's faster layout
(`fast`), on a small GGUF of llama.cpp's default Q4_0 mix (Q4_0 matrices, a Q6_K vocabulary); the manifest says
which layout was written."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from test_gguf_in import _logits, _unpack4, crafted

from lfm_edge.device_bench.peers.gguf_writer import main as gguf_writer_main
from lfm_edge.device_bench.peers.gguf_writer import write_gguf
from lfm_edge.export.checkpoint import Checkpoint
from lfm_edge.export.cli import main as cli_main
from lfm_edge.export.exporter import export
from lfm_edge.export.gguf_checkpoint import GgufCheckpoint
from lfm_edge.export.options import ExportError, ExportOptions
from tiny_models import build

Q = gguf.GGMLQuantizationType
TEXT = "the quick brown fox jumps over the lazy dog, and then the dog sleeps in the sun. " * 8


def _q4_0_mix(name: str, shape: tuple[int, ...]) -> Q | None:
    """llama-quantize's Q4_0: the (tied) vocabulary in Q6_K, the other matrices in Q4_0 (and, as its mixes do for
    some attention tensors, one in Q8_0)."""
    if name == "token_embd.weight":
        return Q.Q6_K
    if name == "blk.1.attn_v.weight":
        return Q.Q8_0
    skip = "ffn_gate_inp" in name or "shortconv.conv" in name
    return Q.Q4_0 if len(shape) >= 2 and shape[-1] % 32 == 0 and not skip else None


@pytest.fixture(scope="module")
def mix(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("layout") / "ckpt"
    build("moe_wide_256", folder, seed=3)  # rows of 256: Q6_K's super-blocks and block 256 both fit
    path = write_gguf(Checkpoint(folder), folder.parent / "q4_0-mix.gguf", f16=False, types=_q4_0_mix,
                      encoders={Q.Q6_K: crafted(Q.Q6_K)})
    return path, folder


@pytest.fixture(scope="module", params=["desktop", "android"])  # a phone's export adds ~8 s of onnxruntime's tools
def exact(mix, tmp_path_factory, request) -> Path:
    path, tok = mix
    out = tmp_path_factory.mktemp("exact") / "b"
    assert cli_main([str(path), "--tokenizer", str(tok), "--target", request.param, "--gguf-layout", "exact",
                     "--out", str(out), "--quiet"]) == 0
    return out


@pytest.fixture(scope="module")
def fast(mix, tmp_path_factory) -> Path:
    path, tok = mix
    return export(path, tmp_path_factory.mktemp("fast") / "b", tokenizer=tok, target="android", gguf_layout="fast",
                  eval_text=TEXT, eval_text_name="fox.txt").bundle


def _init(bundle: Path) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in onnx.load(bundle / "model.onnx").graph.initializer}


def _attrs(bundle: Path, op: str) -> list[dict]:
    graph = onnx.load(bundle / "model.onnx", load_external_data=False).graph
    return [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute} for n in graph.node if n.op_type == op]


def _int8(init: dict[str, np.ndarray], name: str, scales: str) -> np.ndarray:
    codes = init[name].astype(np.float32) - 128
    return (codes * init[scales].reshape(*codes.shape[:2], 1)).reshape(codes.shape[0], -1)


def test_exact_layout_is_the_files_blocks_and_the_manifest_says_so(exact, mix):
    g = GgufCheckpoint(mix[0], tokenizer=mix[1])
    init = _init(exact)
    vocab = "model.embed_tokens.weight"  # Q6_K: int8 block 16, the same values
    np.testing.assert_array_equal(_int8(init, vocab + ".q", vocab + ".scales"), g.tensor(vocab))
    name = "model.layers.0.conv.in_proj.weight"  # Q4_0: int4 block 32 with its implicit zero point 8
    codes, scales = _unpack4(init[name + ".q"]), init[name + ".scales"]
    np.testing.assert_array_equal(((codes.astype(np.float32) - 8) * scales[..., None]).reshape(codes.shape[0], -1),
                                  g.tensor(name))
    assert {a["block_size"] for a in _attrs(exact, "QMoE")} == {32}
    rows = json.loads((exact / "conversion.json").read_text())
    assert rows["gguf_layout"] == "exact" and all(r["relative_rms_error"] == 0 for r in rows["tensors"])
    m = json.loads((exact / "manifest.json").read_text())
    # the policy chose none of these layouts, so none is recorded as if it had
    assert m["gguf_layout"] == "exact" and m["quant"] == "gguf-exact" and m["quant_policy"] is None
    assert m["layout"] == {"experts": ["int4 block 32 symmetric (the file's values, exactly)"],
                           "linears": ["int4 block 32 symmetric (the file's values, exactly)",
                                       "int8 block 32 symmetric (the file's values, exactly)"],
                           "vocabulary": ["int8 block 16 symmetric (the file's values, exactly)"]}
    assert "Layout: `exact`" in (exact / "conversion.md").read_text()


@pytest.mark.slow
def test_fast_layout_relays_with_its_error_bounded_and_measured(fast, exact, mix):
    g = GgufCheckpoint(mix[0], tokenizer=mix[1])
    assert {a["block_size"] for a in _attrs(fast, "QMoE")} == {256}
    # linears 128, the head's scan 256, the Q8_0 linear its own 32
    assert {a["block_size"] for a in _attrs(fast, "MatMulNBits")} == {32, 128, 256}
    init = _init(fast)
    vocab = "model.embed_tokens.weight"
    # the rescoring copy (embedding rows, the head's top logits) is the file's Q6_K exactly
    np.testing.assert_array_equal(_int8(init, vocab + ".rescore.q", vocab + ".rescore.scales3"), g.tensor(vocab))
    rows = {r["tensor"]: r for r in json.loads((fast / "conversion.json").read_text())["tensors"]}
    relaid = [r for r in rows.values() if r["type"] in ("Q4_0", "Q6_K")]
    assert len(relaid) == len([r for r in rows.values() if r["type"] not in ("F32", "Q8_0")]) >= 15
    # never fewer bits than the file's: the Q8_0 linear keeps its blocks
    assert rows["blk.1.attn_v.weight"]["relative_rms_error"] == 0
    assert rows["blk.1.attn_v.weight"]["kernel"] == "int8 block 32 symmetric (the file's values, exactly)"
    # 4-bit values re-quantized at 4 bits in wider blocks: a 4-bit quantization's error, not more
    assert all(0 < r["relative_rms_error"] < 0.15 for r in relaid), relaid
    assert "top 64 logits and the embedding rows from int8 block 16" in rows["token_embd.weight"]["kernel"]
    m = json.loads((fast / "manifest.json").read_text())
    assert m["gguf_layout"] == "fast" and m["quant"] == "int4" and m["quant_policy"]["name"] == "int4"
    assert m["layout"]["experts"] == ["int4 block 256 zero points"]
    assert m["layout"]["vocabulary (rescoring copy)"] == ["int8 block 16 symmetric (the file's values, exactly)"]
    # fewer bytes per token than the file's own layout: what the layout is for
    e = json.loads((exact / "manifest.json").read_text())
    assert m["bytes_per_token"]["total"] < 0.9 * e["bytes_per_token"]["total"]
    # and what it costs, against the exact layout on held-out text, in conversion.md and the manifest
    kl = m["conversion"]["kl_against_exact"]
    assert 0 < kl < 5 and np.isfinite(kl)
    md = (fast / "conversion.md").read_text()
    assert "Layout: `fast`" in md and f"{kl:.4g}" in md and "fox.txt" in md
    got, want = _logits(fast), _logits(exact)
    assert float(got @ want / np.linalg.norm(got) / np.linalg.norm(want)) > 0.5


@pytest.mark.slow
def test_head_layout_relays_only_the_scan_and_rescores_from_the_files_blocks(mix, exact, tmp_path):
    path, tok = mix
    head = export(path, tmp_path / "head", tokenizer=tok, target="android", gguf_layout="head").bundle
    m = json.loads((head / "manifest.json").read_text())
    assert m["gguf_layout"] == "head" and m["quant"] == "gguf-head"
    assert m["quant_policy"]["experts"] == m["quant_policy"]["linears"] == "the file's blocks"
    assert m["quant_policy"]["embedding"]["block_size"] == 256 and m["quant_policy"]["rescore"]["top"] == 64
    exactly = ["int4 block 32 symmetric (the file's values, exactly)"]
    eight = ["int8 block 32 symmetric (the file's values, exactly)"]
    assert m["layout"] == {"experts": exactly, "linears": exactly + eight, "vocabulary": ["int4 block 256 zero points"],
                           "vocabulary (rescoring copy)": ["int8 block 16 symmetric (the file's values, exactly)"]}
    rows = {r["tensor"]: r for r in json.loads((head / "conversion.json").read_text())["tensors"]}
    assert all(r["relative_rms_error"] == 0 for name, r in rows.items() if name != "token_embd.weight")
    assert 0 < rows["token_embd.weight"]["relative_rms_error"] < 0.15
    # the top logits are the file's (what a sampled or greedy token depends on); the tail is the scan's
    got, want = _logits(head), _logits(exact)
    top = np.argsort(want)[-8:]
    assert got.argmax() == want.argmax()
    np.testing.assert_allclose(got[top], want[top], atol=0.05 * np.abs(want[top]).max(), rtol=0)


def test_gguf_layout_is_checked_once():
    # phones decode at memory speed: the head and experts re-laid; a desktop keeps the file's values
    assert ExportOptions(quant="int4", target="android").resolved(quantized_gguf=True).gguf_layout == "experts"
    assert ExportOptions(quant="int4", target="ios").resolved(quantized_gguf=True).gguf_layout == "experts"
    assert ExportOptions(quant="int4").resolved(quantized_gguf=True).gguf_layout == "exact"
    assert ExportOptions(quant="int4").resolved().gguf_layout is None
    with pytest.raises(ExportError, match=r"'tight': expected one of \('exact', 'head', 'experts', 'fast'\)"):
        ExportOptions(gguf_layout="tight").resolved(quantized_gguf=True)
    with pytest.raises(ExportError, match="--gguf-layout fast: for a GGUF file whose weights are stored in"):
        ExportOptions(gguf_layout="fast", quant="int4").resolved()
    with pytest.raises(ExportError, match="--gguf-layout exact: needs a quantized policy"):
        ExportOptions(gguf_layout="exact", quant="fp32").resolved(quantized_gguf=True)


def test_a_gguf_cut_to_its_first_layers_keeps_their_blocks_and_exports(mix, tmp_path, capsys):
    """The studies' cut (device_bench/peers/gguf_writer.py first_layers) of llama.cpp's Q4_0 mix: block_count and
    the per-layer arrays say 2, the kept tensors are the file's bytes, and lfm-export reads the result."""
    path, tok = mix
    cut = tmp_path / "cut.gguf"
    assert gguf_writer_main([str(path), str(cut), "--layers", "2"]) == 0
    whole, part = GgufCheckpoint(path, tokenizer=tok), GgufCheckpoint(cut, tokenizer=tok)
    assert (whole.config.num_hidden_layers, part.config.num_hidden_layers) == (3, 2)
    assert part.config.layer_types == whole.config.layer_types[:2]
    reader = {t.name: t for t in gguf.GGUFReader(path).tensors}
    kept = gguf.GGUFReader(cut).tensors
    assert {t.name for t in kept} == {n for n in reader if not n.startswith("blk.2.")}
    for t in kept:
        assert t.tensor_type == reader[t.name].tensor_type and t.data.tobytes() == reader[t.name].data.tobytes()
    assert export(cut, tmp_path / "b", tokenizer=tok, gguf_layout="exact").bundle.is_dir()
    assert gguf_writer_main([str(path), str(tmp_path / "x.gguf"), "--layers", "4"]) == 2
    assert "3 layers; cannot keep the first 4" in capsys.readouterr().err
