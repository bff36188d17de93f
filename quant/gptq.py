"""GPTQ: block-wise 4-bit codes chosen with error feedback from calibration inputs.

Rounding each weight to its nearest code minimises the error of the weights; what a layer's output feels is
the error of x @ W.T over the inputs x it sees. GPTQ (Frantar et al., 2022) rounds the input columns one at a
time and spreads each column's rounding error over the columns not yet rounded, weighted by the inverse of
the inputs' second moments H = sum x x^T, so later columns compensate what correlated earlier ones lost.

Layout and grid are the kernels' (blocks.py): each block of `block_size` inputs gets its scale and zero point
from the MSE search, run on the block's weights as the earlier blocks' feedback has left them; only the codes
inside it differ from nearest rounding. So a GPTQ weight is packed and read like any `mse` one.
"""

from __future__ import annotations

import numpy as np

from .blocks import Quantized, _asymmetric

DAMPING = 0.01  # of the mean diagonal of H, added to it: keeps the inverse finite for inputs seen rarely


def gptq(w: np.ndarray, hessian: np.ndarray, bits: int = 4, block_size: int = 128,
         scale_dtype: type = np.float32) -> Quantized:
    """Quantize w [N, K] with H [K, K] (sum of x x^T over calibration inputs x of this layer)."""
    n, k = w.shape
    if hessian.shape != (k, k):
        raise ValueError(f"GPTQ: hessian shape {hessian.shape} does not match the weight's {k} inputs")
    nb = -(-k // block_size)
    kp = nb * block_size
    work = np.zeros((n, kp), np.float64)
    work[:, :k] = w
    h = np.zeros((kp, kp), np.float64)
    h[:k, :k] = hessian
    dead = np.diag(h) <= 0  # inputs never seen (and padding): their columns need no care
    h[dead, dead] = 1.0
    work[:, dead] = 0.0
    h[np.diag_indices(kp)] += DAMPING * np.mean(np.diag(h))
    # the upper Cholesky factor of H^-1: row j holds how column j's error is passed to the later columns
    hinv = np.linalg.cholesky(np.linalg.inv(h)).T
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
