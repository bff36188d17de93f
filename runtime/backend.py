"""The contract between the generation loop and a runtime, and the cache bookkeeping every backend shares.

A backend loads a bundle through one of onnxruntime's APIs (backends/python.py: the Python binding;
backends/java.py: the Android AAR through pyjnius; backends/objc.py: the iOS pod through pyobjus) and
provides a `Session`: what the bundle is (its state layout, context length, vocabulary, end tokens) and
`new_cache(batch, max_length)`, the state of one token sequence. A `Cache` runs forward passes (`step`) and
keeps the state between them: KV rows that roll back by length (`truncate`), buffers that grow (`reserve`) and
shrink back under memory pressure (`shrink`), and the state read and written as numpy arrays (`conv_state` /
`set_conv_state`, `kv_rows` / `set_kv_rows`: snapshots, saved conversations, the prefix cache).

`CacheBase` holds everything about that which does not depend on the API: the attention mask, the length,
growth by powers of two within the memory available, rollback, and the state as arrays. A backend gives it
a few hooks: how a tensor is made from an array (`_tensor`), read (`_array`) and written in place
(`_write`), released (`_release`), and how one forward pass runs over the state (`_run`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import numpy as np

from .bundle import StateSpec
from .memory import available_memory
from .threads import ThreadChoice

__all__ = ["Cache", "CacheBase", "Session", "capacity_for", "check_fits", "kv_row_bytes"]


class Session(Protocol):
    """A loaded bundle, as the generation loop and LfmModel use it (backends/python.py: LfmSession)."""

    folder: Path
    manifest: dict
    state: StateSpec  # conv layers -> (H, K-1); attention layers -> (Hkv, D)
    context_length: int
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    pad_token_id: int
    share_buffer: bool  # one KV buffer for past and present, written in place (GroupQueryAttention)
    attention_kernel: str  # kernels.ATTENTION_KERNELS
    num_heads: int  # query heads (what an unfused attention kernel holds scores for)
    threads: int  # onnxruntime's intra-op threads (0: its own choice)
    thread_choice: ThreadChoice | None  # what threads="auto" chose and why (threads.py); None for a given count

    @property
    def provider(self) -> str: ...

    def new_cache(self, batch: int, max_length: int) -> Cache: ...


class Cache(Protocol):
    """The state of `batch` token sequences of up to `max_length` tokens, `length` of them fed so far."""

    batch: int
    length: int
    max_length: int
    conv_dtype: dict[int, Any]
    kv_dtype: dict[int, Any]

    def step(self, input_ids: np.ndarray, mask: np.ndarray | None = None, last: int | None = None) -> np.ndarray:
        """Feed input_ids [B, S] (mask [B, S] marks padding); logits [B, S, V], or with `last` = n the last n
        rows (the phone backends return the last row only, whatever is asked)."""
        ...

    def truncate(self, length: int) -> None: ...

    def reserve(self, rows: int) -> None: ...

    def shrink(self) -> int: ...

    def conv_state(self) -> dict[int, np.ndarray]: ...

    def set_conv_state(self, state: dict[int, np.ndarray]) -> None: ...

    def kv_rows(self, start: int = 0) -> dict[int, tuple[np.ndarray, np.ndarray]]: ...

    def set_kv_rows(self, rows: dict[int, tuple[np.ndarray, np.ndarray]], length: int) -> None: ...


class CacheBase:
    """What every backend's cache shares; subclasses implement the hooks below and call __init__ last
    (it makes the state tensors with their `_zeros`).

    - conv state: `conv_buffers` tensors per conv layer (2: a step reads [0] and writes [1], then they swap;
      a kernel never reads what it writes); `self.conv[i][0]` is always the state after the last token.
    - KV: a shared-buffer graph has one [B, Hkv, max_length, D] tensor per key and value, written in place;
      a concatenating graph's tensors are [B, Hkv, length, D], replaced by each step's present outputs."""

    conv_buffers = 2

    def __init__(self, model: Session, batch: int, max_length: int, conv_dtype: dict[int, Any],
                 kv_dtype: dict[int, Any]):
        self.model, self.batch, self.max_length = model, batch, max_length
        self.length = 0
        self.mask = np.zeros((batch, max_length), dtype=np.int64)
        self.conv_dtype, self.kv_dtype = conv_dtype, kv_dtype
        self.row_bytes = kv_row_bytes(model.state.kv, batch, kv_dtype) if model.share_buffer else 0
        check_fits(max_length if model.share_buffer else 0, self.row_bytes)
        self.conv = {i: [self._zeros((batch, h, k), conv_dtype[i]) for _ in range(self.conv_buffers)]
                     for i, (h, k) in model.state.conv.items()}
        self.kv = {i: [self._zeros(self._kv_shape(i), kv_dtype[i]) for _ in range(2)] for i in model.state.kv}

    # --- hooks ------------------------------------------------------------------------------------------------

    def _tensor(self, array: np.ndarray) -> Any:
        """A backend tensor holding a copy of `array`."""
        raise NotImplementedError

    def _zeros(self, shape: tuple[int, ...], dtype: Any) -> Any:
        return self._tensor(np.zeros(shape, dtype))

    def _array(self, tensor: Any, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        """The tensor's contents as an array of `shape` (a view or a copy: callers copy what they keep)."""
        raise NotImplementedError

    def _write(self, tensor: Any, array: np.ndarray) -> Any:
        """Write `array` into `tensor` in place; returns the tensor the state now uses (the same one where
        the backend can write in place)."""
        raise NotImplementedError

    def _release(self, tensor: Any) -> None:
        """The state no longer uses `tensor`."""

    def _replaced(self) -> None:
        """KV tensors were replaced (a backend that bound the old ones forgets them)."""

    def _grown(self, capacity: int) -> None:
        """The cache now holds `capacity` tokens (a backend with per-capacity buffers of its own remakes them)."""

    def _run(self, input_ids: np.ndarray, total: int, last: int | None) -> np.ndarray:
        """One forward pass of input_ids [B, S] (int64) over the state, the mask's first `total` columns in use;
        swaps or replaces the state tensors so that [0] holds the new state; returns the logits."""
        raise NotImplementedError

    # --- the contract --------------------------------------------------------------------------------------

    def step(self, input_ids: np.ndarray, mask: np.ndarray | None = None, last: int | None = None) -> np.ndarray:
        b, s = input_ids.shape
        if self.length + s > self.max_length:
            raise ValueError(f"{self.length} + {s} tokens exceed this cache's max_length {self.max_length}")
        self.mask[:, self.length:self.length + s] = 1 if mask is None else mask
        logits = self._run(np.ascontiguousarray(input_ids, dtype=np.int64), self.length + s, last)
        self.length += s  # only once the step ran: a failed run leaves the length as it was
        return logits

    @property
    def capacity(self) -> int:
        """KV rows the buffers hold without growing (a concatenating graph grows by itself)."""
        return self.max_length

    def truncate(self, length: int) -> None:
        """Keep the first `length` tokens' KV rows: the mask hides the rest and the next step overwrites them
        (a concatenating graph's rows are cut once). The conv state is not touched: restore it from a snapshot
        taken at `length` (set_conv_state)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"truncate({length}): the cache holds {self.length} tokens")
        if not self.model.share_buffer and length < self.length:
            for i, pair in self.kv.items():
                self._set_kv(i, [self._array(t, self._kv_shape(i), self.kv_dtype[i])[:, :, :length] for t in pair])
        self.mask[:, length:] = 0
        self.length = length

    def reserve(self, rows: int) -> None:
        """Make room for `rows` tokens: the buffers grow to the next power of two >= rows (at most the context
        length; exactly `rows` where the power of two would not fit in memory, and MemoryError where `rows` do
        not either), and the rows in use are copied over."""
        new = capacity_for(rows, self.max_length, self.model.context_length, self.row_bytes)
        if new != self.max_length:
            self._resize(new)

    def shrink(self) -> int:
        """Release grown-but-unused KV rows: a shared buffer's capacity beyond `length` (memory pressure,
        LfmModel.trim_memory). The rows in use are copied into buffers of exactly that length; the next
        `reserve` grows them again. Returns the bytes released (0 on a concatenating graph, whose tensors hold
        only the rows in use)."""
        new = max(self.length, 1)
        if not self.model.share_buffer or new >= self.max_length:
            return 0
        freed = (self.max_length - new) * self.row_bytes
        self._resize(new)
        return freed

    def _resize(self, new: int) -> None:
        """Buffers of `new` rows (>= length), the rows in use copied over."""
        kept = {i: [self._array(t, self._kv_shape(i), self.kv_dtype[i])[:, :, :self.length] for t in pair]
                for i, pair in self.kv.items()} if self.model.share_buffer else {}
        grown = np.zeros((self.batch, new), dtype=np.int64)
        grown[:, :self.length] = self.mask[:, :self.length]
        self.mask, self.max_length = grown, new
        self._grown(new)
        for i, arrays in kept.items():
            self._set_kv(i, [_padded(a, new) for a in arrays])

    def conv_state(self) -> dict[int, np.ndarray]:
        """A copy of each conv layer's state after the last token ([B, H, K-1])."""
        return {i: self._array(pair[0], (self.batch, *self.model.state.conv[i]), self.conv_dtype[i]).copy()
                for i, pair in self.conv.items()}

    def set_conv_state(self, state: dict[int, np.ndarray]) -> None:
        for i, pair in self.conv.items():
            pair[0] = self._write(pair[0], np.ascontiguousarray(state[i], dtype=self.conv_dtype[i]))

    def kv_rows(self, start: int = 0) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """A copy of each attention layer's key and value rows in use from row `start` on, [B, Hkv, length -
        start, D] (a conversation's checkpoint journal appends only the new rows)."""
        return {i: tuple(self._array(t, self._kv_shape(i), self.kv_dtype[i])[:, :, start:self.length].copy()
                         for t in pair) for i, pair in self.kv.items()}

    def set_kv_rows(self, rows: dict[int, tuple[np.ndarray, np.ndarray]], length: int) -> None:
        """Replace the state's KV rows and length (the conv state is set apart: set_conv_state)."""
        self.length = 0
        self.reserve(length)
        for i in self.kv:
            arrays = [np.ascontiguousarray(a, dtype=self.kv_dtype[i]) for a in rows[i]]
            if any(a.shape[2] != length for a in arrays):
                raise ValueError(f"KV rows of layer {i}: {[a.shape[2] for a in arrays]} rows, expected {length}")
            self._set_kv(i, [_padded(a, self.max_length) if self.model.share_buffer else a for a in arrays])
        self.mask[:] = 0
        self.mask[:, :length] = 1
        self.length = length

    def _kv_shape(self, i: int) -> tuple[int, int, int, int]:
        heads, dim = self.model.state.kv[i]
        return (self.batch, heads, self.max_length if self.model.share_buffer else self.length, dim)

    def _set_kv(self, i: int, arrays: list[np.ndarray]) -> None:
        old, self.kv[i] = self.kv[i], [self._tensor(a) for a in arrays]
        for t in old:
            self._release(t)
        self._replaced()


def _padded(rows: np.ndarray, capacity: int) -> np.ndarray:
    """[B, H, n, D] KV rows at the start of a zeroed [B, H, capacity, D] buffer."""
    full = np.zeros((*rows.shape[:2], capacity, rows.shape[3]), rows.dtype)
    full[:, :, :rows.shape[2]] = rows
    return full


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
