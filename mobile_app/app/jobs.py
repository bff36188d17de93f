"""A blocking call (load a model, benchmark, download) on a worker thread, its outcome posted to the UI.

The UI thread must never wait on onnxruntime or the network; it starts a Job and gets `on_done(result)` or
`on_error(exception)` back through `post` (Kivy's clock in the app, a queue in tests).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

Post = Callable[[Callable[[], None]], None]


class Job:
    def __init__(self, post: Post, name: str):
        self.post = post
        self.name = name
        self.running = False  # read and written on the UI thread only
        self.cancel = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, work: Callable[[threading.Event], Any], on_done: Callable[[Any], None],
              on_error: Callable[[Exception], None]) -> bool:
        """Run `work(cancel_event)` on a thread; False (nothing started) when this job is still running."""
        if self.running:
            return False
        self.running = True
        self.cancel = threading.Event()

        def finish(callback: Callable[[Any], None], value: Any) -> None:
            self.running = False
            callback(value)

        def body(cancel: threading.Event) -> None:
            try:
                result = work(cancel)
            except Exception as e:  # shown to the user by on_error; the app keeps running
                self.post(lambda error=e: finish(on_error, error))  # `e` is unbound after the except block
                return
            self.post(lambda: finish(on_done, result))

        self._thread = threading.Thread(target=body, args=(self.cancel,), name=self.name, daemon=True)
        self._thread.start()
        return True

    def stop(self) -> None:
        """Ask the work to stop at its next check; on_error receives its cancellation exception."""
        self.cancel.set()

    def wait(self, timeout: float | None = None) -> bool:
        if self._thread is not None:
            self._thread.join(timeout)
            return not self._thread.is_alive()
        return True
