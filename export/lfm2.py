"""The LFM2 / LFM2-MoE decoder, written once.

The same modules run three ways, depending on the `Ops` backend they are called with (see ops.py):
eagerly in torch (the reference the tests hold against transformers, and with fake-quantized weights the
reference for INT4), or traced into an ONNX graph (`onnx_ops.py`), where every op call records nodes
and every weight it touches is streamed from the checkpoint into the graph's external data.

Modules hold only names and shapes; the backend fetches a weight when an op needs it, so nothing here
holds the model in memory.

Layer (pre-norm):   h = x + mixer(operator_norm(x));   out = h + ffn(ffn_norm(h))
Conv mixer:         B, C, x = split(in_proj(x)); y = C * causal_conv(B * x); out_proj(y)
Attention mixer:    q/k/v projections, RMSNorm per head on q and k, rotary (rotate-half), GQA, out_proj
Dense FFN:          w2(silu(w1 x) * w3 x)
MoE FFN:            sigmoid router; top-k of (score + expert_bias) picks experts, the chosen scores weigh
                    them (renormalised over the k when norm_topk_prob, + 1e-6), times routed_scaling_factor
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from .config import Lfm2Config
from .ops import Ops, Tensor


@dataclass(frozen=True)
class Weight:
    name: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Linear:
    prefix: str
    in_features: int
    out_features: int
    bias: bool = False

    @property
    def weight(self) -> Weight:
        return Weight(f"{self.prefix}.weight", (self.out_features, self.in_features))

    def weights(self) -> Iterator[Weight]:
        yield self.weight
        if self.bias:
            yield Weight(f"{self.prefix}.bias", (self.out_features,))

    def __call__(self, ops: Ops, x: Tensor) -> Tensor:
        return ops.linear(x, self)


@dataclass(frozen=True)
class RMSNorm:
    prefix: str
    dim: int
    eps: float

    @property
    def weight(self) -> Weight:
        return Weight(f"{self.prefix}.weight", (self.dim,))

    def weights(self) -> Iterator[Weight]:
        yield self.weight

    def __call__(self, ops: Ops, x: Tensor) -> Tensor:
        return ops.rms_norm(x, self)


class ShortConv:
    def __init__(self, cfg: Lfm2Config, prefix: str, layer: int):
        h, k = cfg.hidden_size, cfg.conv_L_cache
        self.layer = layer
        self.hidden_size, self.kernel_size = h, k
        self.in_proj = Linear(f"{prefix}.in_proj", h, 3 * h, cfg.conv_bias)
        self.out_proj = Linear(f"{prefix}.out_proj", h, h, cfg.conv_bias)
        self.kernel = Weight(f"{prefix}.conv.weight", (h, 1, k))
        self.kernel_bias = Weight(f"{prefix}.conv.bias", (h,)) if cfg.conv_bias else None

    def weights(self) -> Iterator[Weight]:
        yield from self.in_proj.weights()
        yield self.kernel
        if self.kernel_bias:
            yield self.kernel_bias
        yield from self.out_proj.weights()

    def __call__(self, ops: Ops, x: Tensor) -> Tensor:
        # Padding rows are zeroed first (as transformers does) so they never enter the conv state.
        b, c, h = ops.split(self.in_proj(ops, ops.mask_padding(x)), 3)
        y = ops.causal_conv(ops.mul(b, h), self)
        return self.out_proj(ops, ops.mul(c, y))


class Attention:
    def __init__(self, cfg: Lfm2Config, prefix: str, layer: int):
        h, d = cfg.hidden_size, cfg.head_dim
        self.layer = layer
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, d
        self.rope_theta = cfg.rope_theta
        self.max_positions = cfg.max_position_embeddings
        self.q_proj = Linear(f"{prefix}.q_proj", h, self.num_heads * d)
        self.k_proj = Linear(f"{prefix}.k_proj", h, self.num_kv_heads * d)
        self.v_proj = Linear(f"{prefix}.v_proj", h, self.num_kv_heads * d)
        self.out_proj = Linear(f"{prefix}.out_proj", self.num_heads * d, h)
        self.q_norm = RMSNorm(f"{prefix}.q_layernorm", d, cfg.norm_eps)
        self.k_norm = RMSNorm(f"{prefix}.k_layernorm", d, cfg.norm_eps)

    def weights(self) -> Iterator[Weight]:
        for m in (self.q_proj, self.k_proj, self.v_proj, self.out_proj, self.q_norm, self.k_norm):
            yield from m.weights()

    def __call__(self, ops: Ops, x: Tensor) -> Tensor:
        d = self.head_dim
        q = self.q_norm(ops, ops.reshape(self.q_proj(ops, x), [0, 0, self.num_heads, d]))
        k = self.k_norm(ops, ops.reshape(self.k_proj(ops, x), [0, 0, self.num_kv_heads, d]))
        v = self.v_proj(ops, x)
        # rotary at each token's position, the KV cache, the causal + padding mask: the backend's
        return self.out_proj(ops, ops.attention(q, k, v, self))


class MLP:
    def __init__(self, prefix: str, hidden: int, width: int):
        self.w1 = Linear(f"{prefix}.w1", hidden, width)
        self.w3 = Linear(f"{prefix}.w3", hidden, width)
        self.w2 = Linear(f"{prefix}.w2", width, hidden)

    def weights(self) -> Iterator[Weight]:
        for m in (self.w1, self.w3, self.w2):
            yield from m.weights()

    def __call__(self, ops: Ops, x: Tensor) -> Tensor:
        return self.w2(ops, ops.mul(ops.silu(self.w1(ops, x)), self.w3(ops, x)))


class SparseMoe:
    """Routed SwiGLU experts. Expert weights are addressed per expert (`experts.{j}.w1/w3/w2`, the layout
    Liquid ships); checkpoints saved by transformers 5 hold them fused, which checkpoint.py maps."""

    def __init__(self, cfg: Lfm2Config, prefix: str):
        h, i, e = cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts
        self.prefix = prefix
        self.hidden_size, self.width, self.num_experts = h, i, e
        self.top_k = cfg.num_experts_per_tok
        self.norm_topk_prob = cfg.norm_topk_prob
        self.routed_scaling_factor = cfg.routed_scaling_factor
        self.gate = Linear(f"{prefix}.gate", h, e)
        self.expert_bias = Weight(f"{prefix}.expert_bias", (e,)) if cfg.use_expert_bias else None
        self.experts = [MLP(f"{prefix}.experts.{j}", h, i) for j in range(e)]

    def weights(self) -> Iterator[Weight]:
        yield from self.gate.weights()
        if self.expert_bias:
            yield self.expert_bias
        for expert in self.experts:
            yield from expert.weights()

    def __call__(self, ops: Ops, x: Tensor) -> Tensor:
        return ops.moe(x, self.gate(ops, x), self)


class DecoderLayer:
    def __init__(self, cfg: Lfm2Config, layer: int):
        prefix = f"model.layers.{layer}"
        self.is_attention = cfg.layer_types[layer] == "full_attention"
        self.mixer = (Attention(cfg, f"{prefix}.self_attn", layer) if self.is_attention
                      else ShortConv(cfg, f"{prefix}.conv", layer))
        self.feed_forward = (SparseMoe(cfg, f"{prefix}.feed_forward") if cfg.is_moe_layer(layer)
                             else MLP(f"{prefix}.feed_forward", cfg.hidden_size, cfg.intermediate_size))
        self.operator_norm = RMSNorm(f"{prefix}.operator_norm", cfg.hidden_size, cfg.norm_eps)
        self.ffn_norm = RMSNorm(f"{prefix}.ffn_norm", cfg.hidden_size, cfg.norm_eps)

    def weights(self) -> Iterator[Weight]:
        for m in (self.operator_norm, self.mixer, self.ffn_norm, self.feed_forward):
            yield from m.weights()

    def __call__(self, ops: Ops, x: Tensor) -> Tensor:
        h = ops.add(x, self.mixer(ops, self.operator_norm(ops, x)))
        return ops.add(h, self.feed_forward(ops, self.ffn_norm(ops, h)))


class Lfm2Model:
    """input_ids [B, S] -> logits [B, S, V]; attention mask, positions and states are the backend's."""

    def __init__(self, cfg: Lfm2Config):
        self.config = cfg
        h, v = cfg.hidden_size, cfg.vocab_size
        self.embed_tokens = Weight("model.embed_tokens.weight", (v, h))
        self.layers = [DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers)]
        self.norm = RMSNorm("model.embedding_norm", h, cfg.norm_eps)
        # Tied models read the embedding table as the LM head.
        self.lm_head = Linear("model.embed_tokens" if cfg.tie_word_embeddings else "lm_head", h, v)

    def weights(self) -> Iterator[Weight]:
        """Every tensor the model reads, in order; the exporter checks them all before heavy work."""
        yield self.embed_tokens
        for layer in self.layers:
            yield from layer.weights()
        yield from self.norm.weights()
        if not self.config.tie_word_embeddings:
            yield from self.lm_head.weights()

    def __call__(self, ops: Ops, input_ids: Tensor) -> Tensor:
        x = ops.embed(input_ids, self.embed_tokens)
        for layer in self.layers:
            x = layer(ops, x)
        # only the rows whose logits the caller wants reach the LM head (prefill needs the last one)
        return self.lm_head(ops, self.norm(ops, ops.logit_rows(x)))
