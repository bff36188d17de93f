"""Which kernel onnxruntime builds for GroupQueryAttention, and what a prefill chunk holds in memory with it;
the session config entries every backend sets (SESSION_CONFIG).

onnxruntime 1.32's CPU GroupQueryAttention has two paths, chosen when a session builds its kernels (the
environment variable ORT_GQA_DISABLE_FLASH_ATTENTION, read then and never again):
- "flash" (onnxruntime's default): blockwise attention with an online softmax; no scores tensor, so a prefill
  chunk's memory does not grow with the depth. With an int8/int4 cache it converts every cached value back to
  float for each of the query heads sharing it, so it decodes no faster than an fp32 cache.
- "unfused": scores for the whole [batch, heads, chunk, depth] block (4 bytes per query head and pair of new
  token and cache row), then softmax, then values. With an int8 cache, a decode step's attention takes 0.66-0.72x
  the flash path's time at depths 600 to 32K (device_bench/results/notes/2026-11-29-long-context.md); with an fp32
  cache it is slower.
A session's choice holds for its life; prefill chunks shrink with depth to keep the unfused scores within
Generation's prefill_budget.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

ATTENTION_KERNELS = ("flash", "unfused")
# Config entries every session sets (LfmSession and the phone backends). onnxruntime repacks every MatMulNBits
# and QMoE weight while a session loads, single-threaded unless asked: with the pool's threads the full int4
# model is ready in 1.7-2.7 s instead of 2.9-4.8 s on 2 threads (the packed bytes are the same, tests/test_session.py;
# measured in device_bench/results/notes/2026-11-30-overhead-and-parallel-load.md).
SESSION_CONFIG = {"session.prepack.enable_parallel": "1"}
FLASH_OFF = "ORT_GQA_DISABLE_FLASH_ATTENTION"
BIAS_BYTES_PER_PAIR = 32  # measured: the contrib graph's [B, 1, chunk, depth] mask tensors (Generation)
_building = threading.Lock()  # the variable is process-wide: one session builds its kernels at a time


def check(kernel: str) -> None:
    if kernel not in ATTENTION_KERNELS:
        raise ValueError(f"attention_kernel {kernel!r}: expected one of {', '.join(ATTENTION_KERNELS)}")


@contextmanager
def building(kernel: str) -> Iterator[None]:
    """Around session creation: onnxruntime builds GroupQueryAttention's `kernel`, whatever the environment
    says; the environment is restored after."""
    check(kernel)
    with _building:
        before = os.environ.get(FLASH_OFF)
        if kernel == "unfused":
            os.environ[FLASH_OFF] = "1"
        else:
            os.environ.pop(FLASH_OFF, None)
        try:
            yield
        finally:
            if before is None:
                os.environ.pop(FLASH_OFF, None)
            else:
                os.environ[FLASH_OFF] = before


def prefill_bytes_per_pair(kernel: str, num_heads: int, batch: int = 1) -> int:
    """Transient bytes per (new token, cache row) pair of a prefill chunk: the mask tensors, and with the
    unfused kernel the float scores of every query head."""
    return batch * (BIAS_BYTES_PER_PAIR + (4 * num_heads if kernel == "unfused" else 0))
