"""Model screen: pick a bundle folder (typed or browsed) and load it, or download one from a URL; serve the loaded
model to other apps on the device (serving.py)."""

from __future__ import annotations

import time
from pathlib import Path

from kivy.metrics import dp, sp
from kivy.uix.boxlayout import BoxLayout
from kivy.uix.filechooser import FileChooserListView
from kivy.uix.progressbar import ProgressBar
from kivy.uix.screenmanager import Screen
from kivy.uix.textinput import TextInput

from lfm_edge.runtime.memory import PeakMemory, resident_mb

from . import download
from .jobs import Job, Post
from .model import LoadTimes, bundle_info, check_folder, load_model
from .serving import LocalServer, available
from .widgets import ACCENT, ERROR, GOOD, MUTED, SURFACE, TEXT, WARN, Panel, Text, button, heading, row, toggle


def field(hint: str, text: str = "") -> TextInput:
    return TextInput(text=text, hint_text=hint, multiline=False, font_size=sp(14), size_hint_y=None, height=dp(40),
                     background_color=SURFACE, foreground_color=TEXT, cursor_color=ACCENT, hint_text_color=MUTED,
                     padding=(dp(8), dp(10)))


class ModelScreen(Screen):
    def __init__(self, post: Post, on_loaded, busy, downloads: Path, threads: int | None,
                 on_unload=lambda: None, load_times: LoadTimes | None = None, prepack_cache: str = "off",
                 model=lambda: None, server: LocalServer | None = None, **kwargs):
        """`on_loaded(folder, model)` hands a loaded model to the app; `on_unload()` makes the app drop the
        model it holds before another loads (two would be in memory at once); `busy()`: why not now, or None;
        `model()`: the app's model, which the Serve switch serves through `server`."""
        super().__init__(name="model", **kwargs)
        self.post, self.on_loaded, self.on_unload, self.busy = post, on_loaded, on_unload, busy
        self.downloads, self.threads, self.prepack_cache = downloads, threads, prepack_cache
        self.threads_cache: Path | None = None  # where threads="auto" keeps its choices (the app's data folder)
        self.model, self.server = model, server or LocalServer()
        self.load_times = load_times or LoadTimes(None)
        self.loader, self.fetcher = Job(post, "load-model"), Job(post, "download")
        self.loaded: Path | None = None
        # the load in progress (what the chat screen shows) and the last one's cost (what the benchmark shows)
        self.loading: Path | None = None
        self.stage, self.started, self.expected = "", 0.0, None
        self.load_seconds = 0.0
        # resident_mb() right after the load ("rss", "anonymous", "file") and the load's own peaks ("peak_rss",
        # "peak_anonymous", "peak_file": the bundle mapped while its weights are repacked), MB
        self.memory_after_load: dict[str, float] = {}
        outer = BoxLayout(orientation="vertical", padding=dp(10), spacing=dp(8))

        local = Panel()
        local.add_widget(heading("Bundle on this device"))
        self.current = Text(text="No model loaded.", color=MUTED, font_size=sp(13))
        local.add_widget(self.current)
        self.path = field("folder with genai_config.json, model.onnx, tokenizer.json")
        local.add_widget(self.path)
        self.load_button = button("Load", self.load)
        self.load_status = Text(color=MUTED, font_size=sp(13))
        local.add_widget(row(self.load_button, self.load_status))
        outer.add_widget(local)

        serve = Panel()
        serve.add_widget(heading("Serve to other apps (OpenAI API, this device only)"))
        self.serve_button = toggle("Serve", None, "normal", size_hint_x=None, width=dp(96))
        self.serve_button.bind(on_press=lambda _b: self.toggle_serve())
        self.serve_status = Text(color=MUTED, font_size=sp(13), text=available() or "Load a model, then switch on.")
        serve.add_widget(row(self.serve_button, self.serve_status, height=dp(52)))
        outer.add_widget(serve)

        remote = Panel()
        remote.add_widget(heading("Download a bundle"))
        self.url = field("https://host/path/bundle/  (the folder holding manifest.json)")
        remote.add_widget(self.url)
        self.download_button = button("Download", self.fetch)
        self.cancel_button = button("Cancel", self.fetcher.stop, color=ERROR, disabled=True)
        remote.add_widget(row(self.download_button, self.cancel_button))
        self.bar = ProgressBar(max=1, value=0, size_hint_y=None, height=dp(16))
        remote.add_widget(self.bar)
        self.download_status = Text(color=MUTED, font_size=sp(13),
                                    text=f"Resumable, sha256-checked; saved under {downloads}.")
        remote.add_widget(self.download_status)
        outer.add_widget(remote)

        browser = Panel(size_hint_y=1)
        browser.unbind(minimum_height=browser.setter("height"))  # fills the rest of the screen
        browser.add_widget(heading("Browse folders (tap a bundle folder)"))
        self.chooser = FileChooserListView(dirselect=True, path=str(Path.cwd()))
        self.chooser.bind(selection=self._picked)
        browser.add_widget(self.chooser)
        outer.add_widget(browser)
        self.add_widget(outer)

    # --- picking and loading --------------------------------------------------------------------------------------

    def _picked(self, _chooser, selection) -> None:
        if selection:
            self._use(selection[0])

    def _use(self, folder: str) -> None:
        self.path.text = folder
        problem = check_folder(folder)
        self.load_status.text = problem or "a bundle: press Load"
        self.load_status.color = WARN if problem else MUTED

    def load(self, folder: str | Path | None = None) -> None:
        folder = Path(folder or self.path.text).expanduser()
        self.path.text = str(folder)
        problem = self.busy() or check_folder(folder)
        if problem:
            self._status(problem, WARN)
            return
        self.on_unload()  # the old model's memory goes before the new one's arrives
        self.loaded = None

        def work(cancel):
            started = time.perf_counter()
            with PeakMemory() as peak:
                model = load_model(folder, self.threads, progress=lambda stage: self.post(lambda: self._stage(stage)),
                                   prepack_cache=self.prepack_cache, threads_cache=self.threads_cache)
            seconds = time.perf_counter() - started
            return model, seconds, resident_mb() | {f"peak_{k}": v for k, v in peak.peaks().items()}

        if self.loader.start(work, lambda result: self._loaded(folder, *result), self._load_failed):
            self.load_button.disabled = True
            self.loading, self.stage, self.started = folder, "starting", time.monotonic()
            self.expected = self.load_times.get(folder)
            self._status(f"loading {folder.name}...", MUTED)

    def _stage(self, stage: str) -> None:
        self.stage = stage

    def load_progress(self) -> tuple[float, str] | None:
        """(fraction, text) of the load in progress, or None: the fraction is the time so far against this
        bundle's last load here (capped below 1), or unknown (0) the first time."""
        if self.loading is None:
            return None
        elapsed = time.monotonic() - self.started
        fraction = min(elapsed / self.expected, 0.95) if self.expected else 0.0
        scale = f" of about {self.expected:.0f} s" if self.expected else ""
        return fraction, f"loading {self.loading.name}: {self.stage} ({elapsed:.0f} s{scale})"

    def _loaded(self, folder: Path, model, seconds: float, memory: dict[str, float]) -> None:
        self.load_button.disabled = False
        self.loaded, self.loading = folder, None
        self.load_seconds, self.memory_after_load = seconds, memory
        if getattr(getattr(model.session, "prepack", None), "state", "") != "written":  # a one-off: not the scale
            self.load_times.put(folder, seconds)
        self.chooser.path = str(folder.parent)  # browsing starts next to the bundle in use
        info = bundle_info(folder)
        provider = model.session.provider_choice.providers[0] if hasattr(model.session, "provider_choice") else ""
        cache = getattr(model.session, "prepack", None)  # where the weights live: mapped file or repacked copy
        cache_text = f"\n{cache.message()}" + (f", {cache.disk_bytes / 1e9:.2f} GB on disk" if cache.mapped else "") \
            if cache is not None else ""
        self.current.text = f"{folder}\n{info.summary()}" + (f", {provider}" if provider else "") + cache_text
        self.current.color = TEXT
        self._status(f"loaded {folder.name} in {seconds:.1f} s", GOOD)
        self.on_loaded(folder, model)

    def _load_failed(self, error: Exception) -> None:
        self.load_button.disabled = False
        self.loading = None
        self.current.text, self.current.color = "No model loaded.", MUTED
        self._status(f"cannot load: {error}", WARN)

    def _status(self, text: str, color) -> None:
        self.load_status.text, self.load_status.color = text, color

    # --- serving ---------------------------------------------------------------------------------------------------

    def toggle_serve(self) -> None:
        """Start the server on the app's model, or stop it; the button shows which."""
        if self.server.running:
            self.stop_serving("stopped")
            return
        model, problem = self.model(), available()
        if model is None or problem or self.loaded is None:
            self.serve_button.state = "normal"
            self.serve_status.text, self.serve_status.color = problem or "load a model first", WARN
            return
        try:
            address = self.server.start(model, self.loaded.name)
        except OSError as e:
            self.serve_button.state = "normal"
            self.serve_status.text, self.serve_status.color = str(e), WARN
            return
        self.serve_button.state, self.serve_button.text = "down", "Serving"
        self.serve_status.text = f"{address}\nmodel {self.loaded.name}, key {self.server.key}"
        self.serve_status.color = GOOD

    def stop_serving(self, why: str) -> None:
        if self.server.running:
            self.server.stop()
            self.serve_status.text, self.serve_status.color = f"not serving ({why})", MUTED
        self.serve_button.state, self.serve_button.text = "normal", "Serve"

    # --- downloading ----------------------------------------------------------------------------------------------

    def fetch(self) -> None:
        url = self.url.text.strip()
        if not url:
            self.download_status.text = "enter the bundle's address first"
            return
        dest = self.downloads / download.default_name(url)
        last = [0.0]

        def progress(p: download.Progress) -> None:  # worker thread: at most ten UI updates a second
            now = time.monotonic()
            if now - last[0] >= 0.1 or p.done == p.total:
                last[0] = now
                self.post(lambda: self._progress(p))

        started = self.fetcher.start(lambda cancel: download.fetch_bundle(url, dest, progress, cancel),
                                     self._fetched, self._fetch_failed)
        if started:
            self.download_button.disabled, self.cancel_button.disabled = True, False
            self.download_status.text, self.download_status.color = f"connecting to {url}...", MUTED

    def _progress(self, p: download.Progress) -> None:
        self.bar.max, self.bar.value = max(p.total, 1), p.done
        self.download_status.text = (f"{p.file} ({p.file_index}/{p.file_count}): {p.done / 1e6:.1f} of "
                                     f"{p.total / 1e6:.1f} MB")

    def _fetched(self, dest: Path) -> None:
        self.download_button.disabled, self.cancel_button.disabled = False, True
        self.bar.value = self.bar.max
        self.download_status.text, self.download_status.color = f"downloaded and verified: {dest}", GOOD
        self.load(dest)

    def _fetch_failed(self, error: Exception) -> None:
        self.download_button.disabled, self.cancel_button.disabled = False, True
        self.download_status.text, self.download_status.color = str(error), WARN

    def snapshot(self) -> dict:
        return {"loaded": str(self.loaded) if self.loaded else None, "current": self.current.text,
                "load_status": self.load_status.text, "download_status": self.download_status.text,
                "busy": self.loader.running or self.fetcher.running,
                "loading": str(self.loading) if self.loading else None, "load_seconds": self.load_seconds,
                "memory_after_load": self.memory_after_load, "serve": self.server.snapshot(),
                "serve_status": self.serve_status.text}
