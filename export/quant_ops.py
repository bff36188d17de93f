"""ContribOps with quantized weights, as a quantization policy (lfm_edge.quant.policy) says.

- linears -> com.microsoft.MatMulNBits (fp32 activations; accuracy_level from the policy)
- experts -> com.microsoft.QMoE (interleaved SwiGLU, block-wise scales, fp16 to keep 4.5 bits per weight)
- embedding and LM head -> one packed table [V, nb, blob] read by GatherBlockQuantized (rows) and
  MatMulNBits (logits): no float copy of the vocabulary in the bundle
Weights the policy leaves alone (router gate, expert bias, norms, conv kernels) stay float32.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np

from ..quant.blocks import Quantized, quantize
from ..quant.policy import Policy, QuantSpec
from .checkpoint import Checkpoint
from .graph import MS, Graph
from .kv_cache import KvCache
from .lfm2 import Linear, SparseMoe, Weight
from .onnx_ops import ContribOps, WeightTransform


class QuantizedOps(ContribOps):
    def __init__(self, graph: Graph, checkpoint: Checkpoint, policy: Policy,
                 transform: WeightTransform | None = None, progress: Callable[[str], None] | None = None,
                 kv_cache: KvCache | None = None):
        super().__init__(graph, checkpoint, transform, progress, kv_cache)
        self.policy = policy
        self._quantized: dict[str, tuple[Quantized, str]] = {}

    def packed(self, weight: Weight, spec: QuantSpec) -> tuple[Quantized, str]:
        """Quantize one 2-D weight once; its packed codes are one initializer whoever reads them."""
        if weight.name not in self._quantized:
            self.progress(weight.name)
            array = self.ckpt.tensor(weight.name, weight.shape)
            if self.transform is not None:
                array = self.transform(weight.name, array)
            q = quantize(array, spec.bits, spec.block_size, spec.method)
            self._quantized[weight.name] = (q, self.g.weight(weight.name + ".q", q.packed_codes()))
        return self._quantized[weight.name]

    def linear(self, x: str, layer: Linear) -> str:
        spec = self.policy.spec(layer.weight.name)
        if spec is None:
            return super().linear(x, layer)
        q, codes = self.packed(layer.weight, spec)
        name = layer.weight.name
        scales = self.g.weight(name + ".scales", q.scales)
        zp = None if q.zero_points is None else self.g.weight(name + ".zp", q.packed_zero_points())
        y = self.g.op("MatMulNBits", x, codes, scales, zp, domain=MS, K=layer.in_features,
                      N=layer.out_features, bits=spec.bits, block_size=spec.block_size,
                      accuracy_level=self.policy.accuracy_level)
        if layer.bias:
            y = self.g.op("Add", y, self.w(Weight(f"{layer.prefix}.bias", (layer.out_features,))))
        return y

    def embed(self, ids: str, table: Weight) -> str:
        spec = self.policy.spec(table.name)
        if spec is None:
            return super().embed(ids, table)
        g = self.g
        q, codes = self.packed(table, spec)
        # the same codes as the LM head's MatMulNBits; per-block scales shaped [V, nb, 1] for this op
        scales = g.weight(table.name + ".scales3", q.scales[..., None])
        zp = None if q.zero_points is None else g.weight(table.name + ".zp3", q.zero_points[..., None])
        rows = g.op("GatherBlockQuantized", codes, ids, scales, zp, domain=MS, bits=spec.bits,
                    block_size=spec.block_size, gather_axis=0, quantize_axis=2)  # [B, S, nb, bs]
        padded = q.scales.shape[1] * spec.block_size
        rows = g.op("Reshape", rows, g.const([0, 0, padded]))
        if padded != q.k:
            rows = g.op("Slice", rows, g.const([0]), g.const([q.k]), g.const([-1]))
        return rows

    def moe(self, x: str, router_logits: str, moe: SparseMoe) -> str:
        spec = self.policy.experts
        if spec is None:
            return super().moe(x, router_logits, moe)
        return self.routed_experts(x, router_logits, moe, lambda flat, probs: self.qmoe(flat, probs, moe, spec))

    def qmoe(self, flat: str, probs: str, moe: SparseMoe, spec: QuantSpec) -> str:
        """QMoE over [N, H'] inputs (H' = H padded to whole blocks); K of both matrices must be whole blocks,
        so padding rows and columns are zeros (a zero unit adds silu(0) * 0 = 0)."""
        g, bs = self.g, spec.block_size
        h, i = moe.hidden_size, moe.width
        h_pad, i_pad = -(-h // bs) * bs, -(-i // bs) * bs

        def fc1(e: dict) -> np.ndarray:
            w = np.zeros((2 * i_pad, h_pad), np.float32)
            w[0:2 * i:2, :h], w[1:2 * i:2, :h] = e["w1"], e["w3"]  # interleaved gate/up rows
            return w

        def fc2(e: dict) -> np.ndarray:
            w = np.zeros((h_pad, i_pad), np.float32)
            w[:h, :i] = e["w2"]
            return w

        names = {}
        for which, layout in (("fc1", fc1), ("fc2", fc2)):
            names[which] = self.quantized_experts(moe, which, layout, spec)
        if h_pad != h:
            flat = g.op("Pad", flat, g.const([0, 0, 0, h_pad - h]))
        y = g.op("QMoE", flat, probs, names["fc1"]["q"], names["fc1"]["scales"], None, names["fc2"]["q"],
                 names["fc2"]["scales"], None, None, None, None, names["fc1"]["zp"], names["fc2"]["zp"], domain=MS,
                 k=moe.top_k, activation_type="swiglu", swiglu_fusion=1, activation_alpha=1.0, activation_beta=0.0,
                 normalize_routing_weights=1, expert_weight_bits=spec.bits, block_size=bs,
                 accuracy_level=self.policy.accuracy_level)
        if h_pad != h:
            y = g.op("Slice", y, g.const([0]), g.const([h]), g.const([-1]))
        return y

    def quantized_experts(self, moe: SparseMoe, which: str, layout: Callable[[dict], np.ndarray],
                          spec: QuantSpec) -> dict[str, str | None]:
        """[E, rows, K*bits/8] codes, [E, rows, K/bs] fp16 scales (and packed zero points), streamed expert by
        expert into the external data so the export never holds a layer's experts in float."""
        prefix = f"{moe.prefix}.experts.{which}"
        self.progress(prefix)
        scales: list[np.ndarray] = []
        zero_points: list[np.ndarray | None] = []

        def codes() -> Iterator[np.ndarray]:
            for j in range(moe.num_experts):
                q = quantize(layout(self.expert(moe, j)), spec.bits, spec.block_size, spec.method,
                             scale_dtype=np.float16)
                scales.append(q.scales.astype(np.float16))
                zero_points.append(q.packed_zero_points())
                packed = q.packed_codes()
                yield packed.reshape(packed.shape[0], -1)

        names = {"q": self.g.weight_stream(prefix + ".q", codes())}
        names["scales"] = self.g.weight(prefix + ".scales", np.stack(scales))
        names["zp"] = None if zero_points[0] is None else self.g.weight(prefix + ".zp", np.stack(zero_points))
        return names
