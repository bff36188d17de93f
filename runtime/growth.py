"""How a cache's state buffers grow and roll back, the same for every backend (session.py, and the phone
backends in mobile_app/backends): numpy only, no onnxruntime."""

from __future__ import annotations

import numpy as np


def capacity_for(rows: int, current: int, context_length: int) -> int:
    """The buffer length that holds `rows` tokens: `current` if it does, else the next power of two (at most
    the context length). More than the context length is an error."""
    if rows <= current:
        return current
    if rows > context_length:
        raise ValueError(f"{rows} tokens exceed the model's context length {context_length}")
    return min(context_length, 1 << (rows - 1).bit_length())


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
