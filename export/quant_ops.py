"""ContribOps with quantized weights, as a quantization policy (lfm_edge.quant.policy) says.

- linears -> com.microsoft.MatMulNBits (fp32 activations; accuracy_level from the policy)
- experts -> com.microsoft.QMoE (interleaved SwiGLU, block-wise scales, fp16 to keep 4.5 bits per weight)
- embedding and LM head -> one packed table [V, nb, blob] read by GatherBlockQuantized (rows) and
  MatMulNBits (logits): no float copy of the vocabulary in the bundle. A rescoring policy adds a finer copy
  that the lookup reads and the head's top logits are recomputed from (quant/README.md, "The rescored LM head")
Weights the policy leaves alone (router gate, expert bias, norms, conv kernels) stay float32.

A checkpoint that already holds a weight in a kernel's block layout (a GGUF's Q4_0 / Q8_0, `quantized()`)
gives its blocks as they are, whatever the policy's bits and block size: re-quantizing them could only add
error. What is converted otherwise is logged with its error against the source (conversion.py).
`relayout` (the parts a GGUF's `--gguf-layout` re-lays: "experts", "linears", "vocabulary") re-quantizes those
into the policy's layout instead, from the file's values, for speed; a re-laid vocabulary's scan has its top
logits rescored from the file's own vocabulary blocks.
`written` records each part's layout as it went into the graph (the manifest's `layout`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator

import numpy as np
from onnx import TensorProto

from ..quant.blocks import Quantized, quantize
from ..quant.policy import VOCABULARY, Policy, QuantSpec
from .calibration import LayerHessians
from .checkpoint import VOCABULARY_ROWS, Checkpoint
from .config import Lfm2Config
from .conversion import ConversionLog, kernel_name
from .graph import MS, Graph
from .kv_cache import KvCache
from .lfm2 import Lfm2Model, Linear, SparseMoe, Weight
from .onnx_ops import ContribOps, WeightTransform


class QuantizedOps(ContribOps):
    def __init__(self, graph: Graph, checkpoint: Checkpoint, policy: Policy,
                 transform: WeightTransform | None = None, progress: Callable[[str], None] | None = None,
                 kv_cache: KvCache | None = None,
                 hessians: dict[str, np.ndarray] | LayerHessians | None = None,
                 relayout: frozenset[str] = frozenset(), vocabulary_rows: int = VOCABULARY_ROWS):
        super().__init__(graph, checkpoint, transform, progress, kv_cache)
        self.policy = policy
        self.relayout = relayout
        self.rows_per_slice = vocabulary_rows  # a vocabulary table is quantized this many rows at a time
        self.written: dict[str, set[str]] = {}  # part -> kernel layouts written (conversion.kernel_name)
        # calibration for `gptq` weights (export/calibration.py): a dict, or one layer's at a time as they are asked for
        self.hessians = hessians or {}
        self._quantized: dict[str, tuple[Quantized, str]] = {}
        self.conversions = ConversionLog(checkpoint)

    def native(self, name: str, float_zero_points: bool = False, copy: bool = False,
               rows: tuple[int, int] | None = None) -> Quantized | None:
        """The checkpoint's own blocks when it stores this weight in a kernel layout (and no test transform
        rewrites weights); for a part in `relayout` only as the vocabulary's rescoring `copy`. `rows` (start,
        stop): only those rows' (the vocabulary by rows)."""
        read = getattr(self.ckpt, "quantized", None)
        if read is None or self.transform is not None or (relaid(self.ckpt, self.policy, self.relayout, name)
                                                           and not copy):
            return None
        return read(name, float_zero_points, rows)

    def closest(self, names: list[str], spec: QuantSpec, min_block: int = 16) -> QuantSpec:
        """The checkpoint's layout for weights it stores in another block type (a GGUF's K-quants: their bits and
        sub-block), else the policy's: re-quantizing a 4-bit K-quant into blocks of 128 would add needless error."""
        find = getattr(self.ckpt, "closest_spec", None)
        kept = [n for n in names if not relaid(self.ckpt, self.policy, self.relayout, n)]
        specs = [s for s in (find(n, min_block) for n in kept) if s is not None] if find else []
        if not specs:
            return spec
        return QuantSpec(max(s.bits for s in specs), min(s.block_size for s in specs), "mse")

    def packed(self, weight: Weight, spec: QuantSpec, float_zero_points: bool = False,
               copy: str = "") -> tuple[Quantized, str]:
        """Quantize one 2-D weight once; its packed codes are one initializer whoever reads them.
        `float_zero_points`: the reader takes them (4-bit MatMulNBits), so a GGUF's Q4_K comes in near exactly.
        `copy` names a second quantization of the same weight (the vocabulary's rescoring copy).
        A vocabulary table goes by `rows_per_slice` rows (`by_rows`): read, quantized and written a slice at a
        time, so the export holds a slice's floats, not the table's (1 GB at LFM2.5-8B-A1B). No quantization the
        vocabulary can get looks across rows (rtn, mse and mse-sym search per block; a GGUF's blocks decode per
        row; GPTQ, whose feedback is within a row too, is refused for it by the policy), so the codes, scales
        and conversion figures are the same bits whatever the slice (tests/test_vocabulary_rows.py)."""
        key = weight.name + copy
        if key not in self._quantized:
            self.progress(key)
            spec = self.closest([weight.name], spec)
            if self.by_rows(weight, spec):
                n, step = weight.shape[0], self.rows_per_slice
                slices = (self.quantized_rows(weight, spec, float_zero_points, copy, (a, min(n, a + step)))
                          for a in range(0, n, step))
                q, native, codes = self.written_by_rows(key + ".q", n, slices)
            else:
                q, native = self.quantized_rows(weight, spec, float_zero_points, copy)
                codes = self.g.weight(key + ".q", q.packed_codes())
            if native and copy:  # the rescoring copy is the file's own blocks: the top logits exactly
                self.conversions.note(weight.name, f"top {self.policy.rescore.top} logits and the embedding rows "
                                      f"from {kernel_name(q, exact=True)}")
            self.record(part(weight.name) + (" (rescoring copy)" if copy else ""),
                        kernel_name(q, native and q.zero_points is None))
            self._quantized[key] = (_layout(q), codes)
        return self._quantized[key]

    def by_rows(self, weight: Weight, spec: QuantSpec) -> bool:
        """A vocabulary table is quantized a slice of rows at a time (`packed`) when it has more rows than a slice
        and the checkpoint reads rows (`rows`); a test's weight transform sees whole tensors."""
        return weight.name in VOCABULARY and weight.shape[0] > self.rows_per_slice and spec.method != "gptq" \
            and self.transform is None and hasattr(self.ckpt, "rows")

    def quantized_rows(self, weight: Weight, spec: QuantSpec, float_zero_points: bool, copy: str,
                       rows: tuple[int, int] | None = None) -> tuple[Quantized, bool]:
        """The weight's codes (rows start..stop, or all), and whether they are the checkpoint's own blocks (where
        it holds them in a kernel layout), else quantized by `spec`; what was converted is logged with its error
        (conversion.py). The rescoring copy's own blocks are noted by `packed`, once."""
        name = weight.name
        q = self.native(name, copy=True, rows=rows) if copy else self.native(name, float_zero_points, rows=rows)
        if q is not None and q.zero_points is not None and not copy:  # float zero points: equal up to rounding
            self.conversions.measured(name, self.read(weight, rows), q.dequantize(), kernel_name(q, exact=False),
                                      rows_of=None if rows is None else weight.shape[0])
        elif q is not None and not copy:
            self.conversions.exact(name, kernel_name(q, exact=True))
        if q is not None:
            return q, True
        array = self.read(weight, rows)
        if self.transform is not None:
            array = self.transform(name, array)
        # GPTQ fetches H itself: LayerHessians hands it over, so nothing here holds it while it is factorised
        q = quantize(array, spec.bits, spec.block_size, spec.method, hessian=lambda: self.hessians.get(name))
        if not copy and self.conversions.active:  # a float copy of the weight (1 GB for LFM2.5-8B-A1B's
            # vocabulary, 3x that while it is made): only for a checkpoint whose conversions are logged
            self.conversions.measured(name, array, q.dequantize(), kernel_name(q, exact=False),
                                      rows_of=None if rows is None else weight.shape[0])
        del array  # before packing: the float weight is 4x its codes
        return q, False

    def read(self, weight: Weight, rows: tuple[int, int] | None) -> np.ndarray:
        if rows is None:
            return self.ckpt.tensor(weight.name, weight.shape)
        return self.ckpt.rows(weight.name, *rows, shape=weight.shape)

    def written_by_rows(self, name: str, rows: int, slices: Iterator[tuple[Quantized, bool]]) \
            -> tuple[Quantized, bool, str]:
        """Each slice's packed codes written as it comes (Graph.weight_rows: the bytes of the whole table's), its
        scales and zero points gathered into the table's arrays; returns the table's layout (codes not held),
        whether it is the checkpoint's own blocks, and the codes' initializer."""
        first: list[tuple[Quantized, bool]] = []
        scales: list[np.ndarray] = []
        zero_points: list[np.ndarray] = []

        def codes() -> Iterator[np.ndarray]:
            done = 0
            for q, native in slices:
                if not first:
                    first.append((_layout(q), native))
                    scales.append(np.empty((rows, *q.scales.shape[1:]), q.scales.dtype))
                    if q.zero_points is not None:
                        zero_points.append(np.empty((rows, *q.zero_points.shape[1:]), q.zero_points.dtype))
                n = q.scales.shape[0]
                scales[0][done:done + n] = q.scales
                if zero_points:
                    zero_points[0][done:done + n] = q.zero_points
                done += n
                yield q.packed_codes()

        written = self.g.weight_rows(name, rows, codes())
        q, native = first[0]
        codes_shape = np.broadcast_to(np.zeros((), np.uint8), (rows, *q.codes.shape[1:]))  # as `_layout`'s
        return Quantized(codes_shape, scales[0], zero_points[0] if zero_points else None, q.bits, q.k), native, \
            written

    def record(self, part: str, layout: str) -> None:
        self.written.setdefault(part, set()).add(layout)

    def rescoring(self, name: str) -> bool:
        """The policy rescores this vocabulary table's top logits, and the checkpoint holds the table in floats or
        is re-laid (in `relayout`: the copy is then the file's own blocks). A GGUF read as it is keeps its blocks
        or their closest layout, and a finer copy of values the file has already rounded has nothing to recover."""
        return self.policy.rescore is not None and name in VOCABULARY and (
            part(name) in self.relayout or not stored_in_blocks(self.ckpt, name))

    def linear(self, x: str, layer: Linear) -> str:
        spec = self.policy.spec(layer.weight.name)
        if spec is None:
            return super().linear(x, layer)
        q, codes = self.packed(layer.weight, spec, float_zero_points=True)
        name = layer.weight.name
        scales = self.g.weight(name + ".scales", q.scales)
        zp = None
        if q.zero_points is not None:  # float zero points go unpacked, shaped as the scales
            floats = q.zero_points.dtype == np.float32
            zp = self.g.weight(name + ".zp", q.zero_points if floats else q.packed_zero_points())
        y = self.g.op("MatMulNBits", x, codes, scales, zp, domain=MS, K=layer.in_features,
                      N=layer.out_features, bits=q.bits, block_size=q.block_size,
                      accuracy_level=self.policy.accuracy_level)
        if layer.bias:
            y = self.g.op("Add", y, self.w(Weight(f"{layer.prefix}.bias", (layer.out_features,))))
        if self.rescoring(name):
            y = self.rescored(x, y, layer)
        return y

    def rescored(self, x: str, logits: str, head: Linear) -> str:
        """logits [B, S, V] with each row's top ones recomputed from the vocabulary's rescoring copy: TopK, the
        rows gathered from the copy, their dot products with x [B, S, H], scattered back (7 nodes, ~top x H
        bytes per row: the whole table is read once, at the scan's bits)."""
        g, top = self.g, min(self.policy.rescore.top, head.out_features)
        _, chosen = g.op("TopK", logits, g.const([top]), axis=-1, outputs=2)  # [B, S, top]
        rows = self.vocabulary_rows(chosen, head.weight, 3)  # [B, S, top, H]
        dots = g.op("ReduceSum", g.op("Mul", rows, g.op("Unsqueeze", x, g.const([2]))), g.const([-1]), keepdims=0)
        return g.op("ScatterElements", logits, chosen, dots, axis=-1)

    def vocabulary_rows(self, ids: str, table: Weight, rank: int) -> str:
        """Rows of a quantized vocabulary table for int64 ids of `rank` dims -> [*ids, H] (the rescoring copy
        when the policy has one)."""
        g = self.g
        copy = self.rescoring(table.name)
        q, codes = self.packed(table, self.policy.rescore.spec if copy else self.policy.spec(table.name),
                               copy=".rescore" if copy else "")
        # MatMulNBits' codes (the LM head's own when not a copy); per-block scales shaped [V, nb, 1] for this op
        base = table.name + (".rescore" if copy else "")
        scales = g.weight(base + ".scales3", q.scales[..., None])
        zp = None if q.zero_points is None else g.weight(base + ".zp3", q.zero_points[..., None])
        rows = g.op("GatherBlockQuantized", codes, ids, scales, zp, domain=MS, bits=q.bits,
                    block_size=q.block_size, gather_axis=0, quantize_axis=2)  # [*ids, nb, bs]
        padded = q.scales.shape[1] * q.block_size
        rows = g.op("Reshape", rows, g.const([0] * rank + [padded]))
        if padded != q.k:
            rows = g.op("Slice", rows, g.const([0]), g.const([q.k]), g.const([-1]))
        return rows

    def embed(self, ids: str, table: Weight) -> str:
        if self.policy.spec(table.name) is None:
            return super().embed(ids, table)
        return self.vocabulary_rows(ids, table, 2)

    def moe(self, x: str, router_logits: str, moe: SparseMoe) -> str:
        spec = self.policy.experts
        if spec is None:
            return super().moe(x, router_logits, moe)
        g = self.g
        if 3 in (spec.bits, spec.down_bits or spec.bits) and not self.native_expert_bits(moe):
            # onnxruntime 1.32's 3-bit QMoE (fp16) ignores normalize_routing_weights when given router_weights
            # (mixes with the raw values), so it keeps the routing this class's parent computes: the choice in
            # fp32 by TopK, router_probs log(sigmoid) at the chosen experts, the kernel's softmax over them.
            return self.routed_experts(x, router_logits, moe,
                                       lambda flat, probs: self.qmoe(flat, probs, None, moe, spec, normalize=True))
        scores = g.op("Sigmoid", g.op("Reshape", router_logits, g.const([-1, moe.num_experts])))  # [N, E]
        choice = g.op("Add", scores, self.w(moe.expert_bias)) if moe.expert_bias else scores
        scale = moe.routed_scaling_factor
        if moe.norm_topk_prob:
            y = self.qmoe(x, choice, scores, moe, spec, normalize=True)
            return y if scale == 1.0 else g.op("Mul", y, g.const(scale, np.float32))
        mixing = scores if scale == 1.0 else g.op("Mul", scores, g.const(scale, np.float32))
        return self.qmoe(x, choice, mixing, moe, spec, normalize=False)

    def qmoe(self, x: str, choice: str, mixing: str | None, moe: SparseMoe, spec: QuantSpec, normalize: bool) -> str:
        """LFM2's routing and the experts in one QMoE node, on x [B, S, H] (QMoE takes 3-D input and returns
        its shape). With router_weights (input 14) the kernel picks the top k of `choice` (sigmoid + expert
        bias) and mixes with the values of `mixing` (the sigmoids) there, divided by their sum when `normalize`:
        transformers' rule up to its + 1e-6 in that sum, a relative 1e-6 / sum(chosen sigmoids) (below fp32
        rounding unless all k chosen sigmoids are tiny), which replaces ~15 routing nodes per layer (TopK,
        gathers, scatter, log, sums) by none. Un-normalised routing mixes with the (scaled) sigmoids as they are.
        `mixing` None: x is [N, H] and `choice` the parent's routed log-probabilities (routed_experts).

        K of both matrices must be whole blocks, so H and I are padded with zero rows and columns (a zero unit
        adds silu(0) * 0 = 0). Experts the checkpoint holds in one kernel layout (GGUF Q4_0 or Q8_0 for all
        three projections) keep their blocks of 32."""
        g = self.g
        h, i = moe.hidden_size, moe.width
        native = self.native_expert_bits(moe)
        if not native:  # QMoE is run at blocks of 32 and more
            spec = self.closest([getattr(moe.experts[0], k).weight.name for k in ("w1", "w3", "w2")], spec, 32)
        bits, bs = (native, 32) if native else (spec.bits, spec.block_size)
        down_bits = bits if native else (spec.down_bits or bits)
        h_pad, i_pad = -(-h // bs) * bs, -(-i // bs) * bs
        log = self.conversions

        def names(j: int) -> dict[str, str]:
            return {k: getattr(moe.experts[j], k).weight.name for k in ("w1", "w3", "w2")}

        def fc1(j: int) -> Quantized:
            n = names(j)
            if native:
                q = _interleave_rows(self.native(n["w1"]), self.native(n["w3"]))
                log.exact(n["w1"], kernel_name(q, True))
                log.exact(n["w3"], kernel_name(q, True))
                self.record("experts", kernel_name(q, True))
                return q
            e = self.expert(moe, j)
            w = np.zeros((2 * i_pad, h_pad), np.float32)
            w[0:2 * i:2, :h], w[1:2 * i:2, :h] = e["w1"], e["w3"]  # interleaved gate/up rows
            q = quantize(w, bits, bs, spec.method, scale_dtype=np.float16)
            if log.active:
                deq = q.dequantize()
                log.measured(n["w1"], e["w1"], deq[0:2 * i:2, :h], kernel_name(q, False))
                log.measured(n["w3"], e["w3"], deq[1:2 * i:2, :h], kernel_name(q, False))
            self.record("experts", kernel_name(q, False))
            return q

        def fc2(j: int) -> Quantized:
            n = names(j)["w2"]
            if native:
                q = self.native(n)
                log.exact(n, kernel_name(q, True))
                self.record("experts", kernel_name(q, True))
                return q
            e = self.expert(moe, j)
            w = np.zeros((h_pad, i_pad), np.float32)
            w[:h, :i] = e["w2"]
            q = quantize(w, down_bits, bs, spec.method, scale_dtype=np.float16)
            if log.active:
                log.measured(n, e["w2"], q.dequantize()[:h, :i], kernel_name(q, False))
            self.record("experts", kernel_name(q, False))
            return q

        out = {which: self.quantized_experts(moe, which, make) for which, make in (("fc1", fc1), ("fc2", fc2))}
        if h_pad != h:
            rank = 3 if mixing is not None else 2
            x = g.op("Pad", x, g.const([0] * (2 * rank - 1) + [h_pad - h]))
        # onnxruntime 1.32's CPU QMoE runs 3-bit experts only on fp16 activations and raw (unprepacked) weights
        fp16 = 3 in (bits, down_bits)
        if fp16:
            x, choice = (g.op("Cast", t, to=TensorProto.FLOAT16) for t in (x, choice))
            mixing = None if mixing is None else g.op("Cast", mixing, to=TensorProto.FLOAT16)
        y = g.op("QMoE", x, choice, out["fc1"]["q"], out["fc1"]["scales"], None, out["fc2"]["q"],
                 out["fc2"]["scales"], None, None, None, None, out["fc1"]["zp"], out["fc2"]["zp"], None, mixing,
                 domain=MS, k=moe.top_k, activation_type="swiglu", swiglu_fusion=1, activation_alpha=1.0,
                 activation_beta=0.0, normalize_routing_weights=int(normalize), expert_weight_bits=bits,
                 fc2_expert_weight_bits=down_bits if down_bits != bits else None, block_size=bs,
                 weights_prepacked=0 if fp16 else None, accuracy_level=self.policy.accuracy_level)
        if fp16:
            y = g.op("Cast", y, to=TensorProto.FLOAT)
        if h_pad != h:
            y = g.op("Slice", y, g.const([0]), g.const([h]), g.const([-1]))
        return y

    def native_expert_bits(self, moe: SparseMoe) -> int | None:
        """The bits of the checkpoint's own blocks when gate, up and down are all in one kernel layout (QMoE
        takes one bit width and block size for both matrices)."""
        exact = getattr(self.ckpt, "exact_bits", None)  # block-32 types only: QMoE's scales are fp16
        names = [getattr(moe.experts[0], k).weight.name for k in ("w1", "w3", "w2")]
        if exact is None or self.transform is not None or \
                all(relaid(self.ckpt, self.policy, self.relayout, n) for n in names):
            return None
        bits = {exact(n) for n in names}
        return bits.pop() if len(bits) == 1 and None not in bits else None

    def quantized_experts(self, moe: SparseMoe, which: str, make: Callable[[int], Quantized]) -> dict[str, str | None]:
        """[E, rows, K*bits/8] codes, [E, rows, K/bs] fp16 scales (and packed zero points), streamed expert by
        expert into the external data so the export never holds a layer's experts in float."""
        prefix = f"{moe.prefix}.experts.{which}"
        self.progress(prefix)
        scales: list[np.ndarray] = []
        zero_points: list[np.ndarray | None] = []

        def codes() -> Iterator[np.ndarray]:
            for j in range(moe.num_experts):
                q = make(j)
                scales.append(q.scales.astype(np.float16))
                zero_points.append(q.packed_zero_points())
                packed = q.packed_codes()
                yield packed.reshape(packed.shape[0], -1)

        names = {"q": self.g.weight_stream(prefix + ".q", codes())}
        names["scales"] = self.g.weight(prefix + ".scales", np.stack(scales))
        names["zp"] = None if zero_points[0] is None else self.g.weight(prefix + ".zp", np.stack(zero_points))
        return names


def padding(policy: Policy, cfg: Lfm2Config) -> dict[str, float]:
    """Stored codes over the weights they hold, by part ("experts", "linears", "vocabulary") of a policy's export
    of a float checkpoint of `cfg`: a row is zero-padded to whole blocks (`quantize`), and QMoE pads both of an
    expert's widths, hidden and expert size (`QuantizedOps.qmoe`). 1.0: nothing padded. Rows narrower than the
    policy's blocks (a small model's) make a bundle bigger than its bits say."""
    def whole(width: int, block: int) -> int:
        return -(-width // block) * block

    stored: dict[str, int] = {}
    held: dict[str, int] = {}
    for w in Lfm2Model(cfg).weights():
        spec = policy.spec(w.name)
        if spec is None or len(w.shape) != 2:
            continue
        rows, k = w.shape
        part = "experts" if ".experts." in w.name else "vocabulary" if w.name in VOCABULARY else "linears"
        padded_rows = whole(rows, spec.block_size) if part == "experts" else rows
        stored[part] = stored.get(part, 0) + padded_rows * whole(k, spec.block_size)
        held[part] = held.get(part, 0) + rows * k
    return {part: stored[part] / held[part] for part in ("experts", "linears", "vocabulary") if part in stored}


def part(name: str) -> str:
    """The part of the model a weight belongs to, as the manifest's `layout` names it."""
    return "experts" if ".experts." in name else "vocabulary" if name in VOCABULARY else "linears"


def relaid(checkpoint: Checkpoint, policy: Policy, relayout: frozenset[str], name: str) -> bool:
    """This weight is re-quantized into the policy's layout (a GGUF's --gguf-layout): its part is re-laid, and the
    file stores it at no more bits than the policy's, so a Q8_0 linear keeps its 8 bits; the vocabulary's scan is
    re-laid whatever its bits (its top logits come from the file's blocks)."""
    kind = part(name)
    if kind not in relayout:
        return False
    spec = policy.spec(name)
    if kind == "vocabulary" or spec is None:
        return spec is not None
    exact = getattr(checkpoint, "exact_bits", None)
    closest = getattr(checkpoint, "closest_spec", None)
    stored = (exact(name) if exact else None) or getattr(closest(name) if closest else None, "bits", None)
    return stored is None or stored <= spec.bits


def stored_in_blocks(checkpoint: Checkpoint, name: str) -> bool:
    """The checkpoint holds this weight quantized already (a GGUF's block types): its blocks are read as they are
    or converted to their closest layout, whatever the policy's method."""
    layouts = [getattr(checkpoint, method, None) for method in ("exact_bits", "closest_spec")]
    return any(find is not None and find(name) is not None for find in layouts)


def _layout(q: Quantized) -> Quantized:
    """`q` without its codes, which are in the external data once packed: what a second reader of the same weight
    needs (scales, zero points, bits, block size, width) at none of the codes' memory (1 byte per weight; the
    vocabulary's two copies are 0.5 GB at LFM2.5-8B-A1B)."""
    return dataclasses.replace(q, codes=np.broadcast_to(np.zeros((), np.uint8), q.codes.shape))


def _interleave_rows(gate: Quantized, up: Quantized) -> Quantized:
    """fc1's rows gate0, up0, gate1, up1, ... (SwiGLU fusion 1), from two blocks-as-stored weights."""
    codes = np.stack([gate.codes, up.codes], axis=1).reshape(-1, *gate.codes.shape[1:])
    scales = np.stack([gate.scales, up.scales], axis=1).reshape(-1, gate.scales.shape[1])
    return Quantized(codes, scales, None, gate.bits, gate.k)
