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

from .. import kernels
from .. import threads as thread_choice
from ..backend import CacheBase
from ..bundle import BundleError, read_bundle, state_spec
from . import prepack
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

    def __init__(self, bundle: str | Path, threads: int | str | None = None, providers: str | ProviderList = "auto",
                 verify: str = "sampled", prepack_cache: str = "off",
                 configure: Callable[[ort.SessionOptions], None] | None = None, attention_kernel: str = "flash",
                 cores: tuple[int, ...] = (), threads_cache: str | Path | None = None):
        """`threads`: onnxruntime's intra-op threads; None: the bundle's genai_config value (export/options.py
        TARGET_THREADS) capped at this machine's CPUs, else onnxruntime's own choice; "auto": measured on this
        device once per bundle (runtime/threads.py) and remembered in `threads_cache` (a JSON file; None: the
        user's cache folder), the choice and its sweep in `thread_choice`. `cores`: pin the pool's threads to
        these logical CPUs (0-based; "auto" sets it on big.LITTLE phones).
        `prepack_cache` (prepack.py): "off"; "use" (map a valid cache next to the bundle if there is one);
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
        self._decoder = decoder
        bundle_threads = cfg.threads
        self.thread_choice: thread_choice.ThreadChoice | None = None
        if threads == "auto":
            def candidate(c: thread_choice.Candidate) -> LfmSession:
                return LfmSession(self.folder, threads=c.threads, cores=c.cores, providers=providers, verify="none",
                                  configure=configure, attention_kernel=attention_kernel)

            self.thread_choice, _ = thread_choice.choose(self.folder, candidate, bundle_threads,
                                                         threads_cache or thread_choice.default_cache_path())
            threads, cores = self.thread_choice.threads, self.thread_choice.cores
        elif isinstance(threads, str) or (threads is not None and threads < 0):
            raise ValueError(f"threads {threads!r}: expected a count, None or 'auto'")
        # the bundle's target default (export/options.py TARGET_THREADS), never more than this machine's CPUs
        threads = threads or min(bundle_threads or 0, os.cpu_count() or 1)
        thread_choice.check_cores(cores)
        affinity = thread_choice.affinity(threads, cores)

        def session_options() -> ort.SessionOptions:
            options = ort.SessionOptions()
            if threads:
                options.intra_op_num_threads = threads
            if affinity:  # one entry per pool thread beyond the caller's (threads.affinity)
                options.add_session_config_entry(thread_choice.AFFINITY_KEY, affinity)
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
            session, self.prepack = prepack.load(
                prepack_cache, self.folder, self.manifest, model_file, verify=verify,
                cpu_only=self.provider_choice.providers == ["CPUExecutionProvider"],
                onnxruntime_version=ort.__version__, options=options, fresh_options=session_options,
                open_graph=open_graph, probe=self._probe)
            self._adopt(session, decoder)
        if not self.prepack.mapped:
            data_files = [p for p in self.folder.iterdir() if p.name.startswith(model_file.name) and p != model_file]
            self.released_bytes = release_clean_pages(data_files)  # see pages.py
        else:
            # the packed buffers are what every token reads: only raw weights' pages go (the vocabulary codes the
            # embedding gathers a few rows of, pages read while onnxruntime repacked to find its buffers)
            cache = self.prepack.folder
            self.released_bytes = release_clean_pages([cache / prepack.DATA], prepack.raw_ranges(cache / prepack.MODEL))
        self.threads = threads or 0  # 0: onnxruntime's own choice
        self.cores = tuple(cores) if affinity else ()
        _opened[str(self.folder)] += 1
        _live.add(self)

    def _adopt(self, session: ort.InferenceSession, decoder: dict | None = None) -> None:
        """Use `session`, and read what the state layout and the logits are from its graph."""
        self.session = session
        self.state = state_spec(((i.name, i.shape) for i in session.get_inputs()), decoder or self._decoder)
        self._decoder = decoder or self._decoder
        self.vocab_size = int(session.get_outputs()[0].shape[-1])
        # graphs from our exporter take an optional logits_to_keep (default 0: every row); older ones do not
        self.logits_to_keep = "logits_to_keep" in {i.name for i in session.get_overridable_initializers()}

    def _probe(self, session: ort.InferenceSession) -> np.ndarray:
        """Logits of a fixed 4-token step on `session` (prepack.load compares a mapped cache with it)."""
        self._adopt(session)
        probe = (np.arange(4, dtype=np.int64) + min(100, max(self.vocab_size - 4, 0)))[None, :]
        return Cache(self, 1, 8).step(probe)

    @property
    def provider(self) -> str:
        return self.session.get_providers()[0]

    def new_cache(self, batch: int, max_length: int) -> Cache:
        """State for one token sequence (runtime/backend.py's Session contract)."""
        return Cache(self, batch, max_length)


ELEMENT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int8)": np.int8,
                 "tensor(uint8)": np.uint8}


class Cache(CacheBase):
    """One token sequence's state buffers (OrtValues), bound to an IOBinding; `step` runs one forward pass.
    The bookkeeping (growth, rollback, the state as arrays) is CacheBase's."""

    def __init__(self, model: LfmSession, batch: int, max_length: int):
        # One IOBinding per orientation of the conv pairs (past A -> present B, then B -> A), each with the state
        # buffers bound once: a decode step then rebinds only input_ids, the mask and the logits (0.2 ms of
        # Python per token at full geometry otherwise: the overhead note of 2026-11-30 in device_bench/results/notes).
        # Dropped when buffers are replaced.
        self._bindings: dict[int, ort.IOBinding] = {}
        self._flips = 0
        self._keep: dict[int, ort.OrtValue] = {}
        logits = next(o for o in model.session.get_outputs() if o.name == "logits")
        self.logits_dtype = ELEMENT_TYPES.get(logits.type, np.float32)
        types = {i.name: ELEMENT_TYPES.get(i.type, np.float32) for i in model.session.get_inputs()}
        super().__init__(model, batch, max_length,
                         conv_dtype={i: types.get(f"past.{i}.conv", np.float32) for i in model.state.conv},
                         kv_dtype={i: types.get(f"past_key_values.{i}.key", np.float32) for i in model.state.kv})

    def _tensor(self, array: np.ndarray) -> ort.OrtValue:
        return _from_array(array)

    def _zeros(self, shape: tuple[int, ...], dtype: type) -> ort.OrtValue:
        return _zeros(shape, dtype)

    def _array(self, tensor: ort.OrtValue, shape: tuple[int, ...], dtype: type) -> np.ndarray:
        return tensor.numpy()  # a view of the buffer (a step after next overwrites a conv buffer: callers copy)

    def _write(self, tensor: ort.OrtValue, array: np.ndarray) -> ort.OrtValue:
        tensor.update_inplace(array)
        return tensor

    def _replaced(self) -> None:
        self._bindings.clear()  # they hold the old buffers

    def _run(self, input_ids: np.ndarray, total: int, last: int | None) -> np.ndarray:
        b, s = input_ids.shape
        io = self._binding()
        io.bind_cpu_input("input_ids", input_ids)
        io.bind_cpu_input("attention_mask", np.ascontiguousarray(self.mask[:, :total]))
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
