"""GPTQ's inverse Cholesky factor in place (quant/lapack.py) against numpy.linalg's, which it must equal bit for bit:
the bundle's codes depend on every bit of it (issue 28: export memory bounded, the same output bytes)."""

from __future__ import annotations

import numpy as np
import pytest

from lfm_edge.quant import lapack
from lfm_edge.quant.blocks import gptq


def _hessian(k: int, seed: int, dead: int = 0) -> np.ndarray:
    """x^T x of random inputs (float64, as calibration makes it), with `dead` inputs never seen."""
    x = np.random.default_rng(seed).standard_normal((k + 37, k))
    x[:, :dead] = 0.0
    h = x.T @ x
    h[np.diag_indices(k)] += 0.01 * np.mean(np.diag(h))
    return h


def test_numpys_lapack_is_found_here():
    assert lapack._routines() is not None  # else every comparison below would hold numpy.linalg against itself


@pytest.mark.parametrize("k", [1, 64, 333, 1024, 2048])
def test_inverse_cholesky_is_numpy_linalgs_bits(k):
    h = _hessian(k, seed=k)
    want = np.linalg.cholesky(np.linalg.inv(h))
    got = lapack.inverse_cholesky(np.asfortranarray(h))
    assert got.flags.c_contiguous and got.dtype == np.float64
    assert np.array_equal(got.view(np.uint64), want.view(np.uint64))


def test_inverse_cholesky_refuses_what_numpy_refuses():
    with pytest.raises(np.linalg.LinAlgError):
        lapack.inverse_cholesky(np.zeros((4, 4), order="F"))
    with pytest.raises(np.linalg.LinAlgError):
        lapack.inverse_cholesky(np.asfortranarray(np.diag([1.0, -1.0, 2.0])))


@pytest.mark.parametrize("n, k, block", [(96, 300, 128), (256, 1024, 128), (64, 512, 32)])
def test_gptq_codes_are_the_same_as_through_numpy_linalg(monkeypatch, n, k, block):
    """Padding (300 inputs in blocks of 128), dead inputs, blocks of 32 and 128: the same codes, scales and zero
    points as GPTQ through numpy.linalg's inv and cholesky (the fallback path)."""
    w = np.random.default_rng(k).standard_normal((n, k)).astype(np.float32)
    h = _hessian(k, seed=k + 1, dead=5)
    fast = gptq(w, h, 4, block)
    monkeypatch.setattr(lapack, "_routines", lambda: None)
    slow = gptq(w, h, 4, block)
    for field in ("codes", "scales", "zero_points"):
        assert np.array_equal(getattr(fast, field), getattr(slow, field)), field


def test_gptq_takes_its_hessian_from_a_function_the_same():
    """A function handing H over (the exporter's way: nothing else holds it while it is factorised) gives what H
    itself gives; a function with no H is refused as a missing H is."""
    w = np.random.default_rng(3).standard_normal((64, 256)).astype(np.float32)
    h = _hessian(256, seed=4)
    given, handed = gptq(w, h, 4, 128), gptq(w, lambda: h.copy(), 4, 128)
    assert all(np.array_equal(getattr(given, f), getattr(handed, f)) for f in ("codes", "scales", "zero_points"))
    with pytest.raises(ValueError, match="needs the layer's calibration hessian"):
        gptq(w, lambda: None, 4, 128)
