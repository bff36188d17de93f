"""Named quantization policies: which weights are quantized, to how many bits, in what blocks, how.

Decode reads every active weight once per token, so bits per weight are speed on a phone. What stays
precise does so because measurement or the model's structure says it matters: the router gate and the
expert bias choose experts (a flipped choice changes the whole FFN output), and norms and conv kernels
are a negligible share of the bytes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import numpy as np

from .blocks import BITS, METHODS, quantize


@dataclass(frozen=True)
class QuantSpec:
    bits: int = 4
    block_size: int = 32
    method: str = "rtn"
    down_bits: int | None = None  # experts only: w2 (QMoE's fc2) at other bits than w1/w3 (fc1)

    def __post_init__(self):
        for bits in (self.bits, self.down_bits or self.bits):
            if bits not in BITS:
                raise ValueError(f"bits {bits}: expected one of {BITS}")
        if self.block_size < 16 or self.block_size > 256 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block size {self.block_size}: expected 16, 32, 64, 128 or 256")
        if self.method not in METHODS:
            raise ValueError(f"method {self.method!r}: expected one of {METHODS}")


VOCABULARY = ("model.embed_tokens.weight", "lm_head.weight")


@dataclass(frozen=True)
class Rescore:
    """The LM head scans the whole vocabulary at the policy's `embedding` spec, then recomputes each row's `top`
    largest logits from a second copy of the table at `spec`, which the embedding lookup also reads. Most of
    what a sampled or greedy token depends on is in those few logits: on the quality model the top 32 at
    8 bits recover nearly all of an 8-bit head's KL at the 4-bit head's bytes per token, and the top 64 what
    scanning at block 256 instead of 32 or 128 loses (quant/README.md)."""

    top: int = 64
    spec: QuantSpec = QuantSpec(8, 128, "rtn")


@dataclass(frozen=True)
class Policy:
    name: str
    experts: QuantSpec | None  # MoE expert w1/w3/w2 (QMoE)
    linears: QuantSpec | None  # conv in/out, attention q/k/v/out, dense FFN (MatMulNBits)
    embedding: QuantSpec | None  # the embedding table and LM head (tied: one shared copy)
    accuracy_level: int = 4  # MatMulNBits/QMoE: 4 = int8 activations (fastest on CPU); 0 = fp32
    rescore: Rescore | None = None  # the LM head's top logits again from a finer copy (needs `embedding`)

    def __post_init__(self):
        if self.rescore is not None and self.embedding is None:
            raise ValueError(f"policy {self.name!r}: rescoring the LM head needs a quantized vocabulary (embedding)")
        for what in ("experts", "embedding"):
            if getattr(self, what) is not None and getattr(self, what).method == "gptq":
                raise ValueError(f"policy {self.name!r}: method 'gptq' is for the linears, not the {what}")

    def spec(self, weight_name: str) -> QuantSpec | None:
        """The spec for one checkpoint tensor, or None when it stays float32."""
        if not weight_name.endswith(".weight") or weight_name.endswith(("norm.weight", "layernorm.weight")):
            return None
        if weight_name.endswith((".feed_forward.gate.weight", ".conv.conv.weight")):
            return None  # router (selection is sensitive) and depthwise conv kernels (tiny)
        if ".experts." in weight_name:
            if self.experts and self.experts.down_bits and weight_name.endswith(".w2.weight"):
                return replace(self.experts, bits=self.experts.down_bits, down_bits=None)
            return self.experts
        if weight_name in VOCABULARY:
            return self.embedding
        return self.linears

    def with_overrides(self, block_size: int | None = None, method: str | None = None,
                       accuracy_level: int | None = None) -> Policy:
        def over(spec: QuantSpec | None, calibrated: bool = False) -> QuantSpec | None:
            if spec is None:
                return None
            chosen = "mse" if method == "gptq" and not calibrated else method  # GPTQ is the linears'; mse's grid
            return replace(spec, block_size=block_size or spec.block_size, method=chosen or spec.method)

        return replace(self, experts=over(self.experts), linears=over(self.linears, True),
                       embedding=over(self.embedding),
                       accuracy_level=self.accuracy_level if accuracy_level is None else accuracy_level)

    def describe(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        """One line a reader can check against the manifest: each part's bits, block and method."""
        def part(name: str, spec: QuantSpec | None) -> str:
            if spec is None:
                return f"{name} fp32"
            down = f"/{spec.down_bits}" if spec.down_bits else ""
            return f"{name} {spec.bits}{down}-bit b{spec.block_size} {spec.method}"

        head = part("vocabulary", self.embedding) + (
            f", top {self.rescore.top} rescored at {self.rescore.spec.bits}-bit" if self.rescore else "")
        return f"{part('experts', self.experts)}, {part('linears', self.linears)}, {head}"

    def fake_quant(self, name: str, array: np.ndarray, hessians: dict[str, np.ndarray] | None = None) -> np.ndarray:
        """The weight as the quantized graph sees it (quantize, then dequantize): the reference transform.
        `hessians`: the calibration the export used, for `gptq` weights (export/calibration.py)."""
        spec = self.spec(name)
        if spec is None:
            return array
        q = quantize(array.reshape(array.shape[0], -1), spec.bits, spec.block_size, spec.method,
                     scale_dtype=scale_dtype(weight_name=name), hessian=(hessians or {}).get(name))
        return q.dequantize().reshape(array.shape)

    def calibrated(self, name: str) -> bool:
        """This weight's codes depend on calibration inputs (method `gptq`)."""
        spec = self.spec(name)
        return spec is not None and spec.method == "gptq"

    def fake_quant_rescore(self, name: str, array: np.ndarray) -> np.ndarray:
        """The rescoring copy of a vocabulary table as the graph sees it (the embedding lookup and the top logits)."""
        spec = self.rescore.spec
        return quantize(array, spec.bits, spec.block_size, spec.method).dequantize()


def scale_dtype(weight_name: str) -> type:
    """QMoE keeps expert scales in fp16 (4.5 bits per weight at block 32); MatMulNBits needs them in the
    activation type, fp32."""
    return np.float16 if ".experts." in weight_name else np.float32


# Block size is decode speed: onnxruntime repacks 4-bit weights at load into its kernels' layout, which adds
# an fp32 scale and an fp32 block sum per block, so decode streams 6 bits per weight at block 32, 4.5 at block 128
# and 4.25 at block 256, and the kernels' per-block work shrinks with the blocks too. One QMoE layer at
# LFM2.5-8B-A1B widths, 2 threads: block 256 takes 0.86x the time of block 128; one MatMulNBits 2048 x 6144 0.85x,
# block 32 1.46x (quant/README.md). On the quality model the experts and the vocabulary scan lose nothing
# measurable at block 256 once the head's top 64 logits are rescored; the dense linears are where 4-bit error
# costs (KL at block 256 0.042 against 0.038 at 128), so they stay at 128 (GPTQ). The MSE clipping search beats
# RTN at every block size (KL to fp32 0.063 vs 0.092 at block 128).
INT4 = QuantSpec(4, 256, "mse")
# The linears' codes by GPTQ (quant/blocks.py gptq) from calibration text, in the same layout: on the quality model
# int4's KL 0.044 -> 0.036, below llama.cpp Q4_0's 0.037, at the same bytes (quant/README.md).
INT4_LINEARS = QuantSpec(4, 128, "gptq")
INT4_VOCAB = QuantSpec(4, 256, "mse")
INT8 = QuantSpec(8, 32, "rtn")
POLICIES: dict[str, Policy] = {
    "fp32": Policy("fp32", None, None, None),
    "int4": Policy("int4", experts=INT4, linears=INT4_LINEARS, embedding=INT4_VOCAB, rescore=Rescore()),
    # closer to fp32 for ~1.2x the bytes per token: smaller blocks, and 8 bits for the vocabulary (every logit
    # reads it). Dominated since GPTQ and the rescored head (int4-fine is closer for fewer bytes); kept for
    # bundles and scripts that name it
    "int4-hq": Policy("int4-hq", experts=QuantSpec(4, 64, "mse"), linears=QuantSpec(4, 64, "mse"),
                      embedding=QuantSpec(8, 128, "rtn")),
    # int4 with the dense linears at block 32 (GPTQ): on the quality model (quant/README.md) the linears at block
    # 128 are where int4's KL comes from; this is as close to fp32 as llama.cpp's Q4_K_M (KL 0.0273 against
    # 0.0277) for 5% more bytes per token than int4
    "int4-fine": Policy("int4-fine", experts=INT4, linears=QuantSpec(4, 32, "gptq"), embedding=INT4_VOCAB,
                        rescore=Rescore()),
    "int8": Policy("int8", experts=INT8, linears=INT8, embedding=INT8),
    # Experts are 56% of the bytes a token reads at LFM2.5-8B-A1B geometry (int4), so they are where fewer bits pay.
    # QMoE on onnxruntime 1.32's CPU: 2 bits runs on int8 activations, 0.74-0.86x the time of 4 bits at block 128
    # per layer, about what int4's block 256 takes; 3 bits runs only with fp16 activations and unprepacked weights
    # (a dequantizing path, measured 4-7x slower per layer than 4 bits: quant/README.md), and takes no zero points,
    # hence the symmetric search.
    "int3-experts": Policy("int3-experts", experts=QuantSpec(3, 64, "mse-sym"), linears=INT4_LINEARS,
                           embedding=INT4_VOCAB, rescore=Rescore()),
    "int2-experts": Policy("int2-experts", experts=QuantSpec(2, 64, "mse"), linears=INT4_LINEARS,
                           embedding=INT4_VOCAB, rescore=Rescore()),
    # w2 (the down projection) at 4 bits, gate/up at 3: onnxruntime 1.32's CPU QMoE refuses mixed widths, so this
    # is refused at export (export/kernel_support.py) until an onnxruntime runs it
    "int3-experts-down4": Policy("int3-experts-down4", experts=QuantSpec(3, 64, "mse-sym", down_bits=4),
                                 linears=INT4_LINEARS, embedding=INT4_VOCAB, rescore=Rescore()),
}


def get_policy(name: str) -> Policy:
    if name not in POLICIES:
        raise ValueError(f"--quant {name!r}: expected one of {sorted(POLICIES)}")
    return POLICIES[name]
