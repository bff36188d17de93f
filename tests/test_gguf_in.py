"""GGUF in: real GGUF files written from tiny random checkpoints (our writer, gguf-py's quantizers, crafted
K-quant blocks), exported, run in onnxruntime and compared with the file's own values."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import onnx
import pytest
import torch
from gguf_edit import set_fields as _set_fields
from onnx import numpy_helper

from lfm_edge.device_bench.peers.gguf_writer import write_gguf
from lfm_edge.export.checkpoint import Checkpoint, CheckpointError
from lfm_edge.export.cli import demo_model_path
from lfm_edge.export.cli import main as cli_main
from lfm_edge.export.exporter import export
from lfm_edge.export.gguf_checkpoint import GgufCheckpoint, resolve_gguf
from lfm_edge.export.reference import TorchReference
from lfm_edge.quant.blocks import quantize
from lfm_edge.quant.policy import get_policy, scale_dtype
from lfm_edge.runtime.backends.python import Cache, LfmSession
from lfm_edge.runtime.bundle import sha256
from tiny_models import build, write_lfm2_tokenizer

Q = gguf.GGMLQuantizationType
PROMPT = list(range(7, 20))


def blocks_of(qtype: Q):
    """A type chooser: every matrix llama.cpp would quantize (not the router, not the conv kernel) in `qtype`
    where its rows hold whole blocks."""
    block = gguf.GGML_QUANT_SIZES[qtype][0]

    def choose(name: str, shape: tuple[int, ...]) -> Q | None:
        skip = "ffn_gate_inp" in name or "shortconv.conv" in name
        return qtype if len(shape) >= 2 and shape[-1] % block == 0 and not skip else None
    return choose


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("gguf") / "ckpt"
    build("moe_mixed", folder, seed=5)
    return folder


@pytest.fixture(scope="module")
def tiny_q4(tiny) -> Path:
    return write_gguf(Checkpoint(tiny), tiny.parent / "tiny-q4_0.gguf", f16=False, types=blocks_of(Q.Q4_0))


def _logits(bundle: Path) -> np.ndarray:
    return Cache(LfmSession(bundle), 1, 16).step(np.array([PROMPT])).ravel()


def _reference(ckpt, transform=None) -> np.ndarray:
    ref = TorchReference(ckpt, transform=transform)
    return ref.forward(torch.tensor([PROMPT]), ref.new_state(1)).numpy().ravel()


# ---- config and weights ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["moe_mixed", "dense_mixed"])
def test_f32_gguf_exports_what_the_checkpoint_exports(name, tmp_path):
    build(name, tmp_path / "ckpt", seed=1)
    ckpt = Checkpoint(tmp_path / "ckpt")
    path = write_gguf(ckpt, tmp_path / "m.gguf", f16=False)
    g = GgufCheckpoint(path, tokenizer=tmp_path / "ckpt")
    for field in ("model_type", "layer_types", "hidden_size", "intermediate_size", "num_key_value_heads", "head_dim",
                  "num_experts", "num_experts_per_tok", "moe_intermediate_size", "num_dense_layers", "use_expert_bias",
                  "vocab_size", "tie_word_embeddings", "conv_L_cache", "eos_token_id", "bos_token_id"):
        assert getattr(g.config, field) == getattr(ckpt.config, field), field
    assert g.config.norm_eps == ckpt.config.norm_eps and g.config.rope_theta == ckpt.config.rope_theta
    ours = export(path, tmp_path / "from-gguf", tokenizer=tmp_path / "ckpt").bundle
    theirs = export(tmp_path / "ckpt", tmp_path / "from-st").bundle
    np.testing.assert_array_equal(_logits(ours), _logits(theirs))


def _unpack4(packed: np.ndarray) -> np.ndarray:
    return np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(*packed.shape[:-1], -1)


def test_q4_0_blocks_reach_the_kernels_bit_for_bit(tiny_q4, tiny, tmp_path):
    bundle = export(tiny_q4, tmp_path / "b", quant="int4", tokenizer=tiny).bundle
    model = onnx.load(bundle / "model.onnx")
    init = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    g = GgufCheckpoint(tiny_q4, tokenizer=tiny)
    # MatMulNBits (a linear) and the shared vocabulary codes (GatherBlockQuantized and the LM head)
    for name in ("model.layers.1.self_attn.q_proj.weight", "model.layers.0.conv.in_proj.weight",
                 "model.embed_tokens.weight"):
        codes, scales = _unpack4(init[name + ".q"]), init[name + ".scales"]
        dequantized = ((codes.astype(np.float32) - 8) * scales[..., None]).reshape(codes.shape[0], -1)
        np.testing.assert_array_equal(dequantized, g.tensor(name))
    # QMoE: fc1 interleaves gate and up rows, block 32, fp16 scales
    codes, scales = _unpack4(init["model.layers.2.feed_forward.experts.fc1.q"].reshape(4, 64, 2, 16)), \
        init["model.layers.2.feed_forward.experts.fc1.scales"].astype(np.float32)
    w = ((codes.astype(np.float32) - 8) * scales[..., None]).reshape(4, 64, 64)
    np.testing.assert_array_equal(w[3, 0::2], g.tensor("model.layers.2.feed_forward.experts.3.w1.weight"))
    np.testing.assert_array_equal(w[3, 1::2], g.tensor("model.layers.2.feed_forward.experts.3.w3.weight"))
    nodes = {n.op_type: n for n in model.graph.node}
    assert {a.name: a.i for a in nodes["QMoE"].attribute}["block_size"] == 32  # the file's blocks, not the policy's
    report = json.loads((bundle / "conversion.json").read_text())["tensors"]
    q4 = [r for r in report if r["type"] == "Q4_0"]
    assert q4 and all(r["relative_rms_error"] == 0 and "exactly" in r["kernel"] for r in q4)
    summary = json.loads((bundle / "manifest.json").read_text())["conversion"]
    assert summary["converted"] == 0 and summary["exact"] == summary["tensors"] == len(report)


def test_q4_0_bundle_computes_the_files_model(tiny_q4, tiny, tmp_path):
    """accuracy_level 0 (fp32 activations): the bundle is the GGUF's dequantized model, to float rounding."""
    policy = get_policy("int4").with_overrides(accuracy_level=0)
    bundle = export(tiny_q4, tmp_path / "b", quant=policy, tokenizer=tiny).bundle
    np.testing.assert_allclose(_logits(bundle), _reference(GgufCheckpoint(tiny_q4, tokenizer=tiny)), atol=1e-4,
                               rtol=0)


def test_q8_0_stays_8_bit_and_exact(tiny, tmp_path):
    path = write_gguf(Checkpoint(tiny), tmp_path / "q8.gguf", f16=False, types=blocks_of(Q.Q8_0))
    bundle = export(path, tmp_path / "b", quant="int4", tokenizer=tiny).bundle
    model = onnx.load(bundle / "model.onnx", load_external_data=False)
    bits = {a.i for n in model.graph.node if n.op_type in ("MatMulNBits", "QMoE", "GatherBlockQuantized")
            for a in n.attribute if a.name in ("bits", "expert_weight_bits")}
    assert bits == {8}
    init = {i.name: i for i in onnx.load(bundle / "model.onnx").graph.initializer}
    name = "model.layers.3.self_attn.v_proj.weight"
    codes, scales = numpy_helper.to_array(init[name + ".q"]), numpy_helper.to_array(init[name + ".scales"])
    dequantized = ((codes.astype(np.float32) - 128) * scales[..., None]).reshape(codes.shape[0], -1)
    np.testing.assert_array_equal(dequantized, GgufCheckpoint(path, tokenizer=tiny).tensor(name))


@pytest.mark.slow
def test_f16_tensors_take_the_policy_as_from_safetensors(tiny, tmp_path):
    path = write_gguf(Checkpoint(tiny), tmp_path / "f16.gguf", f16=True)
    bundle = export(path, tmp_path / "b", quant="int4", tokenizer=tiny).bundle
    rows = {r["tensor"]: r for r in json.loads((bundle / "conversion.json").read_text())["tensors"]}
    assert rows["blk.1.attn_q.weight"]["type"] == "F16"
    assert rows["blk.1.attn_q.weight"]["kernel"] == "int4 block 128 zero points"  # the int4 policy's linears
    assert rows["token_embd.weight"]["kernel"] == "int4 block 256 zero points"  # and its vocabulary
    assert rows["blk.1.ffn_gate_inp.weight"]["kernel"] == "float32"  # the router stays float


# ---- K-quants: converted, error measured -------------------------------------------------------------------

# (offset of d, offset of dmin or None, d, dmin) in each type's block, for values of a weight's size
_K_LAYOUT = {Q.Q4_K: (0, 2, 0.3 / 945, 0.3 / 63), Q.Q5_K: (0, 2, 0.3 / 1953, 0.3 / 63),
             Q.Q6_K: (208, None, 0.5 / 4096, 0), Q.Q3_K: (108, None, 0.5 / 128, 0),
             Q.Q2_K: (80, 82, 0.3 / 45, 0.3 / 15)}


def crafted(qtype: Q):
    """Random blocks of a K-quant (gguf-py cannot quantize them in numpy), scaled to weights' size."""
    d_at, dmin_at, d, dmin = _K_LAYOUT[qtype]
    size = gguf.GGML_QUANT_SIZES[qtype][1]

    def encode(rows: np.ndarray) -> np.ndarray:
        rng = np.random.default_rng(rows.shape[0] * 7 + rows.shape[1])
        raw = rng.integers(0, 256, (rows.shape[0], rows.shape[1] // 256, size), dtype=np.uint8)
        raw[..., d_at:d_at + 2] = np.frombuffer(np.float16(d).tobytes(), np.uint8)
        if dmin_at is not None:
            raw[..., dmin_at:dmin_at + 2] = np.frombuffer(np.float16(dmin).tobytes(), np.uint8)
        return raw.reshape(rows.shape[0], -1)
    return encode


@pytest.fixture(scope="module")
def wide(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("wide") / "ckpt"
    build("moe_wide_256", folder, seed=2)
    return folder


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.Q3_K, Q.Q2_K], ids=lambda t: t.name)
def test_k_quants_are_converted_with_their_error_reported(qtype, wide, tmp_path):
    path = write_gguf(Checkpoint(wide), tmp_path / "k.gguf", f16=False, types=blocks_of(qtype),
                      encoders={qtype: crafted(qtype)})
    policy = get_policy("int4").with_overrides(accuracy_level=0)
    bundle = export(path, tmp_path / "b", quant=policy, tokenizer=wide).bundle
    rows = {r["tensor"]: r for r in json.loads((bundle / "conversion.json").read_text())["tensors"]}
    converted = [r for r in rows.values() if r["type"] == qtype.name]
    assert len(converted) >= 10 and rows["blk.2.ffn_down_exps.weight"]["type"] == qtype.name
    assert qtype.name in (bundle / "conversion.md").read_text()
    exact = {name for name, r in rows.items() if r["relative_rms_error"] == 0}
    # the closest layout: the type's bits (rounded up to 4 or 8) and sub-block, not the policy's block of 128
    # (Q4_K linears: block 32 with float zero points)
    bits, block = (8 if qtype in (Q.Q5_K, Q.Q6_K) else 4), (16 if qtype in (Q.Q6_K, Q.Q3_K, Q.Q2_K) else 32)
    for r in converted:
        # Q6_K's sub-blocks of 16 are int8 blocks of 16 as they are (not for QMoE, whose scales are fp16)
        linear = "_exps" not in r["tensor"] and r["tensor"] != "token_embd.weight"
        if qtype == Q.Q6_K and "_exps" not in r["tensor"]:
            assert r["tensor"] in exact and r["kernel"].startswith("int8 block 16"), r
        elif qtype == Q.Q4_K and linear:  # MatMulNBits takes float zero points: s * q - o as it is
            assert r["kernel"].endswith("float zero points") and r["relative_rms_error"] < 1e-6, r
        else:
            assert 0 < r["relative_rms_error"] < (0.01 if bits == 8 else 0.15), r
    assert rows["blk.0.shortconv.in_proj.weight"]["kernel"].startswith(f"int{bits} block {block}")
    assert rows["blk.2.ffn_up_exps.weight"]["kernel"].startswith(f"int{bits} block 32")
    # the bundle computes the file's values where they are exact, and their closest quantization elsewhere
    g = GgufCheckpoint(path, tokenizer=wide)

    def transform(name: str, array: np.ndarray) -> np.ndarray:
        row = rows[g.gguf_tensor(name)]
        if row["relative_rms_error"] < 1e-6 or policy.spec(name) is None:
            return array
        spec = g.closest_spec(name, 32 if ".experts." in name else 16)
        return quantize(array, spec.bits, spec.block_size, spec.method, scale_dtype=scale_dtype(name)).dequantize()
    got, want = _logits(bundle), _reference(g, transform)
    assert float(got @ want / np.linalg.norm(got) / np.linalg.norm(want)) >= 0.9999
    # 8-bit QMoE always runs int8 activations (quant/README.md), so those bundles are close, not exact
    np.testing.assert_allclose(got, want, atol=2e-4 if bits == 4 and block == 32 else 0.15, rtol=0)


# ---- tokenizer, template, special tokens, generation defaults ---------------------------------------------

TEXTS = ["Hello world! It's 2024, isn't it?", "  leading spaces\n\n\ttabs and ünïcödé, 12345678 digits",
         "<|im_start|>user\nWhat's a list?<|im_end|>\n<|im_start|>assistant\n",
         "code: def f(x):\n    return x**2  # ok",
         "émojis 🙂🙃 and CJK 汉字 and Ελληνικά", "", "   ", "'s 'T 'Re 'LL don't I'M"]


@pytest.fixture(scope="module")
def demo_gguf(tmp_path_factory) -> Path:
    return write_gguf(Checkpoint(demo_model_path()), tmp_path_factory.mktemp("demo") / "demo.gguf", f16=True,
                      types=blocks_of(Q.Q4_0))


def test_demo_gguf_brings_its_tokenizer_template_and_tokens(demo_gguf, tmp_path):
    from tokenizers import Tokenizer

    bundle = export(demo_gguf, tmp_path / "b", quant="int4").bundle  # no --tokenizer: all from the file
    original = Tokenizer.from_file(str(demo_model_path() / "tokenizer.json"))
    rebuilt = Tokenizer.from_file(str(bundle / "tokenizer.json"))
    for text in TEXTS:
        assert rebuilt.encode(text).ids == original.encode(text).ids, text
        assert rebuilt.decode(original.encode(text).ids) == original.decode(original.encode(text).ids)
    want = json.loads((demo_model_path() / "tokenizer_config.json").read_text())
    got = json.loads((bundle / "tokenizer_config.json").read_text())
    for key in ("chat_template", "bos_token", "eos_token", "pad_token", "add_bos_token"):
        assert got[key] == want[key], key
    gen = json.loads((bundle / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"], gen["pad_token_id"]) == (1, [7], 0)
    genai = json.loads((bundle / "genai_config.json").read_text())
    assert genai["model"]["eos_token_id"] == 7
    from lfm_edge.runtime import LfmModel

    reply = LfmModel(bundle).chat([{"role": "user", "content": "What is a list?"}], max_new_tokens=4)
    assert isinstance(reply.text, str)


def test_lfm2_split_tokenizer_survives_the_gguf(tmp_path):
    """LFM2's own pre-tokenizer (llama.cpp's `lfm2`: llama3 split, whole words first, BOS added)."""
    from tokenizers import Tokenizer

    build("dense_mixed", tmp_path / "ckpt", seed=4)
    write_lfm2_tokenizer(tmp_path / "ckpt", 300, (demo_model_path() / "heldout.txt").read_text()[:20000])
    path = write_gguf(Checkpoint(tmp_path / "ckpt"), tmp_path / "m.gguf", f16=False)
    meta = GgufCheckpoint(path).meta
    assert (meta["tokenizer.ggml.model"], meta["tokenizer.ggml.pre"]) == ("gpt2", "lfm2")
    bundle = export(path, tmp_path / "b").bundle  # dense, f32, everything from the file
    original = Tokenizer.from_file(str(tmp_path / "ckpt" / "tokenizer.json"))
    rebuilt = Tokenizer.from_file(str(bundle / "tokenizer.json"))
    for text in TEXTS:
        assert rebuilt.encode(text).ids == [1] + original.encode(text).ids, text  # + the BOS llama.cpp adds
    config = json.loads((bundle / "tokenizer_config.json").read_text())
    assert config["chat_template"].startswith("{{ bos_token }}") and config["eos_token"] == "<|im_end|>"


def test_sampling_defaults_come_from_the_file(tmp_path, tiny):
    path = write_gguf(Checkpoint(tiny), tmp_path / "m.gguf", f16=False)
    _set_fields(path, tmp_path / "s.gguf", {"general.sampling.temp": 0.3, "general.sampling.top_k": 40})
    g = GgufCheckpoint(tmp_path / "s.gguf", tokenizer=tiny)
    gen = json.loads(g.files()["generation_config.json"])
    assert gen["temperature"] == pytest.approx(0.3) and gen["top_k"] == 40 and gen["do_sample"] is True


# ---- splits and the hub ---------------------------------------------------------------------------------------

def test_split_gguf_reads_all_parts_and_names_a_missing_one(tiny, tmp_path):
    first = write_gguf(Checkpoint(tiny), tmp_path / "split" / "m.gguf", f16=False, types=blocks_of(Q.Q4_0),
                       split_max_tensors=12)
    parts = sorted(first.parent.glob("*.gguf"))
    assert first.name == f"m-00001-of-{len(parts):05d}.gguf" and len(parts) > 2
    whole = write_gguf(Checkpoint(tiny), tmp_path / "whole.gguf", f16=False, types=blocks_of(Q.Q4_0))
    a = export(first, tmp_path / "a", quant="int4", tokenizer=tiny).bundle
    b = export(whole, tmp_path / "b", quant="int4", tokenizer=tiny).bundle
    np.testing.assert_array_equal(_logits(a), _logits(b))
    parts[1].unlink()
    with pytest.raises(CheckpointError, match=f"part 2 of {len(parts)} is missing"):
        export(first, tmp_path / "c", quant="int4", tokenizer=tiny)
    assert not (tmp_path / "c").exists()


def test_hub_gguf_file_is_downloaded_by_name(monkeypatch, tiny_q4):
    import huggingface_hub

    asked = []

    def fake_download(repo_id: str, filename: str) -> str:
        asked.append((repo_id, filename))
        return str(tiny_q4)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    assert resolve_gguf("LiquidAI/LFM2-8B-A1B-GGUF/LFM2-8B-A1B-Q4_0.gguf") == tiny_q4
    assert asked == [("LiquidAI/LFM2-8B-A1B-GGUF", "LFM2-8B-A1B-Q4_0.gguf")]
    asked.clear()
    resolve_gguf("org/repo/q4/model-00001-of-00003.gguf")
    assert asked == [("org/repo", f"q4/model-0000{i}-of-00003.gguf") for i in (1, 2, 3)]


def test_cli_keeps_a_quantized_gguf_quantized_on_desktop(tiny_q4, tiny, tmp_path):
    assert cli_main([str(tiny_q4), "--tokenizer", str(tiny), "--out", str(tmp_path / "b"), "--quiet"]) == 0
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["quant"] == "gguf-exact" and manifest["gguf_layout"] == "exact"  # the file's blocks, no policy
    assert manifest["source"]["name"] == tiny_q4.name
    assert manifest["source"]["gguf_sha256"] == {tiny_q4.name: sha256(tiny_q4)}
    for file in (tmp_path / "b").iterdir():  # the exporting machine's paths stay on it (conversion.md too)
        assert str(tiny_q4.parent).encode() not in file.read_bytes(), file.name


# ---- bad input: refused before heavy work, file and tensor named, nothing written ---------------------------

def _refused(path: Path, out: Path, match: str, **kwargs) -> None:
    with pytest.raises(CheckpointError, match=match):
        export(path, out, quant="int4", **kwargs)
    assert not out.exists() and not list(out.parent.glob(f".{out.name}.*"))


def test_other_architecture_is_refused(tmp_path):
    w = gguf.GGUFWriter(tmp_path / "llama.gguf", "llama")
    w.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    _refused(tmp_path / "llama.gguf", tmp_path / "out", r"llama\.gguf: architecture 'llama' is not an LFM2 model")


def test_truncated_and_corrupt_files_are_refused(tiny_q4, tiny, tmp_path):
    data = tiny_q4.read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[:-1000])
    _refused(tmp_path / "cut.gguf", tmp_path / "out", r"cut\.gguf: tensor 'blk\.3\.ffn_up_exps\.weight' ends at byte "
             r"\d+, past the end of the file", tokenizer=tiny)
    (tmp_path / "head.gguf").write_bytes(data[:300])
    _refused(tmp_path / "head.gguf", tmp_path / "out", r"head\.gguf: not a readable GGUF file", tokenizer=tiny)
    (tmp_path / "magic.gguf").write_bytes(b"GGML" + data[4:])
    _refused(tmp_path / "magic.gguf", tmp_path / "out", r"magic\.gguf: not a readable GGUF file", tokenizer=tiny)
    bad = bytearray(data)
    after_name = data.index(b"blk.1.attn_q.weight") + len(b"blk.1.attn_q.weight")  # tensor info: name, n_dims,
    type_at = after_name + 4 + 8 * int.from_bytes(data[after_name:after_name + 4], "little")  # dims, then its type
    bad[type_at:type_at + 4] = (77).to_bytes(4, "little")
    (tmp_path / "type.gguf").write_bytes(bytes(bad))
    _refused(tmp_path / "type.gguf", tmp_path / "out", r"tensor 'blk\.1\.attn_q\.weight' has unknown GGML type 77",
             tokenizer=tiny)


def test_unsupported_tensor_type_is_refused_by_name(tiny, tmp_path):
    def int8(name, shape):
        return Q.I8 if name == "blk.3.attn_k.weight" else None
    path = write_gguf(Checkpoint(tiny), tmp_path / "i8.gguf", f16=False, types=int8,
                      encoders={Q.I8: lambda rows: np.clip(rows * 100, -127, 127).astype(np.int8).view(np.uint8)})
    _refused(path, tmp_path / "out", r"tensor 'blk\.3\.attn_k\.weight' has type I8, which no path here converts",
             tokenizer=tiny)


def test_gguf_without_tokenizer_says_how_to_pass_one(tiny_q4, tmp_path):
    # the tiny checkpoint's word-level tokenizer cannot be a GGUF vocabulary: the writer stores ids only
    _refused(tiny_q4, tmp_path / "out", r"no tokenizer in the GGUF .*pass the model's tokenizer\.json with --tokenizer")
    bundle = export(tiny_q4, tmp_path / "ok", quant="int4", tokenizer=tiny_q4.parent / "ckpt" / "tokenizer.json")
    assert (bundle.bundle / "tokenizer.json").read_bytes() == (tiny_q4.parent / "ckpt" / "tokenizer.json").read_bytes()


def test_failed_gguf_export_leaves_the_previous_bundle(tiny_q4, tiny, tmp_path):
    out = export(tiny_q4, tmp_path / "b", quant="int4", tokenizer=tiny).bundle
    before = (out / "manifest.json").read_bytes()
    broken = tmp_path / "broken.gguf"
    shutil.copyfile(tiny_q4, broken)
    with open(broken, "r+b") as f:
        f.truncate(broken.stat().st_size - 10)
    with pytest.raises(CheckpointError, match="past the end"):
        export(broken, out, quant="int4", tokenizer=tiny)
    assert (out / "manifest.json").read_bytes() == before


def test_ab_benchmark_exports_its_bundle_from_the_gguf_it_compares_with(tiny_q4, tiny, tmp_path, monkeypatch):
    from lfm_edge.device_bench.studies import ab

    shutil.copyfile(tiny / "tokenizer.json", tmp_path / "tokenizer.json")
    gguf_copy = tmp_path / "m.gguf"
    shutil.copyfile(tiny_q4, gguf_copy)
    with pytest.raises(CheckpointError, match="--tokenizer"):  # the tiny file has no vocabulary of its own
        ab.bundle_for(gguf_copy, tmp_path / "b")
    bundle = export(gguf_copy, tmp_path / "b", quant="int4", tokenizer=tmp_path).bundle
    assert ab.exported_from(bundle, gguf_copy)  # recognised by name and sha256, not by a local path
    assert ab.bundle_for(gguf_copy, bundle) == bundle  # reused, not exported again
    assert not ab.exported_from(tmp_path, gguf_copy)
    with open(gguf_copy, "r+b") as f:  # another file under the same name is not "the same weights"
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 1]))
    assert not ab.exported_from(bundle, gguf_copy)
