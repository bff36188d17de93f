"""The phone backends (runtime/backends): selection, the shared planning, and the Java and Objective-C
sessions driven end to end against the demo bundles.

What runs for real here: pyjnius on this machine's JDK with real java.nio direct buffers (the buffers the
Java backend hands to onnxruntime), and onnxruntime's kernels reading and writing that Java memory in place.
What is stood in: onnxruntime's Java classes (ai.onnxruntime: Maven Central, where the jar lives, is not
reachable from this machine) and the Objective-C classes (no macOS). The stand-ins follow the API read in
onnxruntime's sources (OrtSession.run with pinned outputs, Result ownership, OnnxTensor over a direct buffer;
ORTValue over NSMutableData, runWithInputs:outputs:runOptions:error:) and compute with onnxruntime's Python
binding over the very memory the backend allocated, so greedy tokens must equal LfmSession's.
"""

from __future__ import annotations

import ctypes
import importlib.util
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnxruntime as ort
import pytest
from shared_bundles import demo_bundle

from lfm_edge.runtime import backends, kernels
from lfm_edge.runtime.backends import plan
from lfm_edge.runtime.backends.java import JavaSession
from lfm_edge.runtime.backends.objc import ELEMENT_FLOAT, ELEMENT_INT8, ELEMENT_INT64, ELEMENT_UINT8, ObjcSession
from lfm_edge.runtime.backends.python import LfmSession
from lfm_edge.runtime.bundle import BundleError, StateSpec, state_spec
from lfm_edge.runtime.generate import generate

PROMPTS = [[1, 1055, 2041, 1279, 1067], [1, 2500, 300, 12, 77, 900, 5, 18]]


def bundle(root: Path, kind: str) -> Path:
    if kind == "int4":  # GroupQueryAttention, shared KV buffer
        return demo_bundle(root, "int4")
    if kind.startswith("kv-"):  # the same with an int8 / int4 KV cache (int8/uint8 state tensors)
        return demo_bundle(root, f"int4-{kind[3:]}kv")
    return demo_bundle(root, "portable")  # concatenating KV


@pytest.fixture(scope="module", params=["int4", "portable"])
def demo(request, tmp_path_factory):
    return bundle(tmp_path_factory.getbasetemp(), request.param)


def dims(state):
    return state.conv, state.kv


def reference(folder: Path, prompts, n: int = 12, chunk: int = 512):
    return generate(LfmSession(folder, threads=1), prompts, n, prefill_chunk=chunk)


# --- selection (mock: importability is monkeypatched) -----------------------------------------------------

@pytest.mark.parametrize("present,expected", [
    ({"onnxruntime", "jnius", "pyobjus"}, "python"),
    ({"jnius"}, "java"),
    ({"pyobjus"}, "objc"),
    ({"jnius", "pyobjus"}, "java"),
])
def test_mock_auto_picks_python_then_java_then_objc(monkeypatch, present, expected):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object() if name in present else None)
    assert backends.choose("auto") == expected
    assert backends.available()[0] == expected


def test_mock_no_backend_names_everything_tried(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(RuntimeError) as e:
        backends.open_session("anywhere")
    for module in ("onnxruntime", "jnius", "pyobjus"):
        assert module in str(e.value)


def test_mock_explicit_backend_missing_or_unknown(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object() if name == "onnxruntime" else None)
    with pytest.raises(RuntimeError, match="jnius.*onnxruntime-android"):
        backends.choose("java")
    with pytest.raises(ValueError, match="'auto' or one of python, java, objc"):
        backends.choose("tflite")


@pytest.mark.slow
def test_auto_here_is_the_python_binding(demo):
    session = backends.open_session(demo, threads=1)
    assert isinstance(session, LfmSession)


def test_release_thread_without_jnius_is_a_no_op(monkeypatch):
    monkeypatch.delitem(__import__("sys").modules, "jnius", raising=False)
    backends.release_thread()


# --- planning, shared by every backend ---------------------------------------------------------------------

def test_plan_matches_the_python_session(demo):
    ref = LfmSession(demo, threads=1)
    cfg = plan.read_bundle(demo)
    pairs = [(i.name, i.shape) for i in ref.session.get_inputs()]
    assert dims(state_spec(pairs, cfg.decoder)) == dims(ref.state)  # same reading as the Python backend
    assert dims(plan.state_from_config(cfg.decoder)) == dims(ref.state)  # what the Objective-C backend relies on
    names = plan.step_names(ref.state, cfg.decoder)
    assert sorted(names.inputs) == sorted(i.name for i in ref.session.get_inputs())
    assert sorted(names.outputs) == sorted(o.name for o in ref.session.get_outputs())
    assert (cfg.share_buffer, cfg.eos_token_ids, cfg.pad_token_id, cfg.context_length) == \
           (ref.share_buffer, ref.eos_token_ids, ref.pad_token_id, ref.context_length)
    shapes = plan.initial_shapes(ref.state, 2, 64, cfg.share_buffer)
    i, (h, k) = next(iter(ref.state.conv.items()))
    assert shapes[f"past.{i}.conv"] == (2, h, k)
    j, (heads, dim) = next(iter(ref.state.kv.items()))
    assert shapes[f"past_key_values.{j}.key"] == (2, heads, 64 if cfg.share_buffer else 0, dim)


def test_plan_java_style_shapes_and_symbolic_dims():
    decoder = {"num_key_value_heads": 4, "head_size": 16}
    pairs = [("past.0.conv", [-1, 32, 2]), ("past_key_values.1.key", [-1, 4, -1, -1]), ("input_ids", [-1, -1])]
    assert state_spec(pairs, decoder) == StateSpec({0: (32, 2)}, {1: (4, 16)})
    with pytest.raises(BundleError, match="head_size"):
        state_spec([("past_key_values.1.key", [-1, 4, -1, -1])], {})
    with pytest.raises(BundleError, match="static"):
        state_spec([("past.0.conv", [-1, -1, 2])], {})


def test_plan_bundle_errors(tmp_path, demo):
    with pytest.raises(BundleError, match="not a bundle folder"):
        plan.read_bundle(tmp_path / "nothing")
    torn = tmp_path / "torn"
    shutil.copytree(demo, torn)
    data = torn / "model.onnx.data"
    data.write_bytes(data.read_bytes()[:-10])
    with pytest.raises(BundleError, match="model.onnx.data.*bytes, manifest.json says"):
        plan.read_bundle(torn)
    with pytest.raises(BundleError, match="decoder lacks"):
        plan.state_from_config({"layer_types": ["conv"]})


# --- Java: real pyjnius + JVM + java.nio, stand-ins for ai.onnxruntime -----------------------------------------

def _jvm():
    try:
        from jnius import autoclass, cast
    except Exception as e:  # pyjnius missing, or no JVM it can start
        pytest.skip(f"pyjnius with a JVM is needed ({type(e).__name__}: {e}); pip install pyjnius and a JDK")
    return autoclass, cast


class FakeTensor:
    """ai.onnxruntime.OnnxTensor: over a direct buffer's memory (createTensor) or owned (an output)."""

    created: list[FakeTensor] = []

    def __init__(self, array: np.ndarray, owner: str):
        self.array, self.owner, self.closed = array, owner, False
        FakeTensor.created.append(self)

    def close(self):
        assert not self.closed, "OnnxTensor closed twice"
        self.closed = True

    def getByteBuffer(self):  # a native-order copy, as the Java API documents
        return self.J.ByteBuffer.wrap(self.array.tobytes()).order(self.J.ByteOrder.nativeOrder())


class FakeOnnxTensor:
    def __init__(self, cast):
        self.cast = cast

    def createTensor(self, env, buffer, shape, java_type=None):
        # OnnxTensor.createTensor(env, FloatBuffer|LongBuffer, long[]), or (env, ByteBuffer, long[], OnnxJavaType):
        # a direct buffer is used in place, from its position, and must hold exactly prod(shape) elements
        assert buffer.isDirect()
        kind = buffer.getClass().getName()
        dtype = np.float32 if "Float" in kind else np.int64 if "Long" in kind else None
        if java_type is not None:
            assert "Byte" in kind, kind
            dtype = {"INT8": np.int8, "UINT8": np.uint8}[java_type]
        assert dtype is not None, kind
        assert buffer.remaining() == int(np.prod(shape)), (buffer.remaining(), shape)
        assert buffer.order().toString() == self.J.ByteOrder.nativeOrder().toString()
        nbytes = buffer.remaining() * np.dtype(dtype).itemsize
        address = self.cast("sun.nio.ch.DirectBuffer", buffer).address() + buffer.position() * np.dtype(dtype).itemsize
        raw = np.ctypeslib.as_array((ctypes.c_uint8 * max(nbytes, 1)).from_address(address))[:nbytes]
        return FakeTensor(raw.view(dtype).reshape(shape), "caller")


class FakeResult:
    """OrtSession.Result: closes only the values it owns (not the pinned ones)."""

    def __init__(self, values: dict, owned: set):
        self.values, self.owned, self.closed = values, owned, False

    def get(self, name):
        assert not self.closed
        value = self.values.get(name)
        return SimpleNamespace(isPresent=lambda: value is not None, get=lambda: value)

    def close(self):
        assert not self.closed
        self.closed = True
        for name in self.owned:
            self.values[name].close()


class FakeOrtSession:
    runs: list[dict] = []

    def __init__(self, path: str, threads: int | None, pinned_api: bool, config: dict[str, str]):
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads or 1
        for key, value in config.items():
            so.add_session_config_entry(key, value)
        self.s = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        self.pinned_api, self.closed = pinned_api, False

    def _info(self, values):
        def node(v):
            shape = [d if isinstance(d, int) else -1 for d in v.shape]
            return SimpleNamespace(getInfo=lambda: SimpleNamespace(getShape=lambda: shape))
        return {v.name: node(v) for v in values}

    def getInputInfo(self):
        return self._info(self.s.get_inputs())

    def getOutputInfo(self):
        return self._info(self.s.get_outputs())

    def getInputNames(self):
        return SimpleNamespace(toArray=lambda: [v.name for v in self.s.get_inputs()])

    def getOutputNames(self):
        return SimpleNamespace(toArray=lambda: [v.name for v in self.s.get_outputs()])

    def run(self, inputs, requested, pinned=None, run_options=None):
        if pinned is not None and not self.pinned_api:
            raise TypeError("no run(Map, Set, Map, RunOptions) in this version")
        pinned = pinned or {}
        io = self.s.io_binding()
        for name, t in inputs.items():
            assert not t.closed, f"input {name} was closed"
            io.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(t.array))
        for name, t in pinned.items():
            assert not t.closed, f"pinned {name} was closed"
            io.bind_ortvalue_output(name, ort.OrtValue.ortvalue_from_numpy(t.array))
        for name in requested:
            io.bind_output(name)
        FakeOrtSession.runs.append({"inputs": dict(inputs), "pinned": dict(pinned), "requested": set(requested)})
        self.s.run_with_iobinding(io)
        got = dict(zip(list(pinned) + list(requested), io.get_outputs(), strict=True))
        values = dict(pinned)
        for name in requested:
            values[name] = FakeTensor(got[name].numpy(), "result")
        return FakeResult(values, set(requested))

    def close(self):
        self.closed = True


def java_stand_ins(pinned_api: bool = True) -> SimpleNamespace:
    autoclass, cast = _jvm()
    J = SimpleNamespace(ByteBuffer=autoclass("java.nio.ByteBuffer"), ByteOrder=autoclass("java.nio.ByteOrder"))

    class Map(dict):
        def put(self, k, v):
            self[k] = v

    class Set(set):
        add = set.add

    class Options:
        threads = None

        def __init__(self):
            self.config = {}

        def setIntraOpNumThreads(self, n):
            self.threads = n

        def addConfigEntry(self, key, value):
            self.config[key] = value

        def close(self):
            pass

    env = SimpleNamespace(createSession=lambda path, opts: FakeOrtSession(path, opts.threads, pinned_api,
                                                                                opts.config))
    tensor = FakeOnnxTensor(cast)
    tensor.J = FakeTensor.J = J
    J.OrtEnvironment = SimpleNamespace(getEnvironment=lambda: env)
    J.SessionOptions, J.OnnxTensor, J.HashMap, J.HashSet = Options, tensor, Map, Set
    J.OnnxJavaType = SimpleNamespace(INT8="INT8", UINT8="UINT8")  # the enum's constants
    J.cast = lambda name, value: value  # stand-ins need no cast; real pyjnius objects do
    return J


@pytest.mark.parametrize("pinned", [True, False], ids=["pinned-outputs", "result-fallback"])
def test_java_session_real_jvm_matches_lfm_session(demo, pinned):
    J = java_stand_ins(pinned_api=pinned)
    FakeTensor.created.clear()
    FakeOrtSession.runs.clear()
    java = JavaSession(demo, threads=1, classes=J, pinned=pinned)
    ref = LfmSession(demo, threads=1)
    assert java._options.config == kernels.SESSION_CONFIG  # the weights repacked in parallel, as LfmSession's
    assert (dims(java.state), java.vocab_size, java.share_buffer) == (dims(ref.state), ref.vocab_size,
                                                                       ref.share_buffer)
    chunk = 512 if ref.share_buffer else 3  # the portable graph also prefills in several chunks
    assert generate(java, PROMPTS[:1], 12, prefill_chunk=chunk) == reference(demo, PROMPTS[:1], chunk=chunk)
    assert generate(java, PROMPTS, 10, prefill_chunk=chunk) == reference(demo, PROMPTS, 10, chunk=chunk)
    runs = FakeOrtSession.runs
    if pinned and java.share_buffer:  # past == present: the very same OnnxTensor in both maps, every step
        j = min(java.state.kv)
        for r in runs:
            assert r["inputs"][f"past_key_values.{j}.key"] is r["pinned"][f"present.{j}.key"]
            assert not r["requested"]
    if pinned:  # conv states ping-pong between two tensors
        i = min(java.state.conv)
        assert runs[1]["inputs"][f"past.{i}.conv"] is runs[0]["pinned"][f"present.{i}.conv"]
        assert runs[2]["inputs"][f"past.{i}.conv"] is runs[0]["inputs"][f"past.{i}.conv"]
    if not (pinned and java.share_buffer):  # grown/requested KV: the Result's tensor is the next past
        j = min(java.state.kv)
        prev_out = runs[-2]["requested"]
        assert f"present.{j}.key" in prev_out


def test_java_cache_lifetimes(demo):
    J = java_stand_ins()
    FakeTensor.created.clear()
    java = JavaSession(demo, threads=1, classes=J, pinned=True)
    cache = java.new_cache(1, 16)
    out = cache.step(np.array([PROMPTS[0]], dtype=np.int64))
    assert out.shape == (1, 1, java.vocab_size) and out.dtype == np.float32
    cache.step(np.array([[5]], dtype=np.int64))
    open_now = {id(t) for t in FakeTensor.created if not t.closed}
    # per-step tensors (ids, mask, the pinned logits view) are closed after their run; what stays open is
    # the state: the cache's own tensors and, on a concatenating graph, the last Result's grown KV
    held = cache._res.held
    state = {id(t) for t in cache._res.tensors} | {id(held.values[n]) for n in held.owned}
    assert open_now == state
    assert {id(t) for v in [*cache.conv.values(), *cache.kv.values()] for t in v} <= open_now
    with pytest.raises(ValueError, match="exceed"):
        cache.step(np.zeros((1, 20), dtype=np.int64))
    cache.close()
    assert all(t.closed for t in FakeTensor.created)
    cache.close()  # idempotent


def test_java_buffers_through_pyjnius_roundtrip():
    """The exact java.nio calls the backend makes (put(byte[]), asLongBuffer/asFloatBuffer views, duplicate/
    limit/position, put(ByteBuffer) into a heap buffer, array() -> bytes), on the real JVM."""
    from lfm_edge.runtime.backends.java import _Direct

    J = java_stand_ins()
    ids = np.arange(6, dtype=np.int64) * 1_000_000_007
    buf = _Direct(J, 64)
    buf.write(ids.tobytes())
    view = buf.longs(6)
    assert view.isDirect() and view.remaining() == 6 and [view.get(i) for i in range(6)] == ids.tolist()
    floats = np.linspace(-3, 3, 10, dtype=np.float32)
    f = _Direct(J, 40)
    f.write(floats.tobytes())
    heap = J.ByteBuffer.allocate(16)
    part = f.bytes.duplicate()
    part.limit(32)
    part.position(16)
    heap.put(part)
    assert np.array_equal(np.frombuffer(heap.array().tostring(), dtype=np.float32), floats[4:8])


# --- Objective-C: stand-ins for pyobjus classes over numpy memory ----------------------------------------------

class NSData:
    def __init__(self, address, length):
        self.address, self.length = address, length

    @classmethod
    def dataWithBytesNoCopy_length_freeWhenDone_(cls, address, length, free):
        assert free is False
        return cls(address, length)


class NSArray(list):
    @classmethod
    def alloc(cls):
        return cls()

    def init(self):
        return self

    def addObject_(self, x):
        self.append(x)

    def count(self):
        return len(self)

    def objectAtIndex_(self, i):
        return self[i]


class NSDict(dict):
    @classmethod
    def alloc(cls):
        return cls()

    def init(self):
        return self

    def setObject_forKey_(self, value, key):
        self[key] = value


class ORTValue:
    made = 0

    @classmethod
    def alloc(cls):
        return cls()

    def initWithTensorData_elementType_shape_error_(self, data, kind, shape, error):
        dtype = {ELEMENT_FLOAT: np.float32, ELEMENT_INT8: np.int8, ELEMENT_UINT8: np.uint8,
                 ELEMENT_INT64: np.int64}[kind]
        raw = np.ctypeslib.as_array((ctypes.c_uint8 * max(data.length, 1)).from_address(data.address))[:data.length]
        self.array = raw.view(dtype).reshape([int(d) for d in shape])
        ORTValue.made += 1
        return self


class ORTSession:
    def __init__(self):
        self.s = None

    @classmethod
    def alloc(cls):
        return cls()

    def initWithEnv_modelPath_sessionOptions_error_(self, env, path, options, error):
        so = ort.SessionOptions()
        so.intra_op_num_threads = options.threads or 1
        for key, value in options.config.items():
            so.add_session_config_entry(key, value)
        self.s, self.config = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"]), options.config
        return self

    def inputNamesWithError_(self, error):
        return NSArray(i.name for i in self.s.get_inputs())

    def outputNamesWithError_(self, error):
        return NSArray(o.name for o in self.s.get_outputs())

    def overridableInitializerNamesWithError_(self, error):
        return NSArray(o.name for o in self.s.get_overridable_initializers())

    def runWithInputs_outputs_runOptions_error_(self, inputs, outputs, run_options, error):
        io = self.s.io_binding()
        for name, v in inputs.items():
            io.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(v.array))
        for name, v in outputs.items():
            io.bind_ortvalue_output(name, ort.OrtValue.ortvalue_from_numpy(v.array))
        self.s.run_with_iobinding(io)
        return True


def objc_stand_ins() -> SimpleNamespace:
    class Options:
        threads = None

        @classmethod
        def alloc(cls):
            return cls()

        def initWithError_(self, error):
            return self

        def setIntraOpNumThreads_error_(self, n, error):
            self.threads = n
            return True

        def addConfigEntryWithKey_value_error_(self, key, value, error):
            self.config = {**getattr(self, "config", {}), key: value}
            return True

    env = SimpleNamespace(initWithLoggingLevel_error_=lambda level, error: "env")
    return SimpleNamespace(
        ORTEnv=SimpleNamespace(alloc=lambda: env), ORTSession=ORTSession, ORTSessionOptions=Options,
        ORTValue=ORTValue, NSMutableData=NSData, NSMutableDictionary=NSDict, NSMutableArray=NSArray,
        NSNumber=SimpleNamespace(numberWithLongLong_=int))


def test_mock_objc_session_matches_lfm_session(demo):
    objc = ObjcSession(demo, threads=1, classes=objc_stand_ins())
    ref = LfmSession(demo, threads=1)
    assert (dims(objc.state), objc.vocab_size) == (dims(ref.state), ref.vocab_size)
    assert objc.session.config == kernels.SESSION_CONFIG
    chunk = 512 if ref.share_buffer else 3
    assert generate(objc, PROMPTS[:1], 12, prefill_chunk=chunk) == reference(demo, PROMPTS[:1], chunk=chunk)
    assert generate(objc, PROMPTS, 10, prefill_chunk=chunk) == reference(demo, PROMPTS, 10, chunk=chunk)


def test_mock_objc_asks_the_graph_for_the_last_row_only(demo):
    """Where the graph has logits_to_keep (our contrib exports), a 30-token prefill computes and returns one
    row; the row equals LfmSession's last row."""
    objc = ObjcSession(demo, threads=1, classes=objc_stand_ins())
    ref = LfmSession(demo, threads=1)
    assert objc.logits_to_keep == ref.logits_to_keep
    ids = np.arange(5, 35, dtype=np.int64)[None]
    cache = objc.new_cache(1, 40)
    got = cache.step(ids)
    np.testing.assert_allclose(got, ref.new_cache(1, 40).step(ids)[:, -1:], atol=1e-4)
    assert cache._logits.size == (1 if objc.logits_to_keep else 30) * objc.vocab_size


@pytest.mark.parametrize("kv", ["int8", "int4"])
@pytest.mark.slow
def test_mock_objc_runs_a_quantized_kv_cache(tmp_path_factory, kv):
    folder = bundle(tmp_path_factory.getbasetemp(), f"kv-{kv}")
    objc = ObjcSession(folder, threads=1, classes=objc_stand_ins())
    assert objc.kv_dtype == (np.int8 if kv == "int8" else np.uint8)
    assert objc.new_cache(1, 8).kv[min(objc.state.kv)][0][1].dtype == objc.kv_dtype
    assert generate(objc, PROMPTS, 10) == reference(folder, PROMPTS, 10)


@pytest.mark.parametrize("kv", ["int8", "int4"])
@pytest.mark.slow  # exports the KV-cache variants of the demo bundle
def test_java_session_real_jvm_runs_a_quantized_kv_cache(tmp_path_factory, kv):
    J = java_stand_ins()
    folder = bundle(tmp_path_factory.getbasetemp(), f"kv-{kv}")
    java = JavaSession(folder, threads=1, classes=J, pinned=True)
    assert dims(java.state) == dims(LfmSession(folder, threads=1).state)  # int4: head_size / 2 bytes
    assert generate(java, PROMPTS, 10) == reference(folder, PROMPTS, 10)


def test_phone_backends_refuse_a_kv_cache_they_cannot_hold(tmp_path, demo):
    import json

    odd = tmp_path / "odd"
    shutil.copytree(demo, odd)
    manifest = json.loads((odd / "manifest.json").read_text())
    manifest["kv_cache"] = {"dtype": "float8e4m3fn", "bits": 7}
    (odd / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=r"manifest.json: kv_cache.bits is 7.*Objective-C backend supports"):
        ObjcSession(odd, classes=objc_stand_ins(), verify="none")
    with pytest.raises(BundleError, match=r"manifest.json: kv_cache.bits is 7.*Java backend supports"):
        JavaSession(odd, classes=SimpleNamespace(), verify="none")  # refused before any Java class is touched


def test_mock_objc_refuses_a_graph_that_disagrees_with_genai_config(tmp_path, demo):
    import json

    bad = tmp_path / "bad"
    shutil.copytree(demo, bad)
    cfg = json.loads((bad / "genai_config.json").read_text())
    cfg["model"]["decoder"]["layer_types"] = ["conv"] * len(cfg["model"]["decoder"]["layer_types"])
    (bad / "genai_config.json").write_text(json.dumps(cfg))
    with pytest.raises(BundleError, match="does not match genai_config.json"):
        ObjcSession(bad, classes=objc_stand_ins(), verify="none")


def test_backends_import_without_onnxruntime():
    """A phone build has no onnxruntime Python binding: the backends and the plan must not import it."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['onnxruntime'] = None\n"
            "import lfm_edge.runtime.backends.plan, lfm_edge.runtime.backends.java, "
            "lfm_edge.runtime.backends.objc\n"
            "from lfm_edge.runtime import backends\n"
            "assert 'python' not in backends.available()\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


# --- conversation state on every backend ------------------------------------------------------------------------

def _conversation_tokens(model, save_to: Path | None = None, load_from: Path | None = None) -> list[list[int]]:
    """A conversation with an edit (rolls back through a snapshot), saved or loaded midway."""
    conv = model.load_conversation(load_from) if load_from else model.conversation(system="Be brief.",
                                                                                   snapshot_every=8)
    said = []
    if load_from is None:
        said += [conv.say(q, max_new_tokens=6).tokens for q in ("What is a list?", "And a tuple?")]
        conv.messages[2]["content"] = conv.messages[2]["content"][:6]
        if save_to:
            conv.save(save_to)
    said += [conv.say(q, max_new_tokens=6).tokens for q in ("And a set?", "Thanks.")]
    assert conv.stats[-1].reused_tokens > 0
    return said


@pytest.mark.parametrize("backend", ["java-pinned", "java-result-fallback", "objc"])
@pytest.mark.slow
def test_mock_conversations_on_phone_backends_match_lfm_session(demo, backend, tmp_path):
    from lfm_edge.runtime import LfmModel

    if backend.startswith("java"):
        pinned = backend == "java-pinned"
        session = JavaSession(demo, threads=1, classes=java_stand_ins(pinned_api=pinned), pinned=pinned)
    else:
        session = ObjcSession(demo, threads=1, classes=objc_stand_ins())
    phone, python = LfmModel(demo, session=session), LfmModel(demo, threads=1)
    assert _conversation_tokens(phone, save_to=tmp_path / "phone.st") == _conversation_tokens(python)
    # a conversation saved on the phone's backend continues on the Python one, and the other way round
    assert _conversation_tokens(python, load_from=tmp_path / "phone.st") == \
           _conversation_tokens(phone, load_from=tmp_path / "phone.st")


def test_mock_objc_builds_the_attention_kernel_asked_for(tmp_path_factory, monkeypatch):
    """The stand-in ORTSession records the environment onnxruntime would read while it builds its kernels."""
    import os

    from lfm_edge.runtime import kernels

    seen = []
    build = ORTSession.initWithEnv_modelPath_sessionOptions_error_

    def recording(self, env, path, options, error):
        seen.append(os.environ.get(kernels.FLASH_OFF))
        return build(self, env, path, options, error)

    monkeypatch.setattr(ORTSession, "initWithEnv_modelPath_sessionOptions_error_", recording)
    folder = bundle(tmp_path_factory.getbasetemp(), "int4")  # GroupQueryAttention: its kernels
    flash = ObjcSession(folder, threads=1, classes=objc_stand_ins())
    unfused = ObjcSession(folder, threads=1, classes=objc_stand_ins(), attention_kernel="unfused")
    assert seen == [None, "1"] and kernels.FLASH_OFF not in os.environ
    assert (flash.attention_kernel, unfused.attention_kernel, unfused.num_heads) == ("flash", "unfused", 4)
    assert generate(unfused, PROMPTS, 8) == generate(flash, PROMPTS, 8)
