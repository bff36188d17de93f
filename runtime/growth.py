"""How a cache's state buffers grow and roll back, the same for every backend (session.py, and the phone
backends in mobile_app/backends): numpy only, no onnxruntime."""

from __future__ import annotations

import numpy as np


def capacity_for(rows: int, current: int, context_length: int, bytes_per_row: int = 0,
                 available: int | None = None) -> int:
    """The buffer length that holds `rows` tokens: `current` if it does, else the next power of two (at most
    the context length). More than the context length is an error. With `bytes_per_row` (the KV cache's
    bytes per token), a power of two that would not fit in the memory available (`available` bytes, default
    MemAvailable) shrinks to `rows` exactly, and `rows` that do not fit either are refused (check_fits)."""
    if rows <= current:
        return current
    if rows > context_length:
        raise ValueError(f"{rows} tokens exceed the model's context length {context_length}")
    new = min(context_length, 1 << (rows - 1).bit_length())
    if bytes_per_row:
        free = available_memory() if available is None else available
        if free is not None and new * bytes_per_row > free:
            check_fits(rows, bytes_per_row, free)
            new = rows
    return new


def kv_row_bytes(kv: dict[int, tuple[int, int]], batch: int, dtype: dict[int, type] | type) -> int:
    """Bytes one token adds to a shared KV buffer: keys and values of every attention layer ([Hkv, D] each)."""
    def itemsize(i: int) -> int:
        return np.dtype(dtype[i] if isinstance(dtype, dict) else dtype).itemsize

    return sum(2 * batch * heads * dim * itemsize(i) for i, (heads, dim) in kv.items())


def check_fits(rows: int, bytes_per_row: int, available: int | None = None) -> None:
    """Refuse a KV buffer of `rows` tokens that would not fit in the memory available, before allocating it:
    on a phone the low-memory killer ends the app instead of an allocation failing."""
    need = rows * bytes_per_row
    if not need:
        return
    free = available_memory() if available is None else available
    if free is not None and need > free:
        raise MemoryError(f"a KV cache of {rows:,} tokens needs {need / 1e9:.2f} GB ({bytes_per_row:,} bytes per "
                          f"token); {free / 1e9:.2f} GB of memory is available (MemAvailable)")


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation (Linux and Android: MemAvailable); None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def grown_mask(mask: np.ndarray, length: int, capacity: int) -> np.ndarray:
    """The attention mask [B, capacity] with the first `length` columns kept."""
    out = np.zeros((mask.shape[0], capacity), dtype=np.int64)
    out[:, :length] = mask[:, :length]
    return out


def padded(rows: np.ndarray, capacity: int, dtype: type | None = None) -> np.ndarray:
    """[B, H, n, D] KV rows at the start of a zeroed [B, H, capacity, D] buffer (of the rows' dtype, or `dtype`)."""
    full = np.zeros((*rows.shape[:2], capacity, rows.shape[3]), dtype or rows.dtype)
    full[:, :, :rows.shape[2]] = rows
    return full


def check_truncate(length: int, held: int) -> None:
    if not 0 <= length <= held:
        raise ValueError(f"truncate({length}): the cache holds {held} tokens")


def check_rows(layer: int, arrays: list[np.ndarray], length: int) -> None:
    if any(a.shape[2] != length for a in arrays):
        raise ValueError(f"KV rows of layer {layer}: {[a.shape[2] for a in arrays]} rows, expected {length}")
