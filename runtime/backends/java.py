"""LfmSession's surface over onnxruntime's Java API (the onnxruntime-android AAR), reached through pyjnius.

For a python-for-android build, which has no onnxruntime Python binding: buildozer.spec pulls
`com.microsoft.onnxruntime:onnxruntime-android` with `android.gradle_dependencies`, and this module drives
its classes (package ai.onnxruntime) with `jnius.autoclass`.

Where the state lives. Everything a generation carries between steps stays on the Java side, in direct
ByteBuffers allocated once per generation and wrapped once in OnnxTensors (`OnnxTensor.createTensor(env,
FloatBuffer, long[])` uses a direct buffer's memory as the tensor's memory, no copy; the buffer must be in
native byte order):
- conv state: two tensors per conv layer; each step reads one as `past.{i}.conv` and has onnxruntime write
  the other as `present.{i}.conv` (a pinned output), then they swap. A kernel never reads what it writes.
- KV on a shared-buffer graph (genai_config `search.past_present_share_buffer`, GroupQueryAttention): one
  [B,Hkv,max_length,D] tensor per key and value, passed as `past_key_values.{i}.*` and pinned as
  `present.{i}.*`; the kernel appends the new rows in place. This is what backends/python.py does with
  IOBinding, and what onnxruntime-genai does.
- KV on a concatenating graph (portable op set): present comes back one step longer; it is requested
  as an onnxruntime-allocated output and the OnnxTensor from `OrtSession.Result` is the next step's past.
  That Result is closed after the next step has run (closing a Result closes the values it owns).
- logits: pinned to a direct buffer sized for the largest [B,S,V] seen; only the last position of each row
  is copied out (direct buffer -> a heap ByteBuffer in Java -> one byte[] -> numpy.frombuffer). A prefill
  computes every row's logits here: the graph's `logits_to_keep` is an overridable initializer (so that
  onnxruntime-genai, which never feeds it, runs the same graph), and the Java API's `OrtSession.run` refuses
  any name outside `getInputNames()`, which lists required inputs only ("Unknown input name"). The
  Objective-C backend passes it (`overridableInitializerNamesWithError:`).

Pinned outputs are `OrtSession.run(Map<String,? extends OnnxTensorLike> inputs, Set<String>
requestedOutputs, Map<String,? extends OnnxValue> pinnedOutputs, RunOptions)`; the Result it returns holds
the pinned values too but does not own them (`Result.isResultOwner(i)` is false), so closing it leaves them
open. Read from the AAR's OrtSession (decompiled copies of recent onnxruntime-android, which also have
OrtEpDevice, i.e. 1.22 or later). An AAR without that overload cannot keep past == present: for such a
runtime `pinned=False` feeds every output back through the Result (correct, but a shared-buffer graph then
copies its whole KV buffer each step inside GroupQueryAttention, and conv states are reallocated).

Conversation state (runtime/README.md, "State that outlives a generation"): `truncate`, `reserve`,
`conv_state`/`set_conv_state` and `kv_rows`/`set_kv_rows` read a tensor through a heap ByteBuffer (its direct
buffer, or `OnnxTensor.getByteBuffer()` for a Result's output) and write new state into direct buffers of
the cache's own; they run at turn boundaries, never per step.

Lifetimes: `JavaCache.close()` (also called when a cache is garbage-collected) closes every OnnxTensor and
the held Result; the per-step input tensors are closed right after their run. Each Python thread that used
pyjnius must call `jnius.detach()` before it ends (backends.release_thread() does it).
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from .. import kernels
from ..backend import CacheBase
from ..bundle import BundleError, StateSpec, state_spec
from ..threads import AFFINITY_KEY, ThreadChoice
from ..threads import affinity as thread_affinity
from .plan import kv_cache_type, read_bundle, step_names

LITTLE = sys.byteorder == "little"


def java_classes() -> SimpleNamespace:
    """The Java classes this backend uses, through pyjnius (the JVM starts on first use)."""
    from jnius import autoclass, cast

    return SimpleNamespace(
        OrtEnvironment=autoclass("ai.onnxruntime.OrtEnvironment"),
        SessionOptions=autoclass("ai.onnxruntime.OrtSession$SessionOptions"),
        OnnxTensor=autoclass("ai.onnxruntime.OnnxTensor"),
        OnnxJavaType=autoclass("ai.onnxruntime.OnnxJavaType"),
        ByteBuffer=autoclass("java.nio.ByteBuffer"),
        ByteOrder=autoclass("java.nio.ByteOrder"),
        HashMap=autoclass("java.util.HashMap"),
        HashSet=autoclass("java.util.HashSet"),
        cast=cast)


class JavaSession:
    """One loaded bundle over onnxruntime's Java API. `classes`: what `java_classes()` returns (tests pass
    stand-ins). `pinned`: use OrtSession.run with pinned outputs (None: detect the overload)."""

    def __init__(self, bundle: str | Path, threads: int | None = None, classes: Any = None,
                 pinned: bool | None = None, verify: str = "size", attention_kernel: str = "flash",
                 cores: tuple[int, ...] = ()):
        kernels.check(attention_kernel)
        cfg = read_bundle(bundle, verify)
        self.attention_kernel, self.num_heads = attention_kernel, int(cfg.decoder.get("num_attention_heads", 0))
        self.kv_dtype, _ = kv_cache_type(cfg, "Java")  # the graph's KV dims already count packed bytes
        self.folder, self.manifest = cfg.folder, cfg.manifest
        self.share_buffer, self.context_length = cfg.share_buffer, cfg.context_length
        self.eos_token_ids, self.pad_token_id = cfg.eos_token_ids, cfg.pad_token_id
        self.J = J = classes or java_classes()
        self.env = J.OrtEnvironment.getEnvironment()
        options = J.SessionOptions()
        if threads:
            options.setIntraOpNumThreads(int(threads))
        affinity = thread_affinity(int(threads or 0), cores)  # the pool's threads on these CPUs (threads.py)
        if affinity:
            options.addConfigEntry(AFFINITY_KEY, affinity)
        self.threads, self.cores = int(threads or 0), tuple(cores) if affinity else ()
        self.thread_choice: ThreadChoice | None = None  # open_session's "auto" sets it
        for key, value in kernels.SESSION_CONFIG.items():  # as LfmSession
            options.addConfigEntry(key, value)
        try:
            with kernels.building(attention_kernel):  # onnxruntime reads it from this process's environment
                self.session = self.env.createSession(str(cfg.model_file), options)
        except Exception as e:  # OrtException arrives as jnius.JavaException
            raise BundleError(f"{cfg.model_file}: onnxruntime (Java) could not load it: {e}") from None
        self._options = options  # must outlive the session (OrtSession.SessionOptions javadoc)
        inputs = _shapes(J, self.session.getInputInfo(), self.session.getInputNames())
        outputs = _shapes(J, self.session.getOutputInfo(), self.session.getOutputNames())
        self.state: StateSpec = state_spec(inputs.items(), cfg.decoder)
        self.names = step_names(self.state, cfg.decoder)
        missing = [n for n in self.names.inputs if n not in inputs] + \
                  [n for n in self.names.outputs if n not in outputs]
        if missing:
            raise BundleError(f"{cfg.model_file}: the graph lacks {', '.join(missing)} (not an LFM2 bundle?)")
        v = outputs[self.names.logits][-1]
        self.vocab_size = int(v) if isinstance(v, int) and v > 0 else cfg.vocab_size
        if not self.vocab_size:
            raise BundleError(f"{cfg.model_file}: vocabulary size unknown (symbolic logits, no vocab_size)")
        self.pinned = _has_pinned_run(self.session) if pinned is None else pinned

    @property
    def provider(self) -> str:
        return "CPUExecutionProvider"

    def new_cache(self, batch: int, max_length: int) -> JavaCache:
        return JavaCache(self, batch, max_length)

    def close(self) -> None:
        self.session.close()
        self._options.close()


def _shapes(J: Any, info: Any, names: Any) -> dict[str, list[int]]:
    """{name: shape} from OrtSession.getInputInfo()/getOutputInfo() (Map<String, NodeInfo>); NodeInfo.getInfo()
    is a ValueInfo, a TensorInfo for tensors, whose getShape() gives -1 for symbolic dims."""
    out = {}
    for name in names.toArray():
        value = info.get(name).getInfo()
        out[str(name)] = [int(d) for d in J.cast("ai.onnxruntime.TensorInfo", value).getShape()]
    return out


def _has_pinned_run(session: Any) -> bool:
    """Whether this OrtSession has run(Map, Set, Map, RunOptions), the overload with pinned outputs."""
    try:
        methods = session.getClass().getMethods()
    except Exception:  # a stand-in without reflection: assume the current API
        return True
    return any(m.getName() == "run" and m.getParameterCount() == 4 and
               m.getParameterTypes()[2].getName() == "java.util.Map" for m in methods)


class _Direct:
    """A direct, native-order ByteBuffer and the typed view an OnnxTensor wraps."""

    def __init__(self, J: Any, nbytes: int):
        self.nbytes = nbytes
        self.bytes = J.ByteBuffer.allocateDirect(max(nbytes, 8)).order(J.ByteOrder.nativeOrder())

    def write(self, data: bytes) -> None:
        b = self.bytes
        b.clear()
        b.put(data)  # ByteBuffer.put(byte[]): pyjnius hands bytes over with one copy
        b.flip()

    def floats(self, count: int) -> Any:
        b = self.bytes
        b.clear()
        b.limit(count * 4)
        return b.asFloatBuffer()  # a direct FloatBuffer over [0, count) in native order

    def raw(self, count: int) -> Any:
        b = self.bytes
        b.clear()
        b.limit(count)
        return b  # the direct ByteBuffer over [0, count), for int8/uint8 tensors

    def longs(self, count: int) -> Any:
        b = self.bytes
        b.clear()
        b.limit(count * 8)
        return b.asLongBuffer()


class JavaCache(CacheBase):
    """Per-generation state on the Java side; `step` runs one forward pass (CacheBase keeps the books)."""

    def __init__(self, model: JavaSession, batch: int, max_length: int):
        J = model.J
        self.J, self.env = J, model.env
        # every long-lived OnnxTensor, and the last Result (its outputs are this step's past when they are not
        # pinned); close() or garbage collection closes them
        self._res = SimpleNamespace(tensors=[], held=None, direct={})  # direct: id(tensor) -> (_Direct, shape)
        self._ids = _Direct(J, batch * max_length * 8)
        self._mask = _Direct(J, batch * max_length * 8)
        self._logits: _Direct | None = None
        self._heap = J.ByteBuffer.allocate(batch * model.vocab_size * 4)  # Java heap: the rows we copy out
        self.conv_buffers = 2 if model.pinned else 1
        self._finalizer = weakref.finalize(self, _close_all, self._res)
        super().__init__(model, batch, max_length, conv_dtype=dict.fromkeys(model.state.conv, np.float32),
                         kv_dtype=dict.fromkeys(model.state.kv, model.kv_dtype))  # float32, or int8/uint8

    def _zeros(self, shape: tuple[int, ...], dtype: Any) -> Any:
        return self._new(shape, None, dtype)  # allocateDirect zero-fills

    def _tensor(self, array: np.ndarray) -> Any:
        return self._new(array.shape, array, array.dtype)

    def _new(self, shape: tuple[int, ...], data: np.ndarray | None, dtype: Any) -> Any:
        """A tensor over its own direct buffer: zero-filled, or `data`. float32, or int8/uint8 (an int8/int4 KV
        cache) through createTensor(env, ByteBuffer, long[], OnnxJavaType)."""
        count, dtype = int(np.prod(shape)), np.dtype(dtype)
        buf = _Direct(self.J, count * dtype.itemsize)
        if data is not None and count:
            buf.write(np.ascontiguousarray(data, dtype=dtype).tobytes())
        if dtype == np.float32:
            t = self.J.OnnxTensor.createTensor(self.env, buf.floats(count), list(shape))
        else:
            kind = self.J.OnnxJavaType.INT8 if dtype == np.int8 else self.J.OnnxJavaType.UINT8
            t = self.J.OnnxTensor.createTensor(self.env, buf.raw(count), list(shape), kind)
        self._res.tensors.append(t)  # the OnnxTensor keeps a Java reference to its buffer
        self._res.direct[id(t)] = (buf, tuple(shape))
        return t

    def _array(self, tensor: Any, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        """A copy of a tensor's data: from its direct buffer, or a Result output's getByteBuffer()."""
        n = int(np.prod(shape)) * np.dtype(dtype).itemsize
        if not n:
            return np.zeros(shape, dtype)
        own = self._res.direct.get(id(tensor))
        src = own[0].bytes.duplicate() if own else tensor.getByteBuffer()
        src.position(0)
        src.limit(n)
        heap = self.J.ByteBuffer.allocate(n)
        heap.put(src)
        data = heap.array()
        raw = data.tostring() if hasattr(data, "tostring") else bytes(data)
        return np.frombuffer(raw[:n], dtype=dtype).reshape(shape).copy()

    def _write(self, tensor: Any, array: np.ndarray) -> Any:
        own = self._res.direct.get(id(tensor))
        if own is None:  # a Result's output (no pinned outputs): the next step reads a tensor of our own instead
            return self._tensor(array)
        own[0].write(array.tobytes())
        return tensor

    def _release(self, tensor: Any) -> None:
        """Close a tensor of the cache's own (a Result's own close with the Result)."""
        if id(tensor) in self._res.direct:
            del self._res.direct[id(tensor)]
            self._res.tensors = [t for t in self._res.tensors if t is not tensor]
            tensor.close()

    def _grown(self, capacity: int) -> None:
        self._ids, self._mask = _Direct(self.J, self.batch * capacity * 8), _Direct(self.J, self.batch * capacity * 8)

    def _run(self, input_ids: np.ndarray, total: int, last: int | None) -> np.ndarray:
        """The logits of the last position, [B, 1, V] (the generation loop reads logits[:, -1]; the other rows
        never leave the Java side)."""
        b, s = input_ids.shape
        J, names, model, v = self.J, self.model.names, self.model, self.model.vocab_size
        self._ids.write(input_ids.tobytes())
        self._mask.write(np.ascontiguousarray(self.mask[:, :total]).tobytes())
        step_tensors = [J.OnnxTensor.createTensor(self.env, self._ids.longs(b * s), [b, s]),
                        J.OnnxTensor.createTensor(self.env, self._mask.longs(b * total), [b, total])]
        if model.pinned:
            if self._logits is None or self._logits.nbytes < b * s * v * 4:
                self._logits = _Direct(J, b * s * v * 4)
            logits = J.OnnxTensor.createTensor(self.env, self._logits.floats(b * s * v), [b, s, v])
            step_tensors.append(logits)
        inputs, pinned, requested = J.HashMap(), J.HashMap(), J.HashSet()
        inputs.put("input_ids", step_tensors[0])
        inputs.put("attention_mask", step_tensors[1])
        if model.pinned:
            pinned.put(names.logits, logits)
        else:
            requested.add(names.logits)
        for i, past, present in names.conv:
            inputs.put(past, self.conv[i][0])
            if model.pinned:
                pinned.put(present, self.conv[i][1])
            else:
                requested.add(present)
        for i, pk, pv, qk, qv in names.kv:
            key, value = self.kv[i]
            inputs.put(pk, key)
            inputs.put(pv, value)
            if model.share_buffer and model.pinned:
                pinned.put(qk, key)
                pinned.put(qv, value)
            else:
                requested.add(qk)
                requested.add(qv)
        try:
            if model.pinned:
                result = model.session.run(inputs, requested, pinned, None)
            else:  # run(Map, Set): in every version of the Java API
                result = model.session.run(inputs, requested)
        except Exception:
            if model.pinned:
                logits.close()
            raise
        finally:
            for t in step_tensors[:2]:
                t.close()
        previous, self._res.held = self._res.held, None
        try:
            if model.pinned:
                for i in self.conv:
                    self.conv[i].reverse()
            else:
                for i, _, present in names.conv:
                    self.conv[i] = [self._from(result, present)]
            if not (model.share_buffer and model.pinned):
                for i, _, _, qk, qv in names.kv:
                    self.kv[i] = [self._from(result, qk), self._from(result, qv)]
            if not model.pinned:
                logits = self._from(result, names.logits)
            rows = self._last_rows(logits, b, s, v)
        finally:
            if previous is not None:
                previous.close()  # the outputs that were this step's past
            self._res.held = result
            if model.pinned:
                logits.close()  # the pinned logits view; its direct buffer is reused
        return rows

    def _from(self, result: Any, name: str) -> Any:
        value = result.get(name)
        if not value.isPresent():
            raise RuntimeError(f"onnxruntime returned no {name!r}")
        return self.J.cast("ai.onnxruntime.OnnxTensor", value.get())

    def _last_rows(self, logits: Any, b: int, s: int, v: int) -> np.ndarray:
        """The last position of each row, copied Java-side into one heap byte[] that crosses once."""
        heap = self._heap
        heap.clear()
        if self.model.pinned:
            src = self._logits.bytes
            for r in range(b):
                start = ((r * s) + s - 1) * v * 4
                view = src.duplicate()
                view.limit(start + v * 4)
                view.position(start)
                heap.put(view)
        else:  # an onnxruntime-allocated output: OnnxTensor.getByteBuffer() is a native-order copy
            src = logits.getByteBuffer()
            for r in range(b):
                start = ((r * s) + s - 1) * v * 4
                src.limit(start + v * 4)
                src.position(start)
                heap.put(src)
        data = heap.array()
        raw = data.tostring() if hasattr(data, "tostring") else bytes(data)
        return np.frombuffer(raw[:b * v * 4], dtype=np.float32).reshape(b, 1, v).copy()

    def close(self) -> None:
        self._finalizer()


def _close_all(res: SimpleNamespace) -> None:
    if res.held is not None:
        res.held.close()
        res.held = None
    for t in res.tensors:
        t.close()
    res.tensors.clear()
    res.direct.clear()


def watch_trim_memory(callback: Callable[[int], None], activity: Any = None) -> Any:
    """Call `callback(level)` on Android's onTrimMemory(level) (ComponentCallbacks2's TRIM_MEMORY_* values;
    onLowMemory as 80, TRIM_MEMORY_COMPLETE), through a ComponentCallbacks2 registered on the app's activity
    (python-for-android's PythonActivity by default). The callback runs on Android's main thread. Returns the
    registered object: keep it referenced (pyjnius drops a collected one) and pass it to
    `activity.unregisterComponentCallbacks` to stop. runtime/pressure.py maps the levels."""
    from jnius import PythonJavaClass, autoclass, java_method  # pyjnius: on Android only

    class TrimCallbacks(PythonJavaClass):
        __javainterfaces__ = ["android/content/ComponentCallbacks2"]
        __javacontext__ = "app"

        @java_method("(I)V")
        def onTrimMemory(self, level: int) -> None:  # noqa: N802 (Java's name)
            callback(int(level))

        @java_method("()V")
        def onLowMemory(self) -> None:  # noqa: N802
            callback(80)

        @java_method("(Landroid/content/res/Configuration;)V")
        def onConfigurationChanged(self, config: Any) -> None:  # noqa: N802
            pass

    watcher = TrimCallbacks()
    activity = activity or autoclass("org.kivy.android.PythonActivity").mActivity
    activity.registerComponentCallbacks(watcher)
    return watcher


ANDROID_THERMAL = ("none", "light", "moderate", "severe", "critical", "emergency", "shutdown")  # PowerManager


def thermal_status(activity: Any = None) -> str:
    """Android's thermal status (PowerManager.getCurrentThermalStatus, API 29+: THERMAL_STATUS_NONE ... SHUTDOWN)
    as a word; the benchmark records it beside the temperatures /sys exposes."""
    from jnius import autoclass, cast  # pyjnius: on Android only

    activity = activity or autoclass("org.kivy.android.PythonActivity").mActivity
    context = autoclass("android.content.Context")
    power = cast("android.os.PowerManager", activity.getSystemService(context.POWER_SERVICE))
    level = int(power.getCurrentThermalStatus())
    return ANDROID_THERMAL[level] if 0 <= level < len(ANDROID_THERMAL) else f"status {level}"
