"""The Kivy application: a header, three screens (Chat, Benchmark, Model) and a tab bar."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kivy.app import App
from kivy.clock import Clock
from kivy.core.window import Window
from kivy.metrics import Metrics, dp, sp
from kivy.uix.boxlayout import BoxLayout
from kivy.uix.label import Label
from kivy.uix.screenmanager import NoTransition, ScreenManager

from .model import LoadTimes, default_bundle
from .pressure import MemoryWatch, watch_platform
from .screen_bench import BenchScreen
from .screen_chat import ChatScreen
from .screen_model import ModelScreen
from .transcript import IDLE, ChatController
from .widgets import BACKGROUND, MUTED, TEXT, toggle

TABS = (("chat", "Chat"), ("benchmark", "Benchmark"), ("model", "Model"))


def sessions() -> dict:
    """onnxruntime sessions this process opened and still holds, per bundle (empty on a phone backend)."""
    try:
        from lfm_edge.runtime.backends.python import live_sessions, sessions_opened  # absent on phone backends
    except ImportError:
        return {}
    return {"opened": sessions_opened(), "live": live_sessions()}


def post(fn) -> None:
    """Run `fn` on the UI thread at the next frame (Clock.schedule_once is safe to call from any thread)."""
    Clock.schedule_once(lambda _dt: fn(), 0)


class LfmApp(App):
    title = "LFM Edge"

    def __init__(self, bundle: Path | None = None, threads: int | None = None, downloads: Path | None = None,
                 autopilot: list[dict] | None = None, max_new_tokens: int = 512,
                 conversation_file: Path | None = None, prepack_cache: str = "off", **kwargs: Any):
        super().__init__(**kwargs)
        self.prepack_cache = prepack_cache  # runtime/backends/prepack.py; see model.load_model for why it is off
        self.conversation_file = conversation_file  # default: conversation.safetensors in user_data_dir
        self.start_bundle, self.threads = bundle, threads
        self.downloads_dir = downloads
        self.autopilot_steps = autopilot
        self.max_new_tokens = max_new_tokens
        self.exit_code = 0
        self.model = None

    def build(self):
        Window.clearcolor = BACKGROUND
        downloads = self.downloads_dir or Path(self.user_data_dir) / "bundles"
        self.conversation_file = self.conversation_file or Path(self.user_data_dir) / "conversation.safetensors"
        self.chat = ChatController(post, max_new_tokens=self.max_new_tokens)
        self.chat.autosave = self.conversation_file  # answers in progress survive a kill (runtime autosave)
        self.chat_screen = ChatScreen(self.chat, busy=lambda: self.busy("chat"))
        # the benchmark measures the model the chat holds: a second session of the same bundle would double
        # the app's memory (10 GB for LFM2.5-8B-A1B)
        self.bench_screen = BenchScreen(post, loaded=self._loaded_model, busy=lambda: self.busy("bench"))
        self.model_screen = ModelScreen(post, self._model_loaded, busy=lambda: self.busy("model"),
                                        downloads=downloads, on_unload=self._release_model,
                                        threads=self.threads if self.threads is not None else "auto",
                                        load_times=LoadTimes(Path(self.user_data_dir) / "load_times.json"),
                                        prepack_cache=self.prepack_cache, model=lambda: self.model)
        self.model_screen.threads_cache = Path(self.user_data_dir) / "threads.json"  # runtime/threads.py
        self.screens = ScreenManager(transition=NoTransition())
        for screen in (self.chat_screen, self.bench_screen, self.model_screen):
            self.screens.add_widget(screen)
        # memory warnings (pressure.py): the first saves the chat, each trims the model and says what it released
        self.memory = MemoryWatch(lambda: self.model, self._save_for_warning,
                                  lambda text: post(lambda: setattr(self.chat_screen.status, "text", text)))

        root = BoxLayout(orientation="vertical")
        header = BoxLayout(size_hint_y=None, height=dp(52), padding=(dp(12), dp(6)), spacing=dp(8))
        title = Label(text="[b]LFM Edge[/b]", markup=True, font_size=sp(20), size_hint_x=None, width=dp(120),
                      color=TEXT, halign="left", valign="middle")
        title.bind(size=lambda lb, size: setattr(lb, "text_size", size))
        header.add_widget(title)
        self.model_label = Label(text="no model", color=MUTED, font_size=sp(13), valign="middle", halign="right",
                                 shorten=True, shorten_from="left")
        self.model_label.bind(size=lambda lb, size: setattr(lb, "text_size", size))
        header.add_widget(self.model_label)
        root.add_widget(header)
        root.add_widget(self.screens)
        tabs = BoxLayout(size_hint_y=None, height=dp(52), spacing=dp(2))
        self.tabs = {}
        for name, label in TABS:
            tab = toggle(label, "tabs", "down" if name == "chat" else "normal", height=dp(52))
            tab.bind(on_press=lambda _t, n=name: self.show(n))
            self.tabs[name] = tab
            tabs.add_widget(tab)
        root.add_widget(tabs)
        return root

    def on_start(self) -> None:
        self._platform_watch = watch_platform()  # kept: pyjnius drops a collected Java callback
        # the chat screen is up before the model is ready: it loads on a worker thread, with progress here
        Clock.schedule_interval(lambda _dt: self._show_loading(), 0.25)
        if self.start_bundle is None:
            self.start_bundle = default_bundle(downloads=self.model_screen.downloads)
        if self.start_bundle is not None:
            self.model_screen.path.text = str(self.start_bundle)
            self.model_screen.load()
        else:
            self.show("model")
        self._show_loading()
        if self.autopilot_steps is not None:
            from .autopilot import Autopilot  # the test driver, loaded only when asked for

            self.autopilot = Autopilot(self, self.autopilot_steps)  # kept: Kivy's clock only holds a weak reference
            self.autopilot.start()

    def show(self, name: str) -> None:
        self.screens.current = name
        for tab_name, tab in self.tabs.items():
            tab.state = "down" if tab_name == name else "normal"

    def busy(self, asker: str) -> str | None:
        """Why `asker` cannot start its work now: one heavy job at a time keeps the benchmark honest and the
        chat's model from being swapped under it."""
        if asker != "chat" and self.chat.state != IDLE:
            return "the chat is still answering: wait or cancel it"
        if asker != "bench" and self.bench_screen.job.running:
            return "a benchmark is running: wait or cancel it"
        if asker != "model" and self.model_screen.loader.running:
            return "a model is loading"
        return None

    def _show_loading(self) -> None:
        progress = self.model_screen.load_progress()
        self.chat.loading = progress[1] if progress else ""
        self.chat_screen.show_loading(progress)
        if progress:
            self.model_label.text = progress[1].split(":")[0]

    def _release_model(self) -> None:
        """Drop the model before another loads (the Model screen only loads when the chat is idle): the chat
        is saved first, so loading the same bundle again continues it."""
        if self.model is None:
            return
        self.model_screen.stop_serving("the model was unloaded")
        self.save_conversation()
        self.chat.set_model(None)
        self.model = None
        self.model_label.text = "no model"

    def _loaded_model(self) -> tuple[Path, Any, float, dict] | None:
        """(folder, model, load seconds, resident memory right after the load) of the app's model, or None."""
        if self.model is None or self.model_screen.loaded is None:
            return None
        return (self.model_screen.loaded, self.model, self.model_screen.load_seconds,
                self.model_screen.memory_after_load)

    def _model_loaded(self, folder: Path, model) -> None:
        self.model = model
        self.chat.set_model(model)
        self.model_label.text = folder.name
        # the conversation the app had when it was last paused or closed, if it belongs to this bundle
        self.restored = self.chat.restore(self.conversation_file)

    def save_conversation(self) -> None:
        """Keep the chat for the next start: Android may kill a paused app without another callback."""
        try:
            self.chat.save(self.conversation_file)
        except (OSError, ValueError) as e:  # a full disk must not crash the app on its way out
            print(f"lfm-app: conversation not saved: {e}")

    def _save_for_warning(self) -> bool:
        """Save the chat at a memory warning (the killer may follow); False when it could not (a turn runs)."""
        try:
            return self.chat.save(self.conversation_file)
        except (OSError, ValueError) as e:
            print(f"lfm-app: conversation not saved at a memory warning: {e}")
            return False

    def on_pause(self) -> bool:
        self.save_conversation()
        return True  # stay alive in the background

    def snapshot(self) -> dict:
        """What the app shows, as data (the GUI test reads it)."""
        from dataclasses import asdict

        return {"screen": self.screens.current, "model": self.model_screen.snapshot(),
                "chat": {"state": self.chat.state, "status": self.chat_screen.status.text,
                         "items": [{"kind": type(i).__name__, **asdict(i)} for i in self.chat.items]},
                "bench": self.bench_screen.snapshot(), "sessions": sessions(),
                "window": {"size": list(Window.size), "density": Metrics.density,
                           "tab_height": self.tabs["chat"].height}}

    def on_stop(self) -> None:
        self.memory.close()
        self.model_screen.stop_serving("the app closed")
        self.chat.cancel()
        if self.chat.wait(5):
            self.save_conversation()
        self.bench_screen.job.stop()
        self.model_screen.fetcher.stop()
