"""The contract between the model definition (lfm2.py) and the backends that run or trace it.

`Tensor` is whatever the backend computes with: a torch tensor in the reference, a value name in the
ONNX graph. Shapes follow the model: activations are [B, S, ...]; `reshape` takes ONNX's rules (0 keeps
the input's dimension, -1 infers one). What depends on more than one token (positions, the padding mask,
the conv and KV caches) is kept by the backend, keyed by the module's `layer`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from .lfm2 import Attention, Linear, RMSNorm, ShortConv, SparseMoe, Weight

Tensor = Any


class Ops(Protocol):
    def embed(self, ids: Tensor, table: Weight) -> Tensor:
        """Rows of `table` [V, H] for int64 ids [B, S]."""

    def linear(self, x: Tensor, layer: Linear) -> Tensor:
        """x @ W.T (+ b) over the last axis."""

    def rms_norm(self, x: Tensor, norm: RMSNorm) -> Tensor:
        """w * x * rsqrt(mean(x^2, last axis) + eps), computed in float32."""

    def add(self, a: Tensor, b: Tensor) -> Tensor: ...

    def mul(self, a: Tensor, b: Tensor) -> Tensor: ...

    def silu(self, x: Tensor) -> Tensor: ...

    def split(self, x: Tensor, parts: int) -> list[Tensor]:
        """Equal parts along the last axis."""

    def reshape(self, x: Tensor, shape: list[int]) -> Tensor: ...

    def mask_padding(self, x: Tensor) -> Tensor:
        """x with the rows of padding tokens (attention_mask 0) set to zero."""

    def causal_conv(self, x: Tensor, conv: ShortConv) -> Tensor:
        """Depthwise causal conv over time of x [B, S, H] with kernel [H, 1, K], continuing from the layer's
        state (the last K-1 inputs, zeros at the start) and updating it."""

    def attention(self, q: Tensor, k: Tensor, v: Tensor, attn: Attention) -> Tensor:
        """q [B, S, Hq, D] and k [B, S, Hkv, D] (already normed), v [B, S, Hkv*D] -> [B, S, Hq*D]:
        rotary at each token's position (count of unpadded tokens before it), then causal grouped-query
        attention over the layer's cache plus these tokens, padding keys masked, scale D^-0.5."""

    def logit_rows(self, x: Tensor) -> Tensor:
        """x [B, S, H] -> the rows logits are computed for: all of them, or (graphs with the `logits_to_keep`
        input) the last n when the caller asks for n."""

    def moe(self, x: Tensor, router_logits: Tensor, moe: SparseMoe) -> Tensor:
        """LFM2 routing (lfm2.py's docstring) over router_logits [B, S, E], then the weighted sum of the
        chosen experts' SwiGLU outputs."""
