"""Eager torch execution of the model definition: the reference every export is checked against.

Tests hold this against transformers (exact fp32), and against the ONNX exports; with a weight transform
(fake quantization) it is the reference for quantized exports. Readability beats speed here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from ..quant.policy import VOCABULARY
from .checkpoint import VOCABULARY_ROWS, Checkpoint
from .lfm2 import Attention, Lfm2Model, Linear, RMSNorm, ShortConv, SparseMoe, Weight

WeightTransform = Callable[[str, np.ndarray], np.ndarray]


@dataclass
class TorchState:
    """Caches carried between calls: conv inputs [B, H, K-1], keys/values [B, Hkv, T, D], the mask so far."""

    mask: torch.Tensor
    conv: dict[int, torch.Tensor] = field(default_factory=dict)
    key: dict[int, torch.Tensor] = field(default_factory=dict)
    value: dict[int, torch.Tensor] = field(default_factory=dict)


class TorchReference:
    """`rescore` (top, transform): the LM head's `top` largest logits per row recomputed from the vocabulary
    table through that second transform, which the embedding lookup also reads (quant.policy.Rescore)."""

    def __init__(self, checkpoint: Checkpoint, transform: WeightTransform | None = None,
                 rescore: tuple[int, WeightTransform] | None = None):
        self.checkpoint = checkpoint
        self.model = Lfm2Model(checkpoint.config)
        self.transform = transform
        self.rescore = rescore
        self._weights: dict[tuple[str, bool], torch.Tensor] = {}

    def weight(self, w: Weight, rescore_copy: bool = False) -> torch.Tensor:
        key = (w.name, rescore_copy)
        if key not in self._weights:
            array = self.checkpoint.tensor(w.name, w.shape)
            transform = self.rescore[1] if rescore_copy else self.transform
            if transform is not None:
                array = transform(w.name, array)
            self._weights[key] = torch.from_numpy(np.array(array, dtype=np.float32))
        return self._weights[key]

    def embedding(self, ids: torch.Tensor, table: Weight, rescore_copy: bool = False) -> torch.Tensor:
        """The rows of `table` that `ids` name."""
        return F.embedding(ids, self.weight(table, rescore_copy))

    def logits(self, x: torch.Tensor, head: Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x @ head^T (+ bias): the LM head's logits (before any rescoring)."""
        return F.linear(x, self.weight(head), bias)

    def new_state(self, batch: int) -> TorchState:
        cfg = self.checkpoint.config
        state = TorchState(mask=torch.zeros(batch, 0, dtype=torch.int64))
        for i in cfg.conv_layers:
            state.conv[i] = torch.zeros(batch, cfg.hidden_size, cfg.conv_L_cache - 1)
        for i in cfg.attention_layers:
            state.key[i] = torch.zeros(batch, cfg.num_key_value_heads, 0, cfg.head_dim)
            state.value[i] = torch.zeros(batch, cfg.num_key_value_heads, 0, cfg.head_dim)
        return state

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, state: TorchState, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, S, V] for the new tokens; `mask` [B, S] marks their padding (default: none)."""
        if mask is None:
            mask = torch.ones_like(input_ids)
        state.mask = torch.cat([state.mask, mask.to(torch.int64)], dim=1)
        return self.model(_TorchOps(self, state), input_ids)

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, mask: torch.Tensor | None = None,
                 eos: tuple[int, ...] = ()) -> torch.Tensor:
        """Greedy tokens [B, N] after the prompt (left-padded when `mask` says so)."""
        state = self.new_state(input_ids.shape[0])
        logits = self.forward(input_ids, state, mask)
        out = []
        for _ in range(max_new_tokens):
            token = logits[:, -1].argmax(-1, keepdim=True)
            out.append(token)
            if eos and all(int(t) in eos for t in token):
                break
            logits = self.forward(token, state)
        return torch.cat(out, dim=1)


class StreamingReference(TorchReference):
    """Reads every tensor from the checkpoint when it is used, keeping none: one calibration pass over a model
    larger than memory (the full LFM2.5-8B-A1B is 33 GB in fp32) holds one tensor at a time."""

    def weight(self, w: Weight, rescore_copy: bool = False) -> torch.Tensor:
        array = np.asarray(self.checkpoint.tensor(w.name, w.shape), dtype=np.float32)
        # a copy only of what torch may not write to (a mapped file's pages); an array made for this call is used
        return torch.from_numpy(array if array.flags.writeable else array.copy())

    def embedding(self, ids: torch.Tensor, table: Weight, rescore_copy: bool = False) -> torch.Tensor:
        """The rows `ids` name, gathered from the table read a slice of rows at a time (`Checkpoint.rows`): the same
        values as the whole table's lookup, without the whole table (1 GB at LFM2.5-8B-A1B)."""
        read = getattr(self.checkpoint, "rows", None)
        if read is None or rescore_copy or self.transform is not None:
            return super().embedding(ids, table, rescore_copy)
        wanted, where = torch.unique(ids, return_inverse=True)  # sorted
        found = torch.empty(len(wanted), table.shape[1])
        bounds = torch.searchsorted(wanted, torch.arange(0, table.shape[0] + VOCABULARY_ROWS, VOCABULARY_ROWS))
        for i, (lo, hi) in enumerate(zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True)):
            if lo < hi:  # a slice some id falls in
                start = i * VOCABULARY_ROWS
                part = read(table.name, start, min(table.shape[0], start + VOCABULARY_ROWS), table.shape)
                found[lo:hi] = torch.from_numpy(np.ascontiguousarray(part[wanted[lo:hi].numpy() - start]))
        return F.embedding(where, found)

    def logits(self, x: torch.Tensor, head: Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
        """The LM head's logits a slice of its rows at a time. The calibration passes, this class's users, read no
        logit (KV scales and GPTQ's H are taken inside the layers); the slices keep their 1 GB table out of memory."""
        read = getattr(self.checkpoint, "rows", None)
        if read is None or self.transform is not None:
            return super().logits(x, head, bias)
        n, step = head.shape[0], VOCABULARY_ROWS
        return torch.cat([F.linear(x, torch.from_numpy(read(head.name, a, min(n, a + step), head.shape)),
                                   None if bias is None else bias[a:a + step]) for a in range(0, n, step)], dim=-1)

    @torch.no_grad()
    def record(self, ops: type[_TorchOps], input_ids: torch.Tensor) -> None:
        """One pass of unpadded ids [B, S] through the model with `ops`, a _TorchOps subclass that records what a
        calibration needs (kv_cache.py, calibration.py)."""
        state = self.new_state(input_ids.shape[0])
        state.mask = torch.ones_like(input_ids)
        self.model(ops(self, state), input_ids)


class _TorchOps:
    """ops.Ops in eager torch, for one forward call."""

    def __init__(self, ref: TorchReference, state: TorchState):
        self.ref, self.w, self.state, self.rescore = ref, ref.weight, state, ref.rescore

    def embed(self, ids, table: Weight):
        return self.ref.embedding(ids, table, rescore_copy=self.rescore is not None)

    def linear(self, x, layer: Linear):
        bias = self.w(Weight(f"{layer.prefix}.bias", (layer.out_features,))) if layer.bias else None
        if layer.weight.name not in VOCABULARY:
            return F.linear(x, self.w(layer.weight), bias)
        y = self.ref.logits(x, layer.weight, bias)
        if self.rescore is None:
            return y
        top = y.topk(min(self.rescore[0], y.shape[-1]), dim=-1).indices  # [B, S, top]
        rows = self.w(layer.weight, rescore_copy=True)[top]  # [B, S, top, H]
        return y.scatter(-1, top, (rows * x[..., None, :]).sum(-1))

    def rms_norm(self, x, norm: RMSNorm):
        return self.w(norm.weight) * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps))

    def add(self, a, b):
        return a + b

    def mul(self, a, b):
        return a * b

    def silu(self, x):
        return F.silu(x)

    def split(self, x, parts: int):
        return list(x.chunk(parts, dim=-1))

    def reshape(self, x, shape: list[int]):
        return x.reshape([x.shape[i] if d == 0 else d for i, d in enumerate(shape)])

    def mask_padding(self, x):
        return x * self.state.mask[:, -x.shape[1]:, None].to(x.dtype)

    def causal_conv(self, x, conv: ShortConv):
        s = x.shape[1]
        full = torch.cat([self.state.conv[conv.layer], x.transpose(1, 2)], dim=2)
        self.state.conv[conv.layer] = full[:, :, -(conv.kernel_size - 1):]
        bias = self.w(conv.kernel_bias) if conv.kernel_bias else None
        y = F.conv1d(full, self.w(conv.kernel), bias, groups=conv.hidden_size)
        return y[:, :, -s:].transpose(1, 2)

    def attention(self, q, k, v, attn: Attention):
        b, s, _, d = q.shape
        mask = self.state.mask  # [B, P + S]
        total = mask.shape[1]
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -s:]
        inv_freq = 1.0 / (attn.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float) / d))
        freqs = positions[..., None].float() * inv_freq
        cos, sin = torch.cat([freqs, freqs], -1).cos()[:, None], torch.cat([freqs, freqs], -1).sin()[:, None]
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        v = v.reshape(b, s, attn.num_kv_heads, d).transpose(1, 2)
        i = attn.layer
        k = self.state.key[i] = torch.cat([self.state.key[i], k], dim=2)
        v = self.state.value[i] = torch.cat([self.state.value[i], v], dim=2)
        groups = attn.num_heads // attn.num_kv_heads
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        query_pos = torch.arange(total - s, total)[:, None]
        allowed = (torch.arange(total)[None, :] <= query_pos)[None] & (mask[:, None, :] == 1)  # [B, S, T]
        scores = (q @ k.transpose(-1, -2)) * d**-0.5
        # A finite floor, not -inf: a padding query sees no key, and its row must stay finite, not NaN.
        scores = scores.masked_fill(~allowed[:, None], torch.finfo(scores.dtype).min)
        out = scores.softmax(-1) @ v
        return out.transpose(1, 2).reshape(b, s, attn.num_heads * d)

    def logit_rows(self, x):
        return x

    def moe(self, x, router_logits, moe: SparseMoe):
        shape = x.shape
        x, scores = x.reshape(-1, shape[-1]), router_logits.reshape(-1, moe.num_experts).sigmoid()
        choice = scores + self.w(moe.expert_bias) if moe.expert_bias else scores
        chosen = choice.topk(moe.top_k, dim=-1).indices
        weights = scores.gather(1, chosen)
        if moe.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-6)
        weights = weights * moe.routed_scaling_factor
        out = torch.zeros_like(x)
        for j, expert in enumerate(moe.experts):
            hit = chosen == j  # [N, k]
            rows = hit.any(-1).nonzero()[:, 0]
            if len(rows):
                y = expert(self, x[rows])
                out[rows] += y * (weights[rows] * hit[rows]).sum(-1, keepdim=True)
        return out.reshape(shape)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)
