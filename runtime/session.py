"""An onnxruntime session over a bundle, and the state buffers a generation carries between steps.

State lives in OrtValues allocated once per generation and bound with IOBinding:
- KV cache on a graph that shares past and present (GroupQueryAttention): one [B, Hkv, max_len, D] buffer
  per tensor, bound as both input and output; the kernel writes the new rows in place.
- KV cache on a graph that concatenates (the portable op set): the present OrtValue the step returned is
  bound as the next past, never copied through numpy.
- conv state [B, H, K-1]: two buffers per layer, swapped each step (a kernel must not read what it writes).
"""

from __future__ import annotations

import gc
import os
import weakref
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort

from . import kernels, prepack
from .bundle import (  # noqa: F401 (re-exported)
    BundleError,
    StateSpec,
    read_bundle,
    sampled_sha256,
    sha256,
    state_spec,
    verify_bundle,
)
from .growth import capacity_for, check_fits, check_rows, check_truncate, grown_mask, kv_row_bytes, padded
from .pages import release_clean_pages
from .providers import ProviderList, choose

_ORT = ort.capi.onnxruntime_pybind11_state
_LOAD_ERRORS = (_ORT.Fail, _ORT.InvalidArgument, _ORT.NoSuchFile, _ORT.InvalidProtobuf, _ORT.InvalidGraph,
                _ORT.NotImplemented, _ORT.RuntimeException)

# Every LfmSession this process opened, and those still alive, by bundle folder: the app holds a model in
# memory once, and tests hold it to that (sessions_opened / live_sessions).
_opened: Counter[str] = Counter()
_live: weakref.WeakSet[LfmSession] = weakref.WeakSet()


def sessions_opened() -> dict[str, int]:
    """How many sessions this process has created per bundle folder."""
    return dict(_opened)


def live_sessions() -> dict[str, int]:
    """Sessions per bundle folder that are still alive (after a collection: a dropped session in a
    reference cycle would otherwise still count)."""
    gc.collect()
    return dict(Counter(str(s.folder) for s in _live))


class LfmSession:
    """One loaded bundle. `providers`: "auto" (an accelerator only if it runs every heavy node, see
    providers.py), "cpu", or an explicit onnxruntime list such as [("XnnpackExecutionProvider",
    {"intra_op_num_threads": 4}), "CPUExecutionProvider"]; the choice and its reason are in
    `provider_choice`. `verify`: see verify_bundle ("sampled" by default)."""

    def __init__(self, bundle: str | Path, threads: int | None = None, providers: str | ProviderList = "auto",
                 verify: str = "sampled", prepack_cache: str = "off",
                 configure: Callable[[ort.SessionOptions], None] | None = None, attention_kernel: str = "flash"):
        """`prepack_cache` (prepack.py): "off"; "use" (map a valid cache next to the bundle if there is one);
        "auto" (the same, and write one when there is none, the folder is writable and has room). What
        happened and why is in `prepack` (a PrepackStatus); a cache never stops a bundle from loading.
        `configure`: a caller's extra settings on every SessionOptions made here (device_bench/step_profile.py
        turns on profiling). `attention_kernel`: "flash" or "unfused" (kernels.py: unfused decodes faster deep
        in a context with an int8/int4 KV cache, and its prefill chunks shrink sooner with depth)."""
        kernels.check(attention_kernel)
        if prepack_cache not in ("off", "use", "auto"):
            raise ValueError(f"prepack_cache {prepack_cache!r}: expected 'off', 'use' or 'auto'")
        cfg = read_bundle(bundle, verify, onnxruntime_version=ort.__version__)
        self.folder, self.manifest, decoder, model_file = cfg.folder, cfg.manifest, cfg.decoder, cfg.model_file
        self.share_buffer, self.context_length = cfg.share_buffer, cfg.context_length
        self.eos_token_ids, self.pad_token_id = cfg.eos_token_ids, cfg.pad_token_id
        self.attention_kernel, self.num_heads = attention_kernel, int(decoder.get("num_attention_heads", 0))
        # the bundle's target default (export/exporter.py TARGET_THREADS), never more than this machine's CPUs
        threads = threads or min(int(decoder.get("session_options", {}).get("intra_op_num_threads", 0)),
                                 os.cpu_count() or 1)

        def session_options() -> ort.SessionOptions:
            options = ort.SessionOptions()
            if threads:
                options.intra_op_num_threads = threads
            # The CPU arena keeps the largest buffers any run needed (a 512-token prefill's logits alone are
            # 512 x vocab floats) for the session's life; without it they go back after the run. 6 layers at
            # full width: RSS while decoding after a 512-token prefill 1616 -> 1315 MB, decode speed unchanged.
            options.enable_cpu_mem_arena = False
            for key, value in kernels.SESSION_CONFIG.items():  # parallel repacking at load (kernels.py)
                options.add_session_config_entry(key, value)
            # errors only: onnxruntime warns at every load that the optional input logits_to_keep (an initializer
            # that is also an input, the way a graph input gets a default) is not constant-folded, its purpose
            options.log_severity_level = 3
            if configure is not None:
                configure(options)
            return options

        def open_graph(path: Path, options: ort.SessionOptions) -> ort.InferenceSession:
            try:
                return ort.InferenceSession(str(path), options, providers=self.provider_choice.providers)
            except _LOAD_ERRORS as e:  # a damaged or foreign graph: say which file, not where onnxruntime failed
                raise BundleError(f"{path}: onnxruntime {ort.__version__} cannot load it "
                                  f"({str(e).strip().splitlines()[0][:300]})") from None

        with kernels.building(attention_kernel):
            options = session_options()
            try:
                self.provider_choice = choose(model_file, providers, options)
            except _LOAD_ERRORS as e:
                raise BundleError(f"{model_file}: onnxruntime {ort.__version__} cannot load it "
                                  f"({str(e).strip().splitlines()[0][:300]})") from None
            self.prepack, cached, writer = self._prepack_plan(prepack_cache, model_file, options, verify)
            if writer is not None:
                writer.configure(options)
            self.session = None
            if cached is not None:
                try:
                    self.session = open_graph(cached, options)
                except BundleError as e:  # refused like any mismatch: the bundle itself still loads
                    self.prepack = prepack.PrepackStatus("refused", str(e), cached.parent)
            if self.session is None:
                try:
                    self.session = open_graph(model_file, options)
                except BundleError as e:
                    if writer is None:
                        raise
                    # onnxruntime may fail while saving (a full disk): the bundle must load without a cache
                    writer.abandon(f"onnxruntime failed while writing it ({e})")
                    self.prepack, writer = writer.status, None
                    self.session = open_graph(model_file, session_options())
            self.state = state_spec(((i.name, i.shape) for i in self.session.get_inputs()), decoder)
            self.vocab_size = int(self.session.get_outputs()[0].shape[-1])  # before a cache's probe steps
            self._detect_logits_to_keep()
            if writer is not None:
                self._finish_cache(writer, lambda path: open_graph(path, session_options()))
        if not self.prepack.mapped:
            data_files = [p for p in self.folder.iterdir() if p.name.startswith(model_file.name) and p != model_file]
            self.released_bytes = release_clean_pages(data_files)  # see pages.py
        else:
            # the packed buffers are what every token reads: only raw weights' pages go (the vocabulary codes the
            # embedding gathers a few rows of, pages read while onnxruntime repacked to find its buffers)
            cache = self.prepack.folder
            self.released_bytes = release_clean_pages([cache / prepack.DATA], prepack.raw_ranges(cache / prepack.MODEL))
        self.threads = threads or 0  # 0: onnxruntime's own choice
        _opened[str(self.folder)] += 1
        _live.add(self)

    def _detect_logits_to_keep(self) -> None:
        # graphs from our exporter take an optional logits_to_keep (default 0: every row); older ones do not
        self.logits_to_keep = "logits_to_keep" in {i.name for i in self.session.get_overridable_initializers()}

    def _prepack_plan(self, mode: str, model_file: Path, options: ort.SessionOptions, verify: str
                      ) -> tuple[prepack.PrepackStatus, Path | None, prepack.Writer | None]:
        """(status so far, a valid cache's model file to load, or a Writer to make one while loading)."""
        if mode == "off":
            return prepack.PrepackStatus("off"), None, None
        if self.provider_choice.providers != ["CPUExecutionProvider"]:
            return prepack.PrepackStatus("not written", "a cache is for onnxruntime's CPU provider only, "
                                         f"this session uses {self.provider_choice.providers}"), None, None
        key = prepack.cache_key(model_file, self.manifest, ort.__version__,
                                f"graph_optimization_level={int(options.graph_optimization_level)}")
        writable = mode == "auto"
        if writable:
            prepack.remove_stale(self.folder)
        cached, refused = prepack.find(self.folder, key, verify)
        if cached is not None:
            return prepack.PrepackStatus("mapped", "", cached.parent, prepack.disk_bytes(cached.parent)), cached, None
        if not writable:
            return refused or prepack.PrepackStatus("not written", "prepack_cache='use' never writes one"), None, None
        data_bytes = sum(p.stat().st_size for p in self.folder.iterdir()
                         if p.name.startswith(model_file.name) and p != model_file)
        made = prepack.writer(self.folder, key, data_bytes)
        if isinstance(made, prepack.PrepackStatus):  # cannot write here: say so, and why any old one was refused
            if refused is not None:
                made = prepack.PrepackStatus("refused", f"{refused.reason}; not rewritten: {made.reason}",
                                             refused.folder)
            return made, None, None
        if refused is not None:
            made.status = prepack.PrepackStatus("not written", f"replacing a refused cache: {refused.reason}")
        return made.status, None, made

    def _finish_cache(self, writer: prepack.Writer, open_cached) -> None:
        """The session was created from the bundle and onnxruntime wrote the cache meanwhile: check it, map it,
        and keep the mapped session only if it answers a probe exactly as the one that repacked in memory
        (same kernels, same packed bytes: bit-identical logits), then drop the in-memory copy."""
        cached = writer.finish()
        if cached is None:
            self.prepack = writer.status
            return
        try:
            mapped = open_cached(cached)
        except BundleError as e:
            prepack.remove(self.folder)
            self.prepack = prepack.PrepackStatus("not written", f"the written cache did not load: {e}")
            return
        vocab = int(self.session.get_outputs()[0].shape[-1])
        probe = (np.arange(4, dtype=np.int64) + min(100, max(vocab - 4, 0)))[None, :]  # any 4 valid token ids
        expected = Cache(self, 1, 8).step(probe)
        repacked, self.session = self.session, mapped
        self._detect_logits_to_keep()
        if not np.array_equal(Cache(self, 1, 8).step(probe), expected):
            self.session = repacked
            self._detect_logits_to_keep()
            prepack.remove(self.folder)
            self.prepack = prepack.PrepackStatus("not written", "the written cache's output differed from the "
                                                 "bundle's (removed)")
            return
        self.prepack = writer.status
        del repacked
        gc.collect()

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
        # One IOBinding per orientation of the conv pairs (past A -> present B, then B -> A), each with the state
        # buffers bound once: a decode step then rebinds only input_ids, the mask and the logits (0.2 ms of
        # Python per token at full geometry otherwise; device_bench/RESULTS.md). Dropped when buffers are replaced.
        self._bindings: dict[int, ort.IOBinding] = {}
        self._flips = 0
        self._keep: dict[int, ort.OrtValue] = {}
        logits = next(o for o in model.session.get_outputs() if o.name == "logits")
        self.logits_dtype = ELEMENT_TYPES.get(logits.type, np.float32)
        self.mask = np.zeros((batch, max_length), dtype=np.int64)
        self.length = 0
        types = {i.name: ELEMENT_TYPES.get(i.type, np.float32) for i in model.session.get_inputs()}
        self.conv_dtype = {i: types.get(f"past.{i}.conv", np.float32) for i in model.state.conv}
        self.kv_dtype = {i: types.get(f"past_key_values.{i}.key", np.float32) for i in model.state.kv}
        self.conv = {i: [_zeros((batch, h, k), self.conv_dtype[i]) for _ in range(2)]
                     for i, (h, k) in model.state.conv.items()}
        capacity = max_length if model.share_buffer else 0
        self.row_bytes = kv_row_bytes(model.state.kv, batch, self.kv_dtype) if model.share_buffer else 0
        check_fits(capacity, self.row_bytes)
        self.kv = {i: [_zeros((batch, heads, capacity, dim), self.kv_dtype[i]) for _ in range(2)]
                   for i, (heads, dim) in model.state.kv.items()}

    def step(self, input_ids: np.ndarray, mask: np.ndarray | None = None, last: int | None = None) -> np.ndarray:
        """Run input_ids [B, S] (mask [B, S] marks padding); returns logits [B, S, V], or with `last` = n the
        last n rows [B, n, V] (the graph then computes only those, where it has the logits_to_keep input)."""
        b, s = input_ids.shape
        if self.length + s > self.max_length:
            raise ValueError(f"{self.length} + {s} tokens exceed this cache's max_length {self.max_length}")
        self.mask[:, self.length:self.length + s] = 1 if mask is None else mask
        io = self._binding()
        io.bind_cpu_input("input_ids", np.ascontiguousarray(input_ids, dtype=np.int64))
        io.bind_cpu_input("attention_mask", np.ascontiguousarray(self.mask[:, :self.length + s]))
        rows = s
        if self.model.logits_to_keep:
            keep = last or 0
            if keep not in self._keep:
                # (bind_cpu_input looks the name up among required inputs only; an OrtValue binds an overridable one)
                self._keep[keep] = ort.OrtValue.ortvalue_from_numpy(np.array([keep], dtype=np.int64))
            io.bind_ortvalue_input("logits_to_keep", self._keep[keep])
            rows = min(keep, s) if keep else s
        # onnxruntime writes the logits straight into an array the caller then owns: no output to fetch and wrap
        logits = np.empty((b, rows, self.model.vocab_size), dtype=self.logits_dtype)
        io.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(logits))
        grown = [] if self.model.share_buffer else list(self.kv)  # outputs onnxruntime allocates, in binding order
        for i in grown:  # (a name-bound output keeps the last run's value, of the last run's length: bound anew)
            for n, kv in enumerate(("key", "value")):
                io.bind_ortvalue_input(f"past_key_values.{i}.{kv}", self.kv[i][n])
                io.bind_output(f"present.{i}.{kv}")
        self.model.session.run_with_iobinding(io)
        self.length += s  # only once the step ran: a failed run leaves the state as it was before it
        for i in self.conv:
            self.conv[i].reverse()
        self._flips ^= 1
        if grown:
            kv_outputs = io.get_outputs()[len(self.conv):len(self.conv) + 2 * len(self.kv)]  # conv, kv, logits
            for n, i in enumerate(grown):
                self.kv[i] = [kv_outputs[2 * n], kv_outputs[2 * n + 1]]
        return logits if last is None else logits[:, -last:]

    def _binding(self) -> ort.IOBinding:
        """The binding for the conv pairs' current orientation, its state buffers bound (made on first use)."""
        io = self._bindings.get(self._flips)
        if io is None:
            io = self._bindings[self._flips] = self.model.session.io_binding()
            for i, (cur, nxt) in self.conv.items():
                io.bind_ortvalue_input(f"past.{i}.conv", cur)
                io.bind_ortvalue_output(f"present.{i}.conv", nxt)
            for i, (key, value) in self.kv.items():
                if self.model.share_buffer:  # present is the past buffer, written in place
                    io.bind_ortvalue_input(f"past_key_values.{i}.key", key)
                    io.bind_ortvalue_input(f"past_key_values.{i}.value", value)
                    io.bind_ortvalue_output(f"present.{i}.key", key)
                    io.bind_ortvalue_output(f"present.{i}.value", value)
                else:
                    io.bind_output(f"present.{i}.key")
                    io.bind_output(f"present.{i}.value")
        return io

    @property
    def capacity(self) -> int:
        """KV rows the buffers hold without growing (a concatenating graph grows by itself)."""
        return self.max_length

    def truncate(self, length: int) -> None:
        """Keep the first `length` tokens' KV rows: the mask hides the rest and the next step overwrites them.
        The conv state is not touched: restore it from a snapshot taken at `length` (set_conv_state)."""
        check_truncate(length, self.length)
        self.mask[:, length:] = 0
        if not self.model.share_buffer and length < self.length:
            for i, pair in self.kv.items():
                self.kv[i] = [_from_array(v.numpy()[:, :, :length]) for v in pair]
        self.length = length

    def reserve(self, rows: int) -> None:
        """Make room for `rows` tokens: the buffers grow to the next power of two >= rows (at most the
        context length; exactly `rows` where the power of two would not fit in memory, and MemoryError where
        `rows` do not either), and the rows in use are copied over."""
        new = capacity_for(rows, self.max_length, self.model.context_length, self.row_bytes)
        if new == self.max_length:
            return
        self.mask, self.max_length = grown_mask(self.mask, self.length, new), new
        if self.model.share_buffer:
            for i, pair in self.kv.items():
                self.kv[i] = [_from_array(padded(v.numpy()[:, :, :self.length], new, self.kv_dtype[i])) for v in pair]
            self._bindings.clear()  # they hold the old buffers

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
            check_rows(i, list(rows[i]), length)
            self.kv[i] = [_from_array(padded(a, self.max_length, self.kv_dtype[i]) if self.model.share_buffer
                                      else np.ascontiguousarray(a, dtype=self.kv_dtype[i])) for a in rows[i]]
        self._bindings.clear()  # they hold the old buffers
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
