"""An `lfm2moe` GGUF for llama.cpp, written from a checkpoint read with our own reader (no torch).

llama.cpp is the peer the benchmark holds our bundles against, on the same weights. The metadata and
tensor names follow llama.cpp's converter (`LFM2MoeModel` in convert_hf_to_gguf / conversion/lfm2.py, and
gguf-py's LFM2MOE tensor map):

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

The tokenizer section is llama.cpp's `no_vocab` model with `vocab_size` dummy tokens: the benchmark feeds
token ids, and llama.cpp needs no more to evaluate them.

Tensors are streamed: all tensor infos first (shapes come from the config), then one tensor at a time;
at most one stacked expert tensor (one layer's gate, up or down) is in memory at once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import gguf
import numpy as np

from ..export.config import Lfm2Config

ARCH = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LFM2MOE]  # "lfm2moe"
T = gguf.MODEL_TENSOR


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
    if cfg.model_type != "lfm2_moe":
        raise ValueError(f"model_type {cfg.model_type!r}: this writer makes lfm2moe GGUFs only")
    if cfg.conv_bias:
        raise ValueError("conv_bias: llama.cpp's lfm2moe has no short-conv biases")
    if not cfg.norm_topk_prob:
        raise ValueError("norm_topk_prob false: llama.cpp's lfm2moe always renormalises the top-k weights")
    if cfg.routed_scaling_factor != 1.0:
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
    """The keys llama.cpp's converter writes for Lfm2MoeForCausalLM (TextModel's, then LFM2MoeModel's)."""
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
    w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    w.add_leading_dense_block_count(cfg.num_dense_layers)
    w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
    # Not written by the converter and not read by llama.cpp's lfm2moe (it always renormalises); recorded
    # so the file says what it computes.
    w.add_expert_weights_norm(cfg.norm_topk_prob)
    w.add_vocab_size(cfg.vocab_size)
    w.add_shortconv_l_cache(cfg.conv_L_cache)
    # tokenizer: ids only (llama.cpp adds vocab_size dummy tokens)
    w.add_tokenizer_model("none")
    if cfg.bos_token_id is not None:
        w.add_bos_token_id(cfg.bos_token_id)
    if cfg.eos_token_id:
        w.add_eos_token_id(cfg.eos_token_id[0])
    if cfg.pad_token_id is not None:
        w.add_pad_token_id(cfg.pad_token_id)


def write_gguf(checkpoint: CheckpointLike, out_path: str | Path, f16: bool = True) -> Path:
    """Write `checkpoint` as an lfm2moe GGUF (f16 matrices when `f16`, else all f32); returns the path."""
    cfg = checkpoint.config
    _check_supported(cfg)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    entries = list(_entries(checkpoint, f16))
    writer = gguf.GGUFWriter(out_path, ARCH)
    try:
        _add_metadata(writer, cfg, f16, Path(str(getattr(checkpoint, "folder", "lfm2moe"))).name)
        for e in entries:
            itemsize = np.dtype(e.dtype).itemsize
            writer.add_tensor_info(e.name, e.shape, np.dtype(e.dtype), int(np.prod(e.shape)) * itemsize)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for e in entries:
            data = e.load()
            if data.shape != e.shape:
                raise ValueError(f"{e.name}: got shape {data.shape}, expected {e.shape}")
            writer.write_tensor_data(np.ascontiguousarray(data, dtype=e.dtype))
            del data
    finally:
        writer.close()
    return out_path
