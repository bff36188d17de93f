"""The Model screen's Serve switch: lfm-serve's app (runtime/serve) over the model the chat holds, on loopback, so
other apps on the device reach it with any OpenAI client. A fresh API key each time it starts; it stops when the
model is swapped or the app closes. One model in memory: the server shares the chat's session (each request
keeps its own state; a request and a chat turn at once share the cores).

On Android a server that must outlive the app's screen needs a foreground service (mobile_app/README.md);
here it runs while the app runs.
"""

from __future__ import annotations

import secrets
import socket
import threading
import time
from typing import Any

__all__ = ["LocalServer", "available"]

HOST = "127.0.0.1"


def available() -> str | None:
    """None when the server can run here, else why not (the [serve] extra is not installed)."""
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        return f"serving needs starlette and uvicorn ({e.name} is missing)"
    return None


def _port(preferred: int) -> int:
    """`preferred` if it is free on loopback, else any free port."""
    with socket.socket() as s:
        try:
            s.bind((HOST, preferred))
        except OSError:
            s.bind((HOST, 0))
        return s.getsockname()[1]


class LocalServer:
    """One server at a time, on a thread of its own."""

    def __init__(self, port: int = 8000):
        self.preferred_port = port
        self.port = 0
        self.key = ""
        self.model_id = ""
        self._server: Any = None
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def address(self) -> str:
        return f"http://{HOST}:{self.port}/v1" if self.running else ""

    def start(self, model: Any, model_id: str, timeout: float = 10.0) -> str:
        """Serve `model` as `model_id`; returns the base URL once it accepts connections."""
        import uvicorn

        from lfm_edge.runtime.serve import ServeOptions, create_app  # the [serve] extra, needed only here

        self.stop()
        self.port, self.key, self.model_id = _port(self.preferred_port), secrets.token_urlsafe(18), model_id
        app = create_app(model, ServeOptions(model_id=model_id, api_key=self.key, queue=4))
        config = uvicorn.Config(app, host=HOST, port=self.port, log_level="warning", http="h11", loop="asyncio",
                                timeout_keep_alive=5, timeout_graceful_shutdown=3)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="lfm-serve", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise OSError(f"the server did not start on {HOST}:{self.port}")
            time.sleep(0.02)
        return self.address

    def stop(self, timeout: float = 10.0) -> None:
        """Stop accepting, end the requests in flight, and wait for the thread."""
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
        self._server, self._thread = None, None

    def snapshot(self) -> dict:
        return {"running": self.running, "address": self.address, "key": self.key if self.running else "",
                "model_id": self.model_id if self.running else ""}
