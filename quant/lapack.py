"""GPTQ's factor `cholesky(inv(H))` as numpy.linalg computes it, in a third of the memory.

numpy.linalg.inv copies H into a LAPACK buffer, makes an identity beside it and copies the answer out (three
[K, K] float64 arrays beside H); cholesky copies again. At a 7168-wide input (LFM2.5-8B-A1B's dense down
projection) each array is 411 MB, at LFM2-1.2B's 8192 537 MB. Here the same LAPACK routines numpy calls
(dgesv with an identity right-hand side, then dpotrf on the lower triangle), from the same library numpy links,
run in place on Fortran-ordered arrays: the same calls on the same numbers, so the same bits
(tests/test_quant_lapack.py holds them equal to numpy.linalg's), with one array beside H at a time. Where numpy's
LAPACK cannot be found (a numpy built against another library), numpy.linalg is used as it is.
"""

from __future__ import annotations

import ctypes
from functools import cache

import numpy as np

__all__ = ["inverse_cholesky"]

# numpy's wheels link scipy-openblas with 64-bit integers (ILP64) and these names (nm -D numpy/linalg/_umath_linalg)
_NAMES = (("scipy_dgesv_64_", "scipy_dpotrf_64_"), ("dgesv_64_", "dpotrf_64_"))


@cache
def _routines() -> tuple | None:
    """(dgesv, dpotrf) from the library numpy.linalg calls, or None."""
    try:
        from numpy.linalg import _umath_linalg

        lib = ctypes.CDLL(_umath_linalg.__file__)  # dlsym on it searches the libraries it links too
    except (ImportError, OSError, AttributeError):
        return None
    for gesv, potrf in _NAMES:
        try:
            return getattr(lib, gesv), getattr(lib, potrf)
        except AttributeError:
            continue
    return None


def inverse_cholesky(h: np.ndarray) -> np.ndarray:
    """L with L @ L.T = inv(h), lower triangular and C-ordered: `np.linalg.cholesky(np.linalg.inv(h))`, bit for
    bit. `h` [K, K] float64, Fortran-ordered, is a working copy this consumes: L is written into its memory (the
    answer is a view of it), so besides `h` one more [K, K] array exists while this runs, not four."""
    routines = _routines()
    if routines is None or not h.flags.f_contiguous or not h.flags.writeable or h.dtype != np.float64:
        return np.linalg.cholesky(np.linalg.inv(h))
    gesv, potrf = routines
    k = h.shape[0]
    n, info = ctypes.c_int64(k), ctypes.c_int64(0)
    pivots = np.empty(k, np.int64)
    b = np.zeros((k, k), np.float64, order="F")  # numpy.linalg.inv's right-hand side, the identity: becomes inv(h)
    np.fill_diagonal(b, 1.0)
    gesv(ctypes.byref(n), ctypes.byref(n), _ptr(h), ctypes.byref(n), _ptr(pivots), _ptr(b), ctypes.byref(n),
         ctypes.byref(info))
    if info.value != 0:
        raise np.linalg.LinAlgError("Singular matrix")
    potrf(ctypes.byref(ctypes.c_char(b"L")), ctypes.byref(n), _ptr(b), ctypes.byref(n), ctypes.byref(info),
          ctypes.c_size_t(1))  # the trailing length of the Fortran character argument
    if info.value != 0:
        raise np.linalg.LinAlgError("Matrix is not positive definite")
    for c in range(1, k):  # dpotrf leaves the strict upper triangle as it was; numpy zeroes it
        b[:c, c] = 0.0
    out = h.T  # h's memory (its LU factors are spent) in C order: numpy.linalg's layout, so GPTQ reads it as before
    out[...] = b
    return out


def _ptr(a: np.ndarray) -> ctypes.c_void_p:
    return a.ctypes.data_as(ctypes.c_void_p)
