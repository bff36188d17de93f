"""Block-wise weight quantization in the layouts onnxruntime's kernels read.

A weight [N, K] (N output rows, K inputs) is cut along K into blocks of `block_size`; each block gets a
float scale and, when asymmetric, a zero point: w ~ (q - zero_point) * scale with q in [0, 2^bits).
Symmetric blocks use the kernels' implicit zero point 2^(bits-1). K is zero-padded to whole blocks.

Packing (MatMulNBits, QMoE, GatherBlockQuantized alike): codes of one row are contiguous along K,
LSB first (for 4 bits the low nibble holds the even element); zero points pack the same way over blocks.
2 and 3 bits are the same LSB-first bit stream (QMoE's INT3 profile: row-local, no padding per block; a
block of 16 or more 3-bit codes is whole bytes, so per-block and per-row streams are the same bytes).

Methods:
- `rtn`       round to nearest, symmetric (scale = max|w| / (2^(bits-1) - 1))
- `rtn-asym`  round to nearest over [min, max]
- `mse`       asymmetric with the clipping range searched per block to minimise squared error
              (the range shrunk towards its centre by a grid of ratios; the best per block is kept)
- `mse-sym`   symmetric (the kernel's implicit zero point) with the clipping scale searched the same way:
              for kernels that take no zero points, such as QMoE at 3 bits
- `gptq`      `mse`'s grid, codes chosen with error feedback from calibration inputs (`gptq` below; needs
              the layer's `hessian`)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .lapack import inverse_cholesky

METHODS = ("rtn", "rtn-asym", "mse", "mse-sym", "gptq")
BITS = (2, 3, 4, 8)
_MSE_RATIOS = np.linspace(1.0, 0.7, 7, dtype=np.float32)


@dataclass(frozen=True)
class Quantized:
    """codes uint8 [N, nb, block], scales float32 [N, nb], zero_points uint8 [N, nb] or None (symmetric)."""

    codes: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None
    bits: int
    k: int  # unpadded input width

    @property
    def block_size(self) -> int:
        return self.codes.shape[-1]

    def dequantize(self) -> np.ndarray:
        zp = self.zero_points if self.zero_points is not None else np.uint8(1 << (self.bits - 1))
        zp = np.asarray(zp, dtype=np.float32)[..., None] if np.ndim(zp) else np.float32(zp)
        w = (self.codes.astype(np.float32) - zp) * self.scales[..., None]
        return w.reshape(w.shape[0], -1)[:, : self.k]

    def packed_codes(self) -> np.ndarray:
        """[N, nb, block * bits / 8] uint8."""
        return pack(self.codes, self.bits)

    def packed_zero_points(self) -> np.ndarray | None:
        """[N, ceil(nb * bits / 8)] uint8, or None for symmetric blocks."""
        if self.zero_points is None:
            return None
        return pack(self.zero_points, self.bits)


def pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned codes along the last axis, LSB first, into ceil(n * bits / 8) bytes (unused high bits 0)."""
    if bits == 8:
        return codes.astype(np.uint8, copy=False)  # already one code a byte: no copy of a uint8 array
    if bits == 4 and codes.shape[-1] % 2 == 0:
        c = codes.astype(np.uint8)
        return (c[..., 0::2] | (c[..., 1::2] << 4)).astype(np.uint8)
    if bits not in BITS:
        raise ValueError(f"bits {bits}: expected one of {BITS}")
    n = codes.shape[-1]
    # bit j of code i lands at stream position i * bits + j
    stream = ((codes.astype(np.uint8)[..., None] >> np.arange(bits, dtype=np.uint8)) & 1).reshape(*codes.shape[:-1], -1)
    pad = -(-n * bits // 8) * 8 - n * bits
    if pad:
        stream = np.concatenate([stream, np.zeros((*stream.shape[:-1], pad), np.uint8)], axis=-1)
    return np.packbits(stream, axis=-1, bitorder="little")


def unpack(packed: np.ndarray, bits: int, n: int) -> np.ndarray:
    """The inverse of `pack`: n codes from the last axis."""
    if bits == 8:
        return packed[..., :n].astype(np.uint8)
    stream = np.unpackbits(packed, axis=-1, bitorder="little")[..., : n * bits]
    weights = (1 << np.arange(bits, dtype=np.uint8)).astype(np.uint8)
    return (stream.reshape(*packed.shape[:-1], n, bits) * weights).sum(-1).astype(np.uint8)


def quantize(w: np.ndarray, bits: int = 4, block_size: int = 32, method: str = "rtn",
             scale_dtype: type = np.float32, rows_per_chunk: int = 4096,
             hessian: np.ndarray | Callable[[], np.ndarray | None] | None = None) -> Quantized:
    """Quantize w [N, K] (any float dtype) block-wise; works through rows in chunks to bound memory.

    Scales are rounded to `scale_dtype` (the kernel's storage) before the codes are chosen, so the codes
    are the best for the scales the kernel will actually use. `hessian` [K, K]: the layer's calibration
    inputs' second moments, which `gptq` needs; or a function that returns it, called once when GPTQ starts, so
    that no caller holds a [K, K] float64 (411 MB at K = 7168) through the factorisation (`gptq`)."""
    if bits not in BITS:
        raise ValueError(f"bits {bits}: expected one of {BITS}")
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size {block_size}: expected a power of two >= 16")
    if method not in METHODS:
        raise ValueError(f"method {method!r}: expected one of {METHODS}")
    if method == "gptq":
        if hessian is None:
            raise ValueError("method 'gptq' needs the layer's calibration hessian (export/calibration.py)")
        return gptq(np.asarray(w, np.float32), hessian, bits, block_size, scale_dtype)
    n, k = w.shape
    nb = -(-k // block_size)
    codes = np.empty((n, nb, block_size), np.uint8)
    scales = np.empty((n, nb), np.float32)
    zero_points = None if method in ("rtn", "mse-sym") else np.empty((n, nb), np.uint8)
    for start in range(0, n, rows_per_chunk):
        rows = slice(start, min(n, start + rows_per_chunk))
        blocks = np.zeros((rows.stop - start, nb * block_size), np.float32)
        blocks[:, :k] = w[rows]
        blocks = blocks.reshape(-1, nb, block_size)
        if method in ("rtn", "mse-sym"):
            codes[rows], scales[rows] = _symmetric(blocks, bits, scale_dtype, search=method == "mse-sym")
        else:
            codes[rows], scales[rows], zero_points[rows] = _asymmetric(blocks, bits, method == "mse", scale_dtype)
    return Quantized(codes, scales, zero_points, bits, k)


def _symmetric(blocks: np.ndarray, bits: int, scale_dtype: type,
               search: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Codes q - half in [-half, half - 1]. Without search the scale maps max|w| to half - 1 (at 2 bits: 1, so
    the levels are -2, -1, 0, 1 times max|w|); the search tries max|w| * ratio / (half - 1/2) for a grid of
    ratios, which uses the extra negative level, and keeps the least squared error per block."""
    half = 1 << (bits - 1)
    absmax = np.abs(blocks).max(-1)
    candidates = [absmax / (half - 1)] if not search else [absmax * r / (half - 0.5) for r in _MSE_RATIOS]
    best = None
    for raw in candidates:
        scale = raw.astype(scale_dtype).astype(np.float32)
        inv = np.divide(1.0, scale, out=np.zeros_like(scale), where=scale > 0)
        q = np.clip(np.rint(blocks * inv[..., None]), -half, half - 1)
        if not search:
            return (q + half).astype(np.uint8), scale
        err = ((q * scale[..., None] - blocks) ** 2).sum(-1)
        if best is None:
            best = [q, scale, err]
        else:
            better = err < best[2]
            best[0][better], best[1][better], best[2][better] = q[better], scale[better], err[better]
    return (best[0] + half).astype(np.uint8), best[1]


def _asymmetric(blocks: np.ndarray, bits: int, search: bool,
                scale_dtype: type) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    top = (1 << bits) - 1
    lo, hi = blocks.min(-1), blocks.max(-1)
    lo, hi = np.minimum(lo, 0), np.maximum(hi, 0)  # zero stays exactly representable
    best = None
    for ratio in _MSE_RATIOS if search else _MSE_RATIOS[:1]:
        scale = ((hi - lo) * ratio / top).astype(scale_dtype).astype(np.float32)
        inv = np.divide(1.0, scale, out=np.zeros_like(scale), where=scale > 0)
        zp = np.clip(np.rint(-lo * ratio * inv), 0, top)
        q = np.clip(np.rint(blocks * inv[..., None]) + zp[..., None], 0, top)
        if not search:
            return q.astype(np.uint8), scale.astype(np.float32), zp.astype(np.uint8)
        err = (((q - zp[..., None]) * scale[..., None] - blocks) ** 2).sum(-1)
        if best is None:
            best = [q.astype(np.uint8), scale.astype(np.float32), zp.astype(np.uint8), err]
        else:
            better = err < best[3]
            best[0][better], best[1][better], best[2][better], best[3][better] = (
                q[better], scale[better], zp[better], err[better])
    return best[0], best[1], best[2]


# --- GPTQ ---------------------------------------------------------------------------------------------------
#
# GPTQ: block-wise 4-bit codes chosen with error feedback from calibration inputs.
#
# Rounding each weight to its nearest code minimises the error of the weights; what a layer's output feels is
# the error of x @ W.T over the inputs x it sees. GPTQ (Frantar et al., 2022) rounds the input columns one at a
# time and spreads each column's rounding error over the columns not yet rounded, weighted by the inverse of
# the inputs' second moments H = sum x x^T, so later columns compensate what correlated earlier ones lost.
#
# Layout and grid are the kernels' (above): each block of `block_size` inputs gets its scale and zero point
# from the MSE search, run on the block's weights as the earlier blocks' feedback has left them; only the codes
# inside it differ from nearest rounding. So a GPTQ weight is packed and read like any `mse` one.

DAMPING = 0.01  # of the mean diagonal of H, added to it: keeps the inverse finite for inputs seen rarely


def gptq(w: np.ndarray, hessian: np.ndarray | Callable[[], np.ndarray | None], bits: int = 4, block_size: int = 128,
         scale_dtype: type = np.float32) -> Quantized:
    """Quantize w [N, K] with H [K, K] (sum of x x^T over calibration inputs x of this layer), or a function
    returning it: then H is let go of once copied, and the factorisation runs beside one [K, K] array, not two."""
    n, k = w.shape
    if callable(hessian):
        hessian = hessian()
        if hessian is None:
            raise ValueError("method 'gptq' needs the layer's calibration hessian (export/calibration.py)")
    if hessian.shape != (k, k):
        raise ValueError(f"GPTQ: hessian shape {hessian.shape} does not match the weight's {k} inputs")
    nb = -(-k // block_size)
    kp = nb * block_size
    work = np.zeros((n, kp), np.float64)
    work[:, :k] = w
    h = np.zeros((kp, kp), np.float64, order="F")  # Fortran order: LAPACK's, so inverse_cholesky works in place
    h[:k, :k] = hessian
    del hessian  # freed here when the caller handed over a function (its H has no other holder)
    dead = np.diag(h) <= 0  # inputs never seen (and padding): their columns need no care
    h[dead, dead] = 1.0
    work[:, dead] = 0.0
    h[np.diag_indices(kp)] += DAMPING * np.mean(np.diag(h))
    # the upper Cholesky factor of H^-1: row j holds how column j's error is passed to the later columns
    hinv = inverse_cholesky(h).T  # in h's memory: [K, K] float64 is 411 MB at a 7168-wide input (lapack.py)
    top = (1 << bits) - 1
    codes = np.empty((n, nb, block_size), np.uint8)
    scales = np.empty((n, nb), np.float32)
    zero_points = np.empty((n, nb), np.uint8)
    for b in range(nb):
        cols = slice(b * block_size, (b + 1) * block_size)
        block = work[:, cols]  # a view: feedback inside the block updates it in place
        _, scale, zp = _asymmetric(block.astype(np.float32)[:, None, :], bits, True, scale_dtype)
        scale, zp = scale[:, 0].astype(np.float64), zp[:, 0].astype(np.float64)
        inv = np.divide(1.0, scale, out=np.zeros_like(scale), where=scale > 0)
        errors = np.empty((n, block_size), np.float64)
        for j in range(block_size):
            col = block[:, j]
            q = np.clip(np.rint(col * inv) + zp, 0, top)
            codes[:, b, j] = q
            errors[:, j] = (col - (q - zp) * scale) / hinv[cols.start + j, cols.start + j]
            block[:, j + 1:] -= np.outer(errors[:, j], hinv[cols.start + j, cols.start + j + 1:cols.stop])
        work[:, cols.stop:] -= errors @ hinv[cols, cols.stop:]  # the block's feedback to the rest, at once
        scales[:, b], zero_points[:, b] = scale, zp
    return Quantized(codes, scales, zero_points, bits, k)
