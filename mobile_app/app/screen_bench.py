"""Benchmark screen: pick a workload, run it off the UI thread with a progress bar, read what was measured and
then, as a prediction, the verdict about phones."""

from __future__ import annotations

from dataclasses import asdict

from kivy.metrics import dp, sp
from kivy.uix.boxlayout import BoxLayout
from kivy.uix.gridlayout import GridLayout
from kivy.uix.label import Label
from kivy.uix.progressbar import ProgressBar
from kivy.uix.screenmanager import Screen
from kivy.uix.scrollview import ScrollView

from . import bench
from .jobs import Job, Post
from .widgets import ERROR, GOOD, MUTED, TEXT, WARN, Panel, Text, button, heading, row, toggle


class BenchScreen(Screen):
    def __init__(self, post: Post, loaded, busy, **kwargs):
        """`loaded()`: (folder, model, load seconds, memory after load) of the app's model, which is what is
        measured (never a second copy), or None; `busy()`: why not now, or None."""
        super().__init__(name="benchmark", **kwargs)
        self.post, self.loaded, self.busy = post, loaded, busy
        self.job = Job(post, "benchmark")
        self.report: bench.BenchReport | None = None
        self.sustained: bench.SustainedReport | None = None
        self.preset = "quick"
        outer = BoxLayout(orientation="vertical", padding=dp(10), spacing=dp(8))
        self.presets = {name: toggle(name.title(), "preset", "down" if name == self.preset else "normal")
                        for name in (*bench.PRESETS, "sustained")}
        for name, t in self.presets.items():
            t.bind(on_press=lambda _t, n=name: self.pick(n))
        outer.add_widget(row(*self.presets.values()))
        self.run_button = button("Run benchmark", self.start, size_hint=(1, None))
        self.cancel_button = button("Cancel", self.job.stop, color=ERROR, width=dp(90), disabled=True)
        outer.add_widget(row(self.run_button, self.cancel_button))
        self.progress = ProgressBar(max=1, value=0, size_hint_y=None, height=dp(16))
        self.status = Text(color=MUTED, font_size=sp(13))
        outer.add_widget(self.progress)
        outer.add_widget(self.status)
        scroll = ScrollView(do_scroll_x=False, bar_width=dp(4))
        self.results = BoxLayout(orientation="vertical", size_hint_y=None, spacing=dp(10))
        self.results.bind(minimum_height=self.results.setter("height"))
        scroll.add_widget(self.results)
        outer.add_widget(scroll)
        self.add_widget(outer)
        self.pick(self.preset)

    def pick(self, name: str) -> None:
        self.preset = name
        if not self.job.running:
            self.status.text = f"{name.title()}: " + (
                f"decode without pause for {bench.SUSTAINED_MINUTES:.0f} minutes, speed beside the device's "
                "temperatures, as a long answer heats a phone" if name == "sustained"
                else f"{self._describe(bench.PRESETS[name])}.")

    @staticmethod
    def _describe(p: bench.Preset) -> str:
        return (f"decode {max(p.decode)} tokens, prefill {max(p.prompts)}, {p.runs} run{'s' if p.runs > 1 else ''}"
                " after a warm-up, with the chat's model and threads")

    def start(self) -> None:
        reason = self.busy()
        loaded = self.loaded()
        if reason or loaded is None:
            self.status.text = reason or "no model loaded: pick one on the Model screen"
            return
        folder, model, load_seconds, memory = loaded

        def progress(done: int, total: int, message: str) -> None:  # on the worker thread
            self.post(lambda: self._progress(done, total, message))

        self.run_button.disabled, self.cancel_button.disabled = True, False
        if self.preset == "sustained":
            self.job.start(lambda cancel: bench.run_sustained(folder, model.session, progress=progress, cancel=cancel),
                           self._done_sustained, self._failed)
            self.status.text = f"decoding on {folder.name} for {bench.SUSTAINED_MINUTES:.0f} minutes..."
            return
        preset = bench.PRESETS[self.preset]
        self.job.start(lambda cancel: bench.run_benchmark(folder, preset, progress, cancel, session=model.session,
                                                          app_load=(load_seconds, memory)), self._done, self._failed)
        self.status.text = f"running the {preset.name} workload on {folder.name}..."

    def _progress(self, done: int, total: int, message: str) -> None:
        self.progress.max, self.progress.value = total, done
        self.status.text = f"{done}/{total}: {message}"

    def _failed(self, error: Exception) -> None:
        self._idle()
        cancelled = isinstance(error, bench.Cancelled)
        self.status.text = "cancelled" if cancelled else f"failed: {type(error).__name__}: {error}"

    def _done(self, report: bench.BenchReport) -> None:
        self._idle()
        self.report = report
        self.status.text = f"{report.preset} workload on {report.bundle.rsplit('/', 1)[-1]}" + (
            " (disturbed: another process competed for the CPU)" if report.disturbed else "")
        self.show(report)

    def _done_sustained(self, report: bench.SustainedReport) -> None:
        self._idle()
        self.sustained = report
        self.status.text = f"sustained workload on {report.bundle.rsplit('/', 1)[-1]}"
        self.results.clear_widgets()
        panel = Panel()
        panel.add_widget(Text(text=report.headline(), font_size=sp(20), bold=True))
        panel.add_widget(self._grid(report.rows(), cols=2))
        if report.missing_text():
            panel.add_widget(Text(text=report.missing_text(), color=MUTED, font_size=sp(13)))
        self.results.add_widget(panel)

    def _idle(self) -> None:
        self.run_button.disabled, self.cancel_button.disabled = False, True

    def show(self, report: bench.BenchReport) -> None:
        """What was measured first (large), then the prediction about phones under a heading that says it is one."""
        self.results.clear_widgets()
        measured = Panel()
        measured.add_widget(Text(text=report.headline(), font_size=sp(20), bold=True))
        measured.add_widget(Text(text=report.headline_note(), color=MUTED, font_size=sp(13)))
        measured.add_widget(self._grid(report.metric_rows(), cols=2))
        measured.add_widget(Text(text=report.roofline_text(), color=MUTED, font_size=sp(13)))
        self.results.add_widget(measured)
        if report.prediction is not None:
            predicted = Panel()
            predicted.add_widget(heading(report.prediction_heading()))
            verdict, basis = report.prediction_lines()
            predicted.add_widget(Text(text=verdict, color=GOOD if report.reaches_target else WARN))
            predicted.add_widget(Text(text=basis, color=MUTED, font_size=sp(13)))
            predicted.add_widget(self._grid([("SoC", "tok/s", "30?"), *report.phone_rows()], cols=3))
            self.results.add_widget(predicted)

    @staticmethod
    def _grid(rows, cols: int) -> GridLayout:
        grid = GridLayout(cols=cols, size_hint_y=None, row_default_height=dp(26), row_force_default=True,
                          spacing=(dp(6), 0))
        grid.bind(minimum_height=grid.setter("height"))
        widths = {2: (0.6, 0.4), 3: (0.66, 0.2, 0.14)}[cols]
        for r in rows:
            for value, width in zip(r, widths, strict=True):
                color = GOOD if value == "yes" else WARN if value == "no" else TEXT
                label = Label(text=value, font_size=sp(14), size_hint_x=width, color=color, halign="left",
                              valign="middle", shorten=True, shorten_from="right")
                label.bind(size=lambda lb, size: setattr(lb, "text_size", size))
                grid.add_widget(label)
        return grid

    def snapshot(self) -> dict:
        return {"status": self.status.text, "running": self.job.running,
                "headline": self.report.headline() if self.report else None,
                "verdict": self.report.verdict if self.report else None,
                "report": asdict(self.report) if self.report else None,
                "shown": self.shown()}

    def shown(self) -> list[str]:
        """The results' text as on screen, top to bottom (headings, lines, table cells)."""
        return [w.text for w in self.results.walk(restrict=True) if isinstance(w, Label) and w.text]
