"""GGUF block types -> the kernels' block layouts (quant/blocks.py `Quantized`), from a tensor's raw bytes
[rows, bytes per row]. What is exact is decoded here; the rest gets `closest_spec`, the layout it is
re-quantized into (and conversion.py measures what that costs).

- Q4_0: a block of 32 is an fp16 scale d and 16 bytes whose low nibbles are elements 0-15 and high nibbles
  16-31, value d * (q - 8): the int4 kernels' symmetric block with its implicit zero point 8.
- Q8_0: an fp16 d and 32 int8 q, value d * q: the int8 kernels' code q + 128, zero point 128.
- Q6_K: d * scale[j] * q on sub-blocks of 16 (q 6-bit signed, scale int8): int8 block 16 with the scale
  d * scale[j] (exact in float32), at 8.5 bits instead of 6.56. Not for QMoE, whose scales are fp16.
- Q4_K: s * q - o per sub-block of 32 (s = d * scale[j], o = dmin * min[j]): int4 block 32 with the float zero
  point o / s, equal up to float rounding. Only MatMulNBits takes float zero points (and only at 4 bits).
"""

from __future__ import annotations

import gguf
import numpy as np

from ..quant.blocks import Quantized
from ..quant.policy import QuantSpec

Q = gguf.GGMLQuantizationType
FLOATS = {Q.F32: np.float32, Q.F16: np.float16, Q.F64: np.float64}
# Types with a numpy dequantizer in gguf-py: converted (re-quantized in the closest layout, error measured).
DEQUANTIZABLE = {Q(t) for t in gguf.quants._type_traits} | {Q.BF16}  # gguf-py's registry of numpy codecs
EXACT = {Q.Q4_0: 4, Q.Q8_0: 8}  # blocks of 32 the kernels (QMoE included) read as they are
_Q6_K_SCALES, _Q6_K_D = slice(192, 208), slice(208, 210)
# Re-quantized types: their bits rounded up to 4 or 8, their (sub-)block of 16 or 32, zero points searched.
_FOUR_BITS = {Q.Q4_1, Q.Q4_K, Q.Q3_K, Q.Q2_K, Q.IQ4_NL, Q.IQ4_XS, Q.IQ3_XXS, Q.IQ3_S, Q.IQ2_XXS, Q.IQ2_XS, Q.IQ2_S,
              Q.IQ1_S, Q.IQ1_M, Q.TQ1_0, Q.TQ2_0, Q.MXFP4}
_SUB_BLOCK_16 = {Q.Q2_K, Q.Q3_K, Q.Q6_K, Q.IQ2_XS, Q.IQ2_S, Q.IQ3_S}
# gguf-py's numpy codecs hold several float32 copies of what they decode: rows go through them in slices so
# that a 128K-row vocabulary costs its output, not 4x it in temporaries (the 8B export's peak RSS).
ROWS_PER_SLICE = 2048


def dequantize(raw: np.ndarray, qtype: Q) -> np.ndarray:
    """float32 [rows, K] of raw blocks [rows, bytes per row], slice by slice."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    out = np.empty((raw.shape[0], raw.shape[1] // size * block), np.float32)
    for i in range(0, raw.shape[0], ROWS_PER_SLICE):
        out[i:i + ROWS_PER_SLICE] = gguf.quants.dequantize(raw[i:i + ROWS_PER_SLICE], qtype)
    return out


def closest_spec(qtype: Q, min_block: int = 16) -> QuantSpec | None:
    """The kernel layout closest to a re-quantized block type; None for floats (the policy decides, as from
    safetensors) and for the exact types."""
    if qtype in FLOATS or qtype == Q.BF16 or qtype in EXACT:
        return None
    block = max(min_block, 16 if qtype in _SUB_BLOCK_16 else 32)
    return QuantSpec(4 if qtype in _FOUR_BITS else 8, block, "mse")


def decode(raw: np.ndarray, qtype: Q, float_zero_points: bool = False) -> Quantized | None:
    """The kernels' codes and scales for raw blocks stored exactly (see the module doc), else None."""
    if raw.shape[0] > ROWS_PER_SLICE:
        parts = [decode(raw[i:i + ROWS_PER_SLICE], qtype, float_zero_points)
                 for i in range(0, raw.shape[0], ROWS_PER_SLICE)]
        if parts[0] is None:
            return None
        zero = None if parts[0].zero_points is None else np.concatenate([p.zero_points for p in parts])
        return Quantized(np.concatenate([p.codes for p in parts]), np.concatenate([p.scales for p in parts]), zero,
                         parts[0].bits, parts[0].k)
    if qtype == Q.Q6_K:
        return _q6_k(raw)
    if qtype == Q.Q4_K and float_zero_points:  # (Q5_K would need 8 bits, where MatMulNBits refuses them)
        return _q4_k(raw)
    bits = EXACT.get(qtype)
    if bits is None:
        return None
    blocks = raw.reshape(raw.shape[0], -1, 2 + 32 * bits // 8)
    scales = blocks[..., :2].copy().view(np.float16)[..., 0].astype(np.float32)
    q = blocks[..., 2:]
    codes = np.concatenate([q & 0x0F, q >> 4], axis=-1) if bits == 4 else q ^ 0x80
    return Quantized(codes.astype(np.uint8), scales, None, bits, codes.shape[1] * codes.shape[2])


def _q6_k(raw: np.ndarray) -> Quantized:
    """Scales from the blocks, codes from gguf-py's values: value = fl(s * q) with |q| <= 32, so rint(value / s)
    is q exactly; llama.cpp multiplies in the same order, so the kernel's (code - 128) * s is the file's value."""
    n = raw.shape[0]
    blocks = raw.reshape(n, -1, gguf.GGML_QUANT_SIZES[Q.Q6_K][1])
    d = blocks[..., _Q6_K_D].copy().view(np.float16).astype(np.float32)  # [n, nb, 1]
    scales = (d * blocks[..., _Q6_K_SCALES].view(np.int8).astype(np.float32)).reshape(n, -1)  # [n, K/16]
    values = gguf.quants.dequantize(raw, Q.Q6_K).reshape(n, -1, 16)
    q = np.rint(np.divide(values, scales[..., None], out=np.zeros_like(values), where=scales[..., None] != 0))
    return Quantized((q + 128).astype(np.uint8), scales, None, 8, values.shape[1] * 16)


def _q4_k(raw: np.ndarray) -> Quantized:
    """6-bit scales and mins packed in 12 bytes (sub-blocks 0-3 in the low 6 bits of bytes 0-3 / 4-7; 4-7 in the
    nibbles of bytes 8-11 with their top 2 bits above those of 0-3 / 4-7); codes from gguf-py's values."""
    n = raw.shape[0]
    blocks = raw.reshape(n, -1, gguf.GGML_QUANT_SIZES[Q.Q4_K][1])
    d, dmin = (blocks[..., i:i + 2].copy().view(np.float16).astype(np.float32) for i in (0, 2))  # [n, nb, 1]
    low, high, extra = blocks[..., 4:8], blocks[..., 8:12], blocks[..., 12:16]
    sc = np.concatenate([low & 63, (extra & 0x0F) | ((low >> 6) << 4)], axis=-1).astype(np.float32)
    mn = np.concatenate([high & 63, (extra >> 4) | ((high >> 6) << 4)], axis=-1).astype(np.float32)
    s, o = (d * sc).reshape(n, -1), (dmin * mn).reshape(n, -1)  # [n, K/32]
    values = gguf.quants.dequantize(raw, Q.Q4_K).reshape(n, -1, 32)
    flat = s == 0  # every value is -o: code 0, zero point 1, scale o
    safe = np.where(flat, 1, s)
    q = np.where(flat[..., None], 0, np.clip(np.rint((values + o[..., None]) / safe[..., None]), 0, 15))
    zero = np.where(flat, 1, o / safe).astype(np.float32)
    return Quantized(q.astype(np.uint8), np.where(flat, o, s).astype(np.float32), zero, 4, values.shape[1] * 32)
