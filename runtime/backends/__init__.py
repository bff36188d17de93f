"""Which onnxruntime API a bundle is run through: the implementations of runtime/backend.py's Session.

On a desktop, and on a phone build that carries onnxruntime's Python binding, it is `LfmSession`
(`python.py`). A python-for-android build without that binding reaches the onnxruntime-android AAR through
pyjnius (`java.py`); a kivy-ios build reaches onnxruntime-objc through pyobjus (`objc.py`). Each implements
the Session / Cache contract on CacheBase, so the generation loop, conversations, the server and the benchmark
run unchanged on all of them. `plan.py` holds what the phone backends read about a bundle without
onnxruntime's Python binding (state dims, tensor names), in pure Python.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from .. import threads as tuning
from ..backend import Session
from .plan import read_bundle

BACKENDS = ("python", "java", "objc")  # in order of preference
MODULES = {"python": "onnxruntime", "java": "jnius", "objc": "pyobjus"}  # what each backend imports
WHERE = {"python": "onnxruntime's Python binding (pip install onnxruntime)",
         "java": "pyjnius over the onnxruntime-android AAR (python-for-android, see mobile_app/buildozer.spec)",
         "objc": "pyobjus over the onnxruntime-objc pod (kivy-ios, see mobile_app/ios/README.md)"}


def available() -> list[str]:
    """The backends this interpreter can use."""
    return [name for name in BACKENDS if _importable(name)]


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(MODULES[name]) is not None
    except (ImportError, ValueError):
        return False


def choose(backend: str = "auto") -> str:
    """The backend `open_session` would use; "auto": the first of BACKENDS whose module imports."""
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"backend {backend!r}: expected 'auto' or one of {', '.join(BACKENDS)}")
    names = available()
    if backend == "auto":
        if not names:
            tried = "; ".join(f"{b}: no module {MODULES[b]!r} ({WHERE[b]})" for b in BACKENDS)
            raise RuntimeError(f"no onnxruntime backend in this interpreter. Tried {tried}")
        return names[0]
    if backend not in names:
        raise RuntimeError(f"backend {backend!r} needs the module {MODULES[backend]!r}, which this interpreter "
                           f"cannot import: {WHERE[backend]}")
    return backend


def open_session(bundle: str | Path, threads: int | str | None = None, backend: str = "auto",
                 prepack_cache: str = "off", attention_kernel: str = "flash",
                 threads_cache: str | Path | None = None) -> Session:
    """Load `bundle` through `backend` ("auto": python if onnxruntime imports, else java if jnius does
    (Android), else objc if pyobjus does (iOS)). `prepack_cache` (runtime/backends/prepack.py) applies to the python
    backend; the Java and Objective-C backends do not write or map one yet. `attention_kernel`:
    runtime/kernels.py, on every backend. `threads="auto"` (runtime/threads.py): measured once per device and
    bundle through the same backend, remembered in `threads_cache` (an app passes a file in its data folder);
    the session's `thread_choice` says what was chosen and why."""
    backend = choose(backend)
    if backend == "python":
        from .python import LfmSession  # onnxruntime's Python binding, which a phone build may lack

        return LfmSession(bundle, threads=threads, prepack_cache=prepack_cache, attention_kernel=attention_kernel,
                          threads_cache=threads_cache)
    if backend == "java":
        from .java import JavaSession as Phone  # pyjnius: on Android only
    else:
        from .objc import ObjcSession as Phone  # pyobjus: on iOS only

    def load(count: int | None, cores: tuple[int, ...] = ()) -> Session:
        return Phone(bundle, threads=count, attention_kernel=attention_kernel, cores=cores)

    if threads != "auto":
        return load(threads)  # type: ignore[arg-type]
    choice, kept = tuning.choose(bundle, lambda c: load(c.threads, c.cores), read_bundle(bundle, "none").threads,
                                 threads_cache or tuning.default_cache_path())
    session = kept or load(choice.threads, choice.cores)
    session.thread_choice = choice
    return session


def thermal_status() -> str | None:
    """The platform's thermal status where a phone backend can ask it (Android 10+: "none" ... "shutdown"; iOS:
    "nominal" ... "critical"); None where it cannot (a desktop, a Python with onnxruntime's own binding, an older
    Android): missing, which a benchmark reports as missing."""
    try:
        backend = choose()
    except RuntimeError:
        return None
    if backend == "java":
        from .java import thermal_status as status  # pyjnius: on Android only
    elif backend == "objc":
        from .objc import thermal_status as status  # pyobjus: on iOS only
    else:
        return None
    try:
        return status()
    except Exception:  # noqa: BLE001 (an OS without the call, or a JVM/ObjC error: the reading is missing)
        return None


def release_thread() -> None:
    """Call at the end of a worker thread that ran a generation: pyjnius attaches each Python thread to the
    JVM on first use and the thread must detach before it exits (on Android an attached thread that exits
    aborts the process). A no-op where pyjnius was never imported."""
    if "jnius" in sys.modules:
        sys.modules["jnius"].detach()
