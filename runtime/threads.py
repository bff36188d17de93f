"""Threads the runtime starts leave Ctrl-C to the main thread.

Python runs signal handlers on the main thread only, but the kernel hands a process-wide signal to any thread that
does not block it. When onnxruntime's pool threads, the template watchdog or the memory sampler took a SIGINT,
the handler's flag was set while the main thread stayed blocked in a read: Ctrl-C at lfm-chat's prompt did nothing
in about one try of four until the next line was typed. Threads started inside `signals_to_main_thread()` inherit
a mask that blocks SIGINT and SIGTERM (a new thread copies its creator's mask), so these signals go to the main
thread; one that arrives meanwhile waits, pending, until the block ends.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["signals_to_main_thread"]

_SIGNALS = {signal.SIGINT, signal.SIGTERM}


@contextmanager
def signals_to_main_thread() -> Iterator[None]:
    """Block SIGINT and SIGTERM in the calling thread while the body starts threads (a no-op where the platform
    has no pthread_sigmask, i.e. Windows)."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
