"""LfmSession's surface over onnxruntime's Objective-C API (the onnxruntime-objc pod), reached through pyobjus.

For a kivy-ios build, which has no onnxruntime Python binding. The API used, from onnxruntime's
objectivec/include headers (ort_env.h, ort_session.h, ort_value.h, ort_enums.h):
- `[[ORTEnv alloc] initWithLoggingLevel:error:]`, `[[ORTSessionOptions alloc] initWithError:]`,
  `setIntraOpNumThreads:error:`, `addConfigEntryWithKey:value:error:`,
  `[[ORTSession alloc] initWithEnv:modelPath:sessionOptions:error:]`;
- `inputNamesWithError:` / `outputNamesWithError:` (names only: the Objective-C API reports no input
  shapes, so the state dims come from genai_config.json, see plan.state_from_config);
- `[[ORTValue alloc] initWithTensorData:(NSMutableData*) elementType: shape:(NSArray<NSNumber*>*) error:]`:
  the tensor uses the NSMutableData's bytes, no copy;
- `runWithInputs:outputs:runOptions:error:` runs with pre-allocated outputs (returns BOOL).

Memory: every buffer is a numpy array owned by the cache; `[NSMutableData dataWithBytesNoCopy:length:
freeWhenDone:NO]` wraps its memory, so onnxruntime reads and writes the numpy memory directly and the
logits are read without any copy across the bridge. Shared-buffer KV: one ORTValue passed as past and as
present; conv states: two per layer, swapped each step; a concatenating graph: present is pre-allocated
with its known shape [B,Hkv,P+S,D] each step and becomes the next past. The ORTValues and NSData objects are
released when the cache drops them (ARC through pyobjus); the numpy arrays they wrap live as long as the
cache.

Not run on iOS from this repository (no macOS here); tests drive it with stand-ins for the Objective-C
classes that hand numpy memory to onnxruntime's Python binding.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from .. import kernels
from ..backend import CacheBase
from ..bundle import BundleError, StateSpec
from ..threads import AFFINITY_KEY, ThreadChoice
from ..threads import affinity as thread_affinity
from .plan import kv_cache_type, read_bundle, state_from_config, step_names

# ort_enums.h: ORTTensorElementDataType {Undefined, Float, Int8, UInt8, Int32, UInt32, Int64, ...}
ELEMENT_FLOAT, ELEMENT_INT8, ELEMENT_UINT8, ELEMENT_INT64 = 1, 2, 3, 6
ELEMENT_TYPES = {np.dtype(np.float32): ELEMENT_FLOAT, np.dtype(np.int8): ELEMENT_INT8,
                 np.dtype(np.uint8): ELEMENT_UINT8, np.dtype(np.int64): ELEMENT_INT64}
LOGGING_WARNING = 2  # ORTLoggingLevel {Verbose, Info, Warning, Error, Fatal}


def objc_classes() -> SimpleNamespace:
    from pyobjus import autoclass

    return SimpleNamespace(**{name: autoclass(name) for name in (
        "ORTEnv", "ORTSession", "ORTSessionOptions", "ORTValue", "NSMutableData", "NSMutableDictionary",
        "NSMutableArray", "NSNumber")})


def _names(nsarray: Any) -> list[str]:
    if nsarray is None:
        raise BundleError("onnxruntime (Objective-C) returned no input/output names")
    out = []
    for i in range(nsarray.count()):
        item = nsarray.objectAtIndex_(i)
        out.append(item.UTF8String() if hasattr(item, "UTF8String") else str(item))
    return [n.decode() if isinstance(n, bytes) else n for n in out]


class ObjcSession:
    """One loaded bundle over onnxruntime-objc. `classes`: what objc_classes() returns (tests pass stand-ins)."""

    def __init__(self, bundle: str | Path, threads: int | None = None, classes: Any = None, verify: str = "size",
                 attention_kernel: str = "flash", cores: tuple[int, ...] = ()):
        kernels.check(attention_kernel)
        cfg = read_bundle(bundle, verify)
        self.attention_kernel, self.num_heads = attention_kernel, int(cfg.decoder.get("num_attention_heads", 0))
        self.kv_dtype, kv_pack = kv_cache_type(cfg, "Objective-C")
        self.folder, self.manifest = cfg.folder, cfg.manifest
        self.share_buffer, self.context_length = cfg.share_buffer, cfg.context_length
        self.eos_token_ids, self.pad_token_id = cfg.eos_token_ids, cfg.pad_token_id
        self.C = C = classes or objc_classes()
        self.env = C.ORTEnv.alloc().initWithLoggingLevel_error_(LOGGING_WARNING, None)
        options = C.ORTSessionOptions.alloc().initWithError_(None)
        if threads:
            options.setIntraOpNumThreads_error_(int(threads), None)
        affinity = thread_affinity(int(threads or 0), cores)  # iOS does not pin threads; kept for the contract
        if affinity:
            options.addConfigEntryWithKey_value_error_(AFFINITY_KEY, affinity, None)
        self.threads, self.cores = int(threads or 0), tuple(cores) if affinity else ()
        self.thread_choice: ThreadChoice | None = None  # open_session's "auto" sets it
        for key, value in kernels.SESSION_CONFIG.items():  # as LfmSession
            options.addConfigEntryWithKey_value_error_(key, value, None)
        with kernels.building(attention_kernel):  # onnxruntime reads it from this process's environment
            self.session = C.ORTSession.alloc().initWithEnv_modelPath_sessionOptions_error_(
                self.env, str(cfg.model_file), options, None)
        if self.session is None:
            raise BundleError(f"{cfg.model_file}: onnxruntime (Objective-C) could not load it")
        self.state: StateSpec = state_from_config(cfg.decoder, kv_pack)
        self.names = step_names(self.state, cfg.decoder)
        inputs = set(_names(self.session.inputNamesWithError_(None)))
        outputs = set(_names(self.session.outputNamesWithError_(None)))
        missing = [n for n in self.names.inputs if n not in inputs] + \
                  [n for n in self.names.outputs if n not in outputs]
        extra = sorted(n for n in inputs if n.startswith(("past.", "past_key_values.")) and n not in self.names.inputs)
        if missing or extra:
            raise BundleError(f"{cfg.model_file}: graph state does not match genai_config.json "
                              f"(missing {missing}, unexpected {extra})")
        if not cfg.vocab_size:
            raise BundleError(f"{cfg.folder / 'genai_config.json'}: model.vocab_size is needed by this backend")
        self.vocab_size = cfg.vocab_size
        # graphs from our exporter compute only the rows logits_to_keep asks for (an overridable initializer:
        # onnxruntime-genai never feeds it); ORTSession lists those apart from the inputs
        overridable = getattr(self.session, "overridableInitializerNamesWithError_", None)
        self.logits_to_keep = overridable is not None and "logits_to_keep" in _names(overridable(None))

    @property
    def provider(self) -> str:
        return "CPUExecutionProvider"

    def new_cache(self, batch: int, max_length: int) -> ObjcCache:
        return ObjcCache(self, batch, max_length)


class ObjcCache(CacheBase):
    """Every tensor is an (ORTValue, numpy array) pair: the ORTValue wraps the array's memory, so the state is
    read and written as the arrays themselves (CacheBase keeps the books)."""

    def __init__(self, model: ObjcSession, batch: int, max_length: int):
        self.C = model.C
        self._ids = np.zeros(batch * max_length, dtype=np.int64)
        self._logits = np.zeros(0, dtype=np.float32)
        super().__init__(model, batch, max_length, conv_dtype=dict.fromkeys(model.state.conv, np.float32),
                         kv_dtype=dict.fromkeys(model.state.kv, model.kv_dtype))  # float32, or int8/uint8

    def _tensor(self, array: np.ndarray) -> tuple[Any, np.ndarray]:
        return self._value(np.array(array))

    def _zeros(self, shape: tuple[int, ...], dtype: Any) -> tuple[Any, np.ndarray]:
        return self._value(np.zeros(shape, dtype))

    def _array(self, tensor: tuple[Any, np.ndarray], shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        return tensor[1]

    def _write(self, tensor: tuple[Any, np.ndarray], array: np.ndarray) -> tuple[Any, np.ndarray]:
        tensor[1][...] = array  # the ORTValue reads this memory: no new value needed
        return tensor

    def _grown(self, capacity: int) -> None:
        self._ids = np.zeros(self.batch * capacity, dtype=np.int64)

    def _value(self, array: np.ndarray) -> tuple[Any, np.ndarray]:
        """(ORTValue over `array`'s memory, array). The array must stay referenced while the value is used."""
        C = self.C
        data = C.NSMutableData.dataWithBytesNoCopy_length_freeWhenDone_(array.ctypes.data, array.nbytes, False)
        shape = C.NSMutableArray.alloc().init()
        for d in array.shape:
            shape.addObject_(C.NSNumber.numberWithLongLong_(int(d)))
        kind = ELEMENT_TYPES[array.dtype]
        value = C.ORTValue.alloc().initWithTensorData_elementType_shape_error_(data, kind, shape, None)
        if value is None:
            raise RuntimeError(f"ORTValue could not wrap a {array.dtype} tensor of shape {array.shape}")
        return value, array

    def _run(self, input_ids: np.ndarray, total: int, last: int | None) -> np.ndarray:
        """The last position's logits [B, 1, V] (read from the buffer onnxruntime wrote, no bridge copy)."""
        b, s = input_ids.shape
        model, names, v = self.model, self.model.names, self.model.vocab_size
        ids = self._ids[:b * s].reshape(b, s)
        ids[...] = input_ids
        mask_now = np.ascontiguousarray(self.mask[:, :total])
        rows = 1 if model.logits_to_keep else s  # the graph computes the last row only, where it can
        if self._logits.size < b * rows * v:
            self._logits = np.zeros(b * rows * v, dtype=np.float32)
        logits = self._logits[:b * rows * v].reshape(b, rows, v)
        keep = [self._value(ids), self._value(mask_now), self._value(logits)]
        inputs, outputs = self.C.NSMutableDictionary.alloc().init(), self.C.NSMutableDictionary.alloc().init()
        inputs.setObject_forKey_(keep[0][0], "input_ids")
        inputs.setObject_forKey_(keep[1][0], "attention_mask")
        if model.logits_to_keep:
            keep.append(self._value(np.ones(1, np.int64)))
            inputs.setObject_forKey_(keep[-1][0], "logits_to_keep")
        outputs.setObject_forKey_(keep[2][0], names.logits)
        for i, past, present in names.conv:
            inputs.setObject_forKey_(self.conv[i][0][0], past)
            outputs.setObject_forKey_(self.conv[i][1][0], present)
        grown = {}
        for i, pk, pv, qk, qv in names.kv:
            (key, key_arr), (value, _) = self.kv[i]
            inputs.setObject_forKey_(key, pk)
            inputs.setObject_forKey_(value, pv)
            if model.share_buffer:
                outputs.setObject_forKey_(key, qk)
                outputs.setObject_forKey_(value, qv)
            else:
                shape = (b, key_arr.shape[1], total, key_arr.shape[3])
                grown[i] = [self._value(np.empty(shape, key_arr.dtype)) for _ in range(2)]
                outputs.setObject_forKey_(grown[i][0][0], qk)
                outputs.setObject_forKey_(grown[i][1][0], qv)
        ok = model.session.runWithInputs_outputs_runOptions_error_(inputs, outputs, None, None)
        if not ok:
            raise RuntimeError("onnxruntime (Objective-C) run failed (see the device log)")
        for i in self.conv:
            self.conv[i].reverse()
        self.kv.update(grown)
        return logits[:, -1:].copy()


IOS_THERMAL = ("nominal", "fair", "serious", "critical")  # NSProcessInfoThermalState


def thermal_status() -> str:
    """iOS's thermal state (NSProcessInfo.processInfo.thermalState) as a word; the benchmark records it (iOS exposes
    no temperatures to apps)."""
    from pyobjus import autoclass  # pyobjus: on iOS only

    level = int(autoclass("NSProcessInfo").processInfo().thermalState())
    return IOS_THERMAL[level] if 0 <= level < len(IOS_THERMAL) else f"state {level}"
