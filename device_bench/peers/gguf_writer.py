"""An `lfm2moe` or `lfm2` GGUF for llama.cpp, written from a checkpoint read with our own reader (no torch).

llama.cpp is the peer the benchmark holds our bundles against, on the same weights, and the tests make the
GGUFs `lfm-export` reads with it (export/gguf_checkpoint.py). The metadata and tensor names follow llama.cpp's
converter (`LFM2Model` / `LFM2MoeModel` in convert_hf_to_gguf, and gguf-py's LFM2 / LFM2MOE tensor maps):

    model.embed_tokens                      token_embd              (tied: also the LM head)
    model.embedding_norm                    token_embd_norm         (the final norm)
    layers.i.operator_norm / ffn_norm       blk.i.attn_norm / blk.i.ffn_norm
    layers.i.conv.{conv,in_proj,out_proj}   blk.i.shortconv.{conv,in_proj,out_proj}   (conv squeezed to [H, K])
    layers.i.self_attn.{q,k,v,out}_proj     blk.i.attn_{q,k,v,output}
    layers.i.self_attn.{q,k}_layernorm      blk.i.attn_{q,k}_norm
    layers.i.feed_forward.{w1,w3,w2}        blk.i.ffn_{gate,up,down}                  (dense layers)
    layers.i.feed_forward.gate              blk.i.ffn_gate_inp
    layers.i.feed_forward.expert_bias       blk.i.exp_probs_b.bias
    layers.i.feed_forward.experts.j.w1/3/2  blk.i.ffn_{gate,up,down}_exps             (stacked [E, ...])

The tokenizer: a byte-level BPE tokenizer.json (GPT-2 or LFM2 split) is written as llama.cpp's `gpt2` model
(tokens, types, merges, BOS/EOS/pad, the chat template); any other (the tests' word-level one) as llama.cpp's
`no_vocab` model with `vocab_size` dummy tokens, which is all the benchmark needs to evaluate token ids.

`first_layers(src, dst, n)` cuts a GGUF (any writer's, llama-quantize's too) to its first n layers at full width:
the file a study measures when the whole model is more than it needs (`python -m
lfm_edge.device_bench.peers.gguf_writer SRC DST --layers N`).

`types(gguf_name, shape)` may choose a block type per tensor (Q4_0, Q8_0, ... as gguf-py quantizes them in
numpy; `encoders` supplies bytes for types it cannot quantize, such as the K-quants).

Tensors are streamed: all tensor infos first (shapes come from the config), then one tensor at a time;
at most one stacked expert tensor (one layer's gate, up or down) is in memory at once.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import gguf
import numpy as np

from ...export.config import Lfm2Config
from ...export.gguf_tokenizer import metadata_from_tokenizer

ARCH = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LFM2MOE]  # "lfm2moe"
ARCHS = {"lfm2_moe": ARCH, "lfm2": gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LFM2]}
T = gguf.MODEL_TENSOR
Q = gguf.GGMLQuantizationType
TypeChooser = Callable[[str, tuple[int, ...]], "gguf.GGMLQuantizationType | None"]
Encoder = Callable[[np.ndarray], np.ndarray]  # float32 [rows, K] -> uint8 [rows, bytes per row]


class CheckpointLike(Protocol):
    """`lfm_edge.export.checkpoint.Checkpoint` or `lfm_edge.export.random_weights.RandomCheckpoint`."""

    config: Lfm2Config

    def tensor(self, name: str, shape: tuple[int, ...] | None = None) -> np.ndarray: ...


@dataclass
class _Entry:
    name: str  # GGUF tensor name
    shape: tuple[int, ...]  # numpy (row-major) shape; GGUF stores it reversed
    dtype: type[np.floating]
    load: Callable[[], np.ndarray]  # float32 array of `shape`


def _name(kind: gguf.MODEL_TENSOR, bid: int | None = None, suffix: str = "weight") -> str:
    base = gguf.TENSOR_NAMES[kind]
    return f"{base.format(bid=bid) if bid is not None else base}.{suffix}"


def _check_supported(cfg: Lfm2Config) -> None:
    """Refuse what llama.cpp's lfm2moe graph cannot express rather than write a GGUF that computes
    something else."""
    if cfg.model_type not in ARCHS:
        raise ValueError(f"model_type {cfg.model_type!r}: this writer makes lfm2 and lfm2moe GGUFs only")
    if cfg.conv_bias:
        raise ValueError("conv_bias: llama.cpp's lfm2 / lfm2moe have no short-conv biases")
    if cfg.is_moe and not cfg.norm_topk_prob:
        raise ValueError("norm_topk_prob false: llama.cpp's lfm2moe always renormalises the top-k weights")
    if cfg.is_moe and cfg.routed_scaling_factor != 1.0:
        raise ValueError(f"routed_scaling_factor {cfg.routed_scaling_factor}: llama.cpp's lfm2moe reads no scale")
    if not cfg.tie_word_embeddings:
        raise ValueError("untied LM head: not written here (the LFM2 models tie it)")


def _entries(ck: CheckpointLike, f16: bool) -> Iterator[_Entry]:
    """Every GGUF tensor in file order, with a loader each. 1-D tensors, the router and the conv kernel
    stay f32 (as llama.cpp's converter keeps them); the other matrices are f16 when `f16`."""
    cfg = ck.config
    h, v, k = cfg.hidden_size, cfg.vocab_size, cfg.conv_L_cache
    big = np.float16 if f16 else np.float32

    def plain(kind: T, src: str, shape: tuple[int, ...], bid: int | None = None, dtype=None) -> _Entry:
        if dtype is None:
            dtype = np.float32 if len(shape) == 1 else big
        return _Entry(_name(kind, bid), shape, dtype, lambda: ck.tensor(src, shape))

    yield plain(T.TOKEN_EMBD, "model.embed_tokens.weight", (v, h))
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}"
        yield plain(T.ATTN_NORM, f"{p}.operator_norm.weight", (h,), i)
        if cfg.layer_types[i] == "full_attention":
            q, kv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
            a = f"{p}.self_attn"
            yield plain(T.ATTN_Q, f"{a}.q_proj.weight", (q * d, h), i)
            yield plain(T.ATTN_K, f"{a}.k_proj.weight", (kv * d, h), i)
            yield plain(T.ATTN_V, f"{a}.v_proj.weight", (kv * d, h), i)
            yield plain(T.ATTN_OUT, f"{a}.out_proj.weight", (h, q * d), i)
            yield plain(T.ATTN_Q_NORM, f"{a}.q_layernorm.weight", (d,), i)
            yield plain(T.ATTN_K_NORM, f"{a}.k_layernorm.weight", (d,), i)
        else:
            c = f"{p}.conv"
            yield _Entry(_name(T.SHORTCONV_CONV, i), (h, k), np.float32,
                         lambda c=c: ck.tensor(f"{c}.conv.weight", (h, 1, k)).reshape(h, k))
            yield plain(T.SHORTCONV_INPROJ, f"{c}.in_proj.weight", (3 * h, h), i)
            yield plain(T.SHORTCONV_OUTPROJ, f"{c}.out_proj.weight", (h, h), i)
        yield plain(T.FFN_NORM, f"{p}.ffn_norm.weight", (h,), i)
        f = f"{p}.feed_forward"
        if cfg.is_moe_layer(i):
            e, w = cfg.num_experts, cfg.moe_intermediate_size
            yield plain(T.FFN_GATE_INP, f"{f}.gate.weight", (e, h), i, dtype=np.float32)
            bias = (lambda f=f, e=e: ck.tensor(f"{f}.expert_bias", (e,))) if cfg.use_expert_bias \
                else (lambda e=e: np.zeros(e, np.float32))
            yield _Entry(_name(T.FFN_EXP_PROBS_B, i, "bias"), (e,), np.float32, bias)
            for kind, which, shape in ((T.FFN_GATE_EXP, "w1", (w, h)), (T.FFN_DOWN_EXP, "w2", (h, w)),
                                       (T.FFN_UP_EXP, "w3", (w, h))):
                yield _Entry(_name(kind, i), (e, *shape), big,
                             lambda f=f, which=which, shape=shape: _stack_experts(ck, f, which, shape, big))
        else:
            n = cfg.intermediate_size
            yield plain(T.FFN_GATE, f"{f}.w1.weight", (n, h), i)
            yield plain(T.FFN_DOWN, f"{f}.w2.weight", (h, n), i)
            yield plain(T.FFN_UP, f"{f}.w3.weight", (n, h), i)
    yield plain(T.TOKEN_EMBD_NORM, "model.embedding_norm.weight", (h,))


def _stack_experts(ck: CheckpointLike, prefix: str, which: str, shape: tuple[int, int],
                   dtype: type[np.floating]) -> np.ndarray:
    """[E, *shape] of one projection of every expert, filled one expert at a time (already in `dtype`,
    so only the stack and one float32 expert are held)."""
    e = ck.config.num_experts
    fused = _fused_source(ck, prefix, which)
    if fused is not None:  # transformers-5 layout: read the fused tensor once, not once per expert
        return np.ascontiguousarray(fused, dtype=dtype)
    out = np.empty((e, *shape), dtype)
    for j in range(e):
        out[j] = ck.tensor(f"{prefix}.experts.{j}.{which}.weight", shape)
    return out


def _fused_source(ck: CheckpointLike, prefix: str, which: str) -> np.ndarray | None:
    """The slice of a fused `experts.gate_up_proj` [E, 2I, H] / `experts.down_proj` [E, H, I] when the
    checkpoint stores experts that way (per-expert reads of it would re-read the whole tensor each time)."""
    names = getattr(ck, "names", None)
    if names is None:
        return None
    source = f"{prefix}.experts.{'down_proj' if which == 'w2' else 'gate_up_proj'}"
    if source not in set(names()):
        return None
    fused = ck.tensor(source)
    if which == "w2":
        return fused
    half = fused.shape[1] // 2
    return fused[:, :half] if which == "w1" else fused[:, half:]


def _add_metadata(w: gguf.GGUFWriter, cfg: Lfm2Config, f16: bool, name: str) -> None:
    """The keys llama.cpp's converter writes for Lfm2(Moe)ForCausalLM (TextModel's, then LFM2(Moe)Model's)."""
    w.add_name(name)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)  # the dense layers' width
    w.add_head_count(cfg.num_attention_heads)
    # per layer: 0 marks a short-conv (recurrent) layer for llama.cpp
    w.add_head_count_kv([cfg.num_key_value_heads if t == "full_attention" else 0 for t in cfg.layer_types])
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_expert_count(cfg.num_experts)
    w.add_expert_used_count(cfg.num_experts_per_tok)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if f16 else gguf.LlamaFileType.ALL_F32)
    if cfg.is_moe:
        w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
        w.add_leading_dense_block_count(cfg.num_dense_layers)
        w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
        # Not written by the converter and not read by llama.cpp's lfm2moe (it always renormalises); recorded
        # so the file says what it computes.
        w.add_expert_weights_norm(cfg.norm_topk_prob)
    w.add_vocab_size(cfg.vocab_size)
    w.add_shortconv_l_cache(cfg.conv_L_cache)
    if cfg.bos_token_id is not None:
        w.add_bos_token_id(cfg.bos_token_id)
    if cfg.eos_token_id:
        w.add_eos_token_id(cfg.eos_token_id[0])
    if cfg.pad_token_id is not None:
        w.add_pad_token_id(cfg.pad_token_id)


def _add_tokenizer(w: gguf.GGUFWriter, cfg: Lfm2Config, folder: Path | None) -> None:
    """The checkpoint's byte-level BPE as llama.cpp's `gpt2` vocabulary, with its chat template; otherwise
    ids only (`none`: llama.cpp adds vocab_size dummy tokens)."""
    tok_path = folder / "tokenizer.json" if folder is not None else None
    meta = None
    settings: dict = {}
    if tok_path is not None and tok_path.is_file():
        config_path = folder / "tokenizer_config.json"
        settings = json.loads(config_path.read_text()) if config_path.is_file() else {}
        meta = metadata_from_tokenizer(json.loads(tok_path.read_text()), cfg.vocab_size,
                                       bool(settings.get("add_bos_token", False)))
    if meta is None:
        w.add_tokenizer_model("none")
        return
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(meta["pre"])
    w.add_token_list(meta["tokens"])
    w.add_token_types(meta["types"])
    w.add_token_merges(meta["merges"])
    w.add_add_bos_token(meta["add_bos"])
    w.add_add_eos_token(bool(settings.get("add_eos_token", False)))
    template = settings.get("chat_template")
    if (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text()
    if isinstance(template, str):
        w.add_chat_template(template)


def write_gguf(checkpoint: CheckpointLike, out_path: str | Path, f16: bool = True, types: TypeChooser | None = None,
               encoders: dict[gguf.GGMLQuantizationType, Encoder] | None = None, split_max_tensors: int = 0) -> Path:
    """Write `checkpoint` as an lfm2moe / lfm2 GGUF (f16 matrices when `f16`, else all f32, or the block type
    `types` picks per tensor); returns the path (the first part's, when `split_max_tensors` splits the file
    into NAME-0000i-of-0000n.gguf as llama.cpp's gguf-split does)."""
    cfg = checkpoint.config
    _check_supported(cfg)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    entries = list(_entries(checkpoint, f16))
    chosen = {e.name: types(e.name, e.shape) if types else None for e in entries}
    writer = gguf.GGUFWriter(out_path, ARCHS[cfg.model_type], split_max_tensors=split_max_tensors)
    folder = getattr(checkpoint, "folder", None)
    try:
        _add_metadata(writer, cfg, f16, Path(str(folder or "lfm2moe")).name)
        _add_tokenizer(writer, cfg, folder if isinstance(folder, Path) and folder.is_dir() else None)
        for e in entries:
            qtype = chosen[e.name]
            if qtype is None:
                nbytes = int(np.prod(e.shape)) * np.dtype(e.dtype).itemsize
                writer.add_tensor_info(e.name, e.shape, np.dtype(e.dtype), nbytes)
            else:
                block, size = gguf.GGML_QUANT_SIZES[qtype]
                writer.add_tensor_info(e.name, e.shape, np.dtype(np.float32), int(np.prod(e.shape)) // block * size,
                                       raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for e in entries:
            data = e.load()
            if data.shape != e.shape:
                raise ValueError(f"{e.name}: got shape {data.shape}, expected {e.shape}")
            qtype = chosen[e.name]
            if qtype is None:
                writer.write_tensor_data(np.ascontiguousarray(data, dtype=e.dtype))
            else:
                encode = (encoders or {}).get(qtype, lambda a, t=qtype: gguf.quants.quantize(a, t))
                rows = data.reshape(-1, e.shape[-1]).astype(np.float32)
                writer.write_tensor_data(np.ascontiguousarray(encode(rows)))
            del data
        parts = writer.format_shard_names(out_path)
    finally:
        writer.close()
    return parts[0]


def first_layers(src: str | Path, dst: str | Path, n: int) -> Path:
    """`src`'s first `n` layers as a GGUF at `dst`: later layers' tensors dropped, `block_count` and the per-layer
    metadata arrays (one value per layer, e.g. head_count_kv) cut to n, every other key and tensor as it is (block
    types and bytes unchanged). The tensors stream from the source's memory map."""
    reader = gguf.GGUFReader(src)
    arch = reader.fields["general.architecture"].contents()
    blocks = reader.fields[f"{arch}.block_count"].contents()
    if not 1 <= n <= blocks:
        raise ValueError(f"{src}: {blocks} layers; cannot keep the first {n} (expected 1..{blocks})")
    array = gguf.GGUFValueType.ARRAY
    writer = gguf.GGUFWriter(Path(dst), arch)
    try:
        for name, field in reader.fields.items():
            if name.startswith("GGUF.") or name == "general.architecture":
                continue
            kind, value = field.types[0], field.contents()
            if name == f"{arch}.block_count":
                value = n
            elif kind == array and name.startswith(arch + ".") and len(value) == blocks:
                value = value[:n]
            writer.add_key_value(name, value, kind, sub_type=field.types[-1] if kind == array else None)
        for t in reader.tensors:
            layer = re.match(r"blk\.(\d+)\.", t.name)
            if layer and int(layer.group(1)) >= n:
                continue
            data = np.asarray(t.data)  # the stored bytes (a block type's) or values (F32/F16), memory-mapped
            float_type = t.tensor_type in (Q.F32, Q.F16)
            writer.add_tensor(t.name, data, raw_shape=None if float_type else data.shape, raw_dtype=t.tensor_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    return Path(dst)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lfm_edge.device_bench.peers.gguf_writer",
                                     description="Cut a GGUF to its first layers (full width).")
    parser.add_argument("src")
    parser.add_argument("dst")
    parser.add_argument("--layers", type=int, required=True, help="how many of the first layers to keep")
    args = parser.parse_args(argv)
    try:
        first_layers(args.src, args.dst, args.layers)
    except (ValueError, OSError) as e:
        print(f"gguf_writer: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.dst}: the first {args.layers} layers of {args.src}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
