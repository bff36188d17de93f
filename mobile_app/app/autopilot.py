"""Drive the running app from a list of steps, as a user would (press buttons, type, wait), and take
screenshots: what the GUI test runs, and a way to make store screenshots.

Steps (JSON objects, run in order, each after the previous one's work has finished):
    {"load": "path/to/bundle"}          type the folder on the Model screen and press Load
    {"screen": "chat"|"benchmark"|"model"}
    {"chat": "What is 2+3?"}            type into the chat and press Send; waits for the whole turn
    {"send": "Talk"}                    the same without waiting
    {"cancel_after": 5}                 once the running turn has 5 tokens, press Cancel; waits until it stops
    {"reasoning": 1}                    tap the reasoning toggle of transcript item 1
    {"bench": "quick"}                  pick the preset, press Run; waits for the report
    {"download": "http://..."}          type the URL on the Model screen and press Download; waits
    {"serve": true}                     switch the Model screen's Serve on (false: off)
    {"wait_file": "path"}               wait until the file exists (a test outside the app says it is done)
    {"shot": "build/screenshots/chat.png"}
    {"state": "build/screenshots/state.json"}   the app's snapshot() as JSON
    {"quit": true}
A step that does not finish within `timeout` seconds, or fails, ends the app with exit code 1 after
writing the state file named by the last "state" step (if any) with the error, and says on stderr which step
(its number, from 1, and the step itself) and why.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from kivy.clock import Clock
from kivy.core.window import Window

from .transcript import IDLE

SETTLE = 0.4  # seconds for layout and a few frames to be drawn before a screenshot


class Autopilot:
    def __init__(self, app, steps: list[dict], timeout: float = 120.0):
        self.app, self.steps, self.timeout = app, list(steps), timeout
        self.errors: list[str] = []
        self.state_path = next((Path(s["state"]) for s in reversed(steps) if "state" in s), None)
        self._until: Callable[[], bool] | None = None
        self._deadline = 0.0
        self._step: dict | None = None
        self._number = 0  # of the current step, from 1

    def start(self) -> None:
        self.at_start = self.app.snapshot()  # what shows before the start bundle is ready (the state file has it)
        self._wait(lambda: not self._app_busy(), self.timeout)  # the start bundle's load, if any
        Clock.schedule_interval(self._tick, 0.05)

    def _app_busy(self) -> bool:
        app = self.app
        return (app.chat.state != IDLE or app.bench_screen.job.running or app.model_screen.loader.running
                or app.model_screen.fetcher.running)

    def _wait(self, until: Callable[[], bool], seconds: float) -> None:
        self._until, self._deadline = until, time.monotonic() + seconds

    def _tick(self, _dt) -> bool | None:
        try:
            if self._until is not None:
                if not self._until():
                    if time.monotonic() > self._deadline:
                        raise TimeoutError(f"did not finish in {self.timeout:.0f} s")
                    return None
                self._until = None
            if not self.steps:
                return False
            self._step, self._number = self.steps.pop(0), self._number + 1
            self._run(self._step)
        except Exception as e:  # report and leave: a stuck GUI test must fail, not hang
            where = (f"step {self._number} {json.dumps(self._step, default=str)}" if self._step is not None
                     else "waiting for the start bundle's load")
            self.errors.append(f"{where}: {type(e).__name__}: {e}")
            # the real stderr: Kivy's stand-in for sys.stderr turns each line into a log record of its own
            print(f"lfm-app: autopilot {self.errors[-1]}", file=sys.__stderr__ or sys.stderr, flush=True)
            self._write_state()
            self.app.exit_code = 1
            self.app.stop()
            return False
        return None

    def _run(self, step: dict) -> None:
        app = self.app
        (kind, value), = step.items()
        if kind == "load":
            app.show("model")
            app.model_screen.path.text = str(value)
            app.model_screen.load_button.trigger_action(0)
            self._wait(lambda: not app.model_screen.loader.running, self.timeout)
            self._then(lambda: app.model_screen.loaded == Path(value).expanduser(),
                       lambda: f"load {value}: {app.model_screen.load_status.text}")
        elif kind == "screen":
            app.show(value)
            self._pause(SETTLE)
        elif kind in ("chat", "send"):
            app.show("chat")
            app.chat_screen.input.text = value
            app.chat_screen.send_button.trigger_action(0)
            if kind == "chat":
                self._wait(lambda: app.chat.state == IDLE, self.timeout)
        elif kind == "cancel_after":
            if app.chat.state == IDLE:
                raise RuntimeError("cancel_after: no chat turn is running")

            def press() -> bool:  # runs on the UI thread while the model generates: the UI is responsive
                if app.chat.state != IDLE and app.chat.tokens < int(value):
                    return False
                app.chat_screen.cancel_button.trigger_action(0)
                self._wait(lambda: app.chat.state == IDLE, self.timeout)
                return False  # the new wait replaces this one

            self._wait(press, self.timeout)
        elif kind == "reasoning":
            app.chat.toggle_reasoning(int(value))
            self._pause(SETTLE)
        elif kind == "bench":
            app.show("benchmark")
            app.bench_screen.presets[value].trigger_action(0)
            app.bench_screen.run_button.trigger_action(0)
            self._wait(lambda: not app.bench_screen.job.running, self.timeout)
            self._then(lambda: app.bench_screen.report is not None, lambda: f"bench: {app.bench_screen.status.text}")
        elif kind == "download":
            app.show("model")
            app.model_screen.url.text = value
            app.model_screen.download_button.trigger_action(0)
            self._wait(lambda: not (app.model_screen.fetcher.running or app.model_screen.loader.running),
                       self.timeout)
        elif kind == "serve":
            app.show("model")
            if bool(value) != app.model_screen.server.running:
                app.model_screen.serve_button.trigger_action(0)
            self._then(lambda: app.model_screen.server.running == bool(value),
                       lambda: f"serve {value}: {app.model_screen.serve_status.text}")
        elif kind == "wait_file":
            self._wait(lambda: Path(value).exists(), self.timeout)
        elif kind == "shot":
            self._pause(SETTLE, then=lambda: self._shot(Path(value)))
        elif kind == "state":
            self._write_state(Path(value))
        elif kind == "quit":
            self._write_state()
            app.stop()
        else:
            raise ValueError(f"unknown autopilot step {step}")

    def _then(self, ok: Callable[[], bool], why: Callable[[], str]) -> None:
        """After the current wait, check that the step achieved what it should have."""
        until = self._until

        def check() -> bool:
            if until is not None and not until():
                return False
            if not ok():
                raise RuntimeError(why())
            return True

        self._until = check

    def _pause(self, seconds: float, then: Callable[[], None] | None = None) -> None:
        end = time.monotonic() + seconds

        def done() -> bool:
            if time.monotonic() < end:
                return False
            if then:
                then()
            return True

        self._wait(done, seconds + self.timeout)

    def _shot(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Window.screenshot numbers its files (name0001.png); take it, then give it the asked-for name
        taken = Window.screenshot(name=str(path.with_name(path.stem + "-tmp.png")))
        os.replace(taken, path)

    def _write_state(self, path: Path | None = None) -> None:
        path = path or self.state_path
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({**self.app.snapshot(), "at_start": getattr(self, "at_start", None),
                                    "autopilot_errors": self.errors}, indent=2, default=str))
