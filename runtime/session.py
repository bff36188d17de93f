"""An onnxruntime session over a bundle, and the state buffers a generation carries between steps.

State lives in OrtValues allocated once per generation and bound with IOBinding:
- KV cache on a graph that shares past and present (GroupQueryAttention): one [B, Hkv, max_len, D] buffer
  per tensor, bound as both input and output; the kernel writes the new rows in place.
- KV cache on a graph that concatenates (the portable op set): the present OrtValue the step returned is
  bound as the next past, never copied through numpy.
- conv state [B, H, K-1]: two buffers per layer, swapped each step (a kernel must not read what it writes).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnxruntime as ort

from .bundle import (  # noqa: F401 (re-exported)
    BundleError,
    StateSpec,
    read_bundle,
    sampled_sha256,
    sha256,
    state_spec,
    verify_bundle,
)
from .pages import release_clean_pages
from .providers import ProviderList, choose

_ORT = ort.capi.onnxruntime_pybind11_state
_LOAD_ERRORS = (_ORT.Fail, _ORT.InvalidArgument, _ORT.NoSuchFile, _ORT.InvalidProtobuf, _ORT.InvalidGraph,
                _ORT.NotImplemented, _ORT.RuntimeException)

class LfmSession:
    """One loaded bundle. `providers`: "auto" (an accelerator only if it runs every heavy node, see
    providers.py), "cpu", or an explicit onnxruntime list such as [("XnnpackExecutionProvider",
    {"intra_op_num_threads": 4}), "CPUExecutionProvider"]; the choice and its reason are in
    `provider_choice`. `verify`: see verify_bundle ("sampled" by default)."""

    def __init__(self, bundle: str | Path, threads: int | None = None, providers: str | ProviderList = "auto",
                 verify: str = "sampled", session_options: ort.SessionOptions | None = None):
        cfg = read_bundle(bundle, verify, onnxruntime_version=ort.__version__)
        self.folder, self.manifest, decoder, model_file = cfg.folder, cfg.manifest, cfg.decoder, cfg.model_file
        self.share_buffer, self.context_length = cfg.share_buffer, cfg.context_length
        self.eos_token_ids, self.pad_token_id = cfg.eos_token_ids, cfg.pad_token_id
        # session_options: a caller's extra settings (device_bench/step_profile.py turns on profiling)
        options = session_options or ort.SessionOptions()
        # the bundle's target default (export/exporter.py TARGET_THREADS), never more than this machine's CPUs
        threads = threads or min(int(decoder.get("session_options", {}).get("intra_op_num_threads", 0)),
                                 os.cpu_count() or 1)
        if threads:
            options.intra_op_num_threads = threads
        # The CPU arena keeps the largest buffers any run needed (a 512-token prefill's logits alone are
        # 512 x vocab floats) for the session's life; without it they go back after the run. 6 layers at full
        # width: RSS while decoding after a 512-token prefill 1616 -> 1315 MB, decode speed unchanged.
        options.enable_cpu_mem_arena = False
        try:
            self.provider_choice = choose(model_file, providers, options)
            self.session = ort.InferenceSession(str(model_file), options, providers=self.provider_choice.providers)
        except _LOAD_ERRORS as e:  # a damaged or foreign graph: say which file, not where onnxruntime failed
            raise BundleError(f"{model_file}: onnxruntime {ort.__version__} cannot load it "
                              f"({str(e).strip().splitlines()[0][:300]})") from None
        data_files = [p for p in self.folder.iterdir() if p.name.startswith(model_file.name) and p != model_file]
        self.released_bytes = release_clean_pages(data_files)  # see pages.py
        self.state = state_spec(((i.name, i.shape) for i in self.session.get_inputs()), decoder)
        self.vocab_size = int(self.session.get_outputs()[0].shape[-1])
        # query heads: what an attention chunk's score buffer scales with (Generation bounds it by depth)
        self.attention_heads = int(decoder.get("num_attention_heads", 0)) if self.state.kv else 0

    @property
    def provider(self) -> str:
        return self.session.get_providers()[0]

    def new_cache(self, batch: int, max_length: int) -> Cache:
        """State for one generation. This and the attributes set in __init__ are the whole surface the
        generation loop uses, so another backend (mobile_app/backends: onnxruntime's Java or Objective-C API)
        can stand in for LfmSession by providing the same."""
        return Cache(self, batch, max_length)


ELEMENT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int8)": np.int8,
                 "tensor(uint8)": np.uint8}


class Cache:
    """One token sequence's state buffers, bound to an IOBinding; `step` runs one forward pass.

    Beyond a single generation (runtime/README.md, "State that outlives a generation"): `truncate` rolls the
    KV rows back by length, `reserve` grows the buffers, `conv_state`/`set_conv_state` and
    `kv_rows`/`set_kv_rows` read and write the state as arrays (snapshots, saved conversations, the prefix
    cache)."""

    def __init__(self, model: LfmSession, batch: int, max_length: int):
        self.model, self.batch, self.max_length = model, batch, max_length
        self.binding = model.session.io_binding()
        self.mask = np.zeros((batch, max_length), dtype=np.int64)
        self.length = 0
        types = {i.name: ELEMENT_TYPES.get(i.type, np.float32) for i in model.session.get_inputs()}
        self.conv_dtype = {i: types.get(f"past.{i}.conv", np.float32) for i in model.state.conv}
        self.kv_dtype = {i: types.get(f"past_key_values.{i}.key", np.float32) for i in model.state.kv}
        self.conv = {i: [_zeros((batch, h, k), self.conv_dtype[i]) for _ in range(2)]
                     for i, (h, k) in model.state.conv.items()}
        capacity = max_length if model.share_buffer else 0
        self.kv = {i: [_zeros((batch, heads, capacity, dim), self.kv_dtype[i]) for _ in range(2)]
                   for i, (heads, dim) in model.state.kv.items()}

    def step(self, input_ids: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
        """Run input_ids [B, S] (mask [B, S] marks padding); returns logits [B, S, V]."""
        b, s = input_ids.shape
        if self.length + s > self.max_length:
            raise ValueError(f"{self.length} + {s} tokens exceed this cache's max_length {self.max_length}")
        self.mask[:, self.length:self.length + s] = 1 if mask is None else mask
        io = self.binding
        io.clear_binding_inputs()
        io.clear_binding_outputs()
        io.bind_cpu_input("input_ids", np.ascontiguousarray(input_ids, dtype=np.int64))
        io.bind_cpu_input("attention_mask", np.ascontiguousarray(self.mask[:, :self.length + s]))
        for i, (cur, nxt) in self.conv.items():
            io.bind_ortvalue_input(f"past.{i}.conv", cur)
            io.bind_ortvalue_output(f"present.{i}.conv", nxt)
        grown = []  # outputs ORT allocates, in binding order
        for i, (key, value) in self.kv.items():
            io.bind_ortvalue_input(f"past_key_values.{i}.key", key)
            io.bind_ortvalue_input(f"past_key_values.{i}.value", value)
            if self.model.share_buffer:
                io.bind_ortvalue_output(f"present.{i}.key", key)
                io.bind_ortvalue_output(f"present.{i}.value", value)
            else:
                io.bind_output(f"present.{i}.key")
                io.bind_output(f"present.{i}.value")
                grown.append(i)
        io.bind_output("logits")
        self.model.session.run_with_iobinding(io)
        self.length += s  # only once the step ran: a failed run leaves the state as it was before it
        outputs = io.get_outputs()  # in binding order: conv, kv, logits
        for i in self.conv:
            self.conv[i].reverse()
        if grown:
            kv_outputs = outputs[len(self.conv):len(self.conv) + 2 * len(self.kv)]
            for n, i in enumerate(grown):
                self.kv[i] = [kv_outputs[2 * n], kv_outputs[2 * n + 1]]
        return outputs[-1].numpy()

    @property
    def capacity(self) -> int:
        """KV rows the buffers hold without growing (a concatenating graph grows by itself)."""
        return self.max_length

    def truncate(self, length: int) -> None:
        """Keep the first `length` tokens' KV rows: the mask hides the rest and the next step overwrites them.
        The conv state is not touched: restore it from a snapshot taken at `length` (set_conv_state)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"truncate({length}): the cache holds {self.length} tokens")
        self.mask[:, length:] = 0
        if not self.model.share_buffer and length < self.length:
            for i, pair in self.kv.items():
                self.kv[i] = [_from_array(v.numpy()[:, :, :length]) for v in pair]
        self.length = length

    def reserve(self, rows: int) -> None:
        """Make room for `rows` tokens: the buffers grow to the next power of two >= rows (at most the
        context length), and the rows in use are copied over."""
        if rows <= self.max_length:
            return
        limit = self.model.context_length
        if rows > limit:
            raise ValueError(f"{rows} tokens exceed the model's context length {limit}")
        new = min(limit, 1 << (rows - 1).bit_length())
        mask = np.zeros((self.batch, new), dtype=np.int64)
        mask[:, :self.length] = self.mask[:, :self.length]
        self.mask, self.max_length = mask, new
        if self.model.share_buffer:
            for i, pair in self.kv.items():
                grown = []
                for v in pair:
                    b, h, _, d = v.shape()
                    array = np.zeros((b, h, new, d), self.kv_dtype[i])
                    array[:, :, :self.length] = v.numpy()[:, :, :self.length]
                    grown.append(_from_array(array))
                self.kv[i] = grown

    def conv_state(self) -> dict[int, np.ndarray]:
        """A copy of each conv layer's state after the last token ([B, H, K-1]). (OrtValue.numpy() is a view
        of the buffer, which the step after next overwrites.)"""
        return {i: pair[0].numpy().copy() for i, pair in self.conv.items()}

    def set_conv_state(self, state: dict[int, np.ndarray]) -> None:
        for i, pair in self.conv.items():
            pair[0].update_inplace(np.ascontiguousarray(state[i], dtype=self.conv_dtype[i]))

    def kv_rows(self) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """A copy of each attention layer's key and value rows in use, [B, Hkv, length, D]."""
        return {i: (k.numpy()[:, :, :self.length].copy(), v.numpy()[:, :, :self.length].copy())
                for i, (k, v) in self.kv.items()}

    def set_kv_rows(self, rows: dict[int, tuple[np.ndarray, np.ndarray]], length: int) -> None:
        """Replace the state's KV rows and length (the conv state is set apart: set_conv_state)."""
        self.length = 0
        self.reserve(length)
        for i in self.kv:
            pair = []
            for array in rows[i]:
                if array.shape[2] != length:
                    raise ValueError(f"KV rows of layer {i}: {array.shape[2]} rows, expected {length}")
                if self.model.share_buffer:
                    full = np.zeros((*array.shape[:2], self.max_length, array.shape[3]), self.kv_dtype[i])
                    full[:, :, :length] = array
                    array = full
                pair.append(_from_array(np.ascontiguousarray(array, dtype=self.kv_dtype[i])))
            self.kv[i] = pair
        self.mask[:] = 0
        self.mask[:, :length] = 1
        self.length = length


def _zeros(shape: tuple[int, ...], dtype: type) -> ort.OrtValue:
    value = ort.OrtValue.ortvalue_from_shape_and_type(shape, dtype)
    if int(np.prod(shape)):
        value.update_inplace(np.zeros(shape, dtype))
    return value


def _from_array(array: np.ndarray) -> ort.OrtValue:
    """An OrtValue that owns a copy of `array` (a numpy-backed OrtValue would depend on the array's life)."""
    value = ort.OrtValue.ortvalue_from_shape_and_type(array.shape, array.dtype)
    if array.size:
        value.update_inplace(np.ascontiguousarray(array))
    return value
