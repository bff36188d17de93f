"""Which onnxruntime API a bundle is run through.

On a desktop, and on a phone build that carries onnxruntime's Python binding, it is `LfmSession`.
A python-for-android build without that binding reaches the onnxruntime-android AAR through pyjnius
(`java.py`); a kivy-ios build reaches onnxruntime-objc through pyobjus (`objc.py`). Every backend returns an
object with LfmSession's surface (see `lfm_edge.runtime.session.LfmSession.new_cache`), so the generation
loop, the chat engine and the benchmark run unchanged on all of them.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

BACKENDS = ("python",)  # in order of preference


def available() -> list[str]:
    """The backends this interpreter can use."""
    return [name for name in BACKENDS if _importable(name)]


def _importable(name: str) -> bool:
    module = {"python": "onnxruntime"}[name]
    return importlib.util.find_spec(module) is not None


def open_session(bundle: str | Path, threads: int | None = None, backend: str = "auto") -> Any:
    """Load `bundle` through `backend` ("auto": the first of `available()`)."""
    names = available()
    if backend == "auto":
        if not names:
            raise RuntimeError(f"no onnxruntime backend in this interpreter: tried {', '.join(BACKENDS)}")
        backend = names[0]
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r}: expected 'auto' or one of {', '.join(BACKENDS)}")
    if backend not in names:
        raise RuntimeError(f"backend {backend!r} is not usable in this interpreter")
    from lfm_edge.runtime.session import LfmSession

    return LfmSession(bundle, threads=threads)
