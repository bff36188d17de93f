"""The benchmark screen's logic: lfm-bench's workload and roofline, summarized into what a user reads.

Numbers are chosen as `lfm-bench` chooses them (the best decode median against the roofline ceiling), so the
app and the CLI agree. What was measured leads: the loaded bundle's own speed and memory on this device. Then,
labelled as a prediction with its basis, the verdict about the model that matters on a phone, LFM2.5-8B-A1B
int4, whatever bundle was measured: each phone's decode predicted from its bytes per token and an efficiency
measured on a memory-bound model (device_bench/roofline.py `phone_prediction`).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from lfm_edge.device_bench import roofline, speed, sustained
from lfm_edge.device_bench.measure import Metric
from lfm_edge.runtime import backends
from lfm_edge.runtime.backend import Session
from lfm_edge.runtime.threads import ThreadChoice

TARGET = roofline.TARGET_TOKENS_PER_SECOND


@dataclass(frozen=True)
class Preset:
    name: str
    prompts: tuple[int, ...]  # prefill lengths; the shortest also gives time to first token
    depths: tuple[int, ...]  # context already in the cache when decode is timed
    decode: tuple[int, ...]  # tokens decoded per measurement
    runs: int  # measured runs after one warm-up
    bandwidth_gib: float  # size of the read-bandwidth probe (large enough to leave the caches)
    threads: int = field(default_factory=lambda: min(4, os.cpu_count() or 1))


PRESETS: dict[str, Preset] = {
    # seconds on the demo model; what the tests run
    "quick": Preset("quick", (16,), (0,), (8,), 1, 0.125),
    # about a minute for a 1B-active model on a phone: enough decode steps to be stable
    "standard": Preset("standard", (128, 512), (0, 512), (64,), 2, 0.5),
}


Cancelled = speed.Cancelled  # what a cancelled `run_benchmark` or `run_sustained` raises
SUSTAINED_MINUTES = 10.0  # the Sustained workload: long enough for a phone to heat and throttle


@dataclass
class BenchReport:
    bundle: str
    preset: str
    threads: int
    prefill_tps: float
    prefill_tokens: int
    decode_tps: float  # best decode median, as lfm-bench reports
    ttft_s: float
    load_s: float
    peak_rss_mb: float
    rss_decoding_mb: float  # resident memory right after decoding (0 from benches that do not record it)
    disturbed: bool  # no quiet run: another process competed for the CPU
    # resident memory split (runtime/generate.py resident_mb): anonymous = the process's own copies (weights
    # repacked at load among them), file = mapped bundle pages the kernel can drop and read again
    anon_after_load_mb: float = 0.0
    file_after_load_mb: float = 0.0
    anon_decoding_mb: float = 0.0
    file_decoding_mb: float = 0.0
    # peaks, split the same way (runtime/memory.py PeakMemory): the benchmark's runs (their loads too when
    # load_measured is "benchmark"), and the app's load of the model (a mapped bundle beside its repacked copy)
    peak_anon_mb: float = 0.0
    peak_file_mb: float = 0.0
    load_peak_anon_mb: float = 0.0
    load_peak_file_mb: float = 0.0
    load_measured: str = "benchmark"  # "benchmark": loaded by each run; "app": the app's own load, measured once
    weights_mb: float = 0.0  # the bundle's weights (model.onnx*), for the memory ratios
    bandwidth_gbs: float = 0.0
    bytes_per_token: float = 0.0
    ceiling_tps: float = 0.0
    roofline_error: str = ""
    model_label: str = ""  # what was measured (roofline.bundle_label), e.g. "demo_model int4"
    prediction: roofline.PhonePrediction | None = None  # phones, for LFM2.5-8B-A1B int4
    threads_note: str = ""  # how threads="auto" chose `threads` (thread_note), "" for a given count

    @property
    def fraction(self) -> float:
        """Share of this device's memory-bandwidth ceiling the decode reached."""
        return self.decode_tps / self.ceiling_tps if self.ceiling_tps else 0.0

    @property
    def phones(self) -> list[dict]:
        return self.prediction.phones if self.prediction else []

    @property
    def reaches_target(self) -> bool:
        """Every phone in the table is predicted to decode the model at the target or faster."""
        return bool(self.phones) and all(p["meets_target"] for p in self.phones)

    def headline(self) -> str:
        """The first line: what was measured, on this device."""
        return f"Measured here: {self.model_label or 'this bundle'} decodes {self.decode_tps:.1f} tok/s"

    def headline_note(self) -> str:
        return (f"Best decode median of this {self.preset} run, on this device, {self.threads} "
                f"thread{'s' if self.threads != 1 else ''}.")

    @property
    def verdict(self) -> str:
        """The prediction's line: LFM2.5-8B-A1B int4 on phones, predicted (not this bundle, not measured)."""
        return verdict(self.prediction) if self.prediction else "no phone prediction yet"

    def prediction_heading(self) -> str:
        model = f"{self.prediction.model} on phones" if self.prediction else "phones"
        return f"Predicted, not measured: {model}"

    def prediction_lines(self) -> list[str]:
        """Under the heading: the predicted range against the target, and its basis."""
        p = self.prediction
        if p is None:
            return []
        return [f"{p.predicted_range(TARGET)} (target: {TARGET:.0f} tok/s decode).", p.basis()]

    def over_weights(self, mb: float) -> str:
        return f" ({mb * (1 << 20) / (self.weights_mb * 1e6):.2f}x weights)" if self.weights_mb else ""

    def metric_rows(self) -> list[tuple[str, str]]:
        def split(rows: tuple[tuple[str, float, float], ...]) -> list[tuple[str, str]]:
            return [(label, f"{anon:.0f} / {file:.0f} MB") for label, anon, file in rows if anon or file]

        run = "Peak in benchmark" if self.load_measured == "app" else "Peak in load + run"
        # anonymous (the process's own: what a low-memory killer weighs) and file-backed (mapped, reclaimable)
        # peaks apart; one total only where they could not be read
        peaks = split((("Peak in load: anon / file", self.load_peak_anon_mb, self.load_peak_file_mb),
                       (f"{run}: anon / file", self.peak_anon_mb, self.peak_file_mb)))
        return [
            (f"Decode ({self.model_label})" if self.model_label else "Decode", f"{self.decode_tps:.1f} tok/s"),
            (f"Prefill ({self.prefill_tokens} tokens)", f"{self.prefill_tps:.0f} tok/s"),
            ("Time to first token", f"{self.ttft_s * 1000:.0f} ms"),
            *(peaks or [("Peak memory", f"{self.peak_rss_mb:.0f} MB")]),
            *([("Memory while decoding", f"{self.rss_decoding_mb:.0f} MB{self.over_weights(self.rss_decoding_mb)}")]
              if self.rss_decoding_mb else []),
            *split((("After load: anon / file", self.anon_after_load_mb, self.file_after_load_mb),
                    ("Decoding: anon / file", self.anon_decoding_mb, self.file_decoding_mb))),
            ("Load (the app's)" if self.load_measured == "app" else "Load", f"{self.load_s:.2f} s"),
            ("Threads", f"{self.threads} ({self.threads_note})" if self.threads_note else str(self.threads)),
        ]

    def roofline_text(self) -> str:
        if self.roofline_error:
            return f"Roofline unavailable: {self.roofline_error}"
        return (f"Roofline: {self.bytes_per_token / 1e6:.1f} MB read per token at {self.bandwidth_gbs:.1f} GB/s "
                f"allows {self.ceiling_tps:.0f} tok/s here; decode reached {roofline.share_of_ceiling(self.fraction)}.")

    def phone_rows(self) -> list[tuple[str, str, str]]:
        """(SoC, predicted tok/s of LFM2.5-8B-A1B int4, meets 30 tok/s)."""
        return [(p["soc"], f"{p['predicted_tps']:.1f}", "yes" if p["meets_target"] else "no") for p in self.phones]


def thread_note(choice: ThreadChoice | None) -> str:
    """How threads="auto" chose: when, the cores, each candidate's decode ("" for a given count)."""
    return choice.note() if choice is not None else ""


def verdict(prediction: roofline.PhonePrediction, target: float = TARGET) -> str:
    """The verdict line: the model it is for, its predicted decode on phones, how many reach the target."""
    return prediction.verdict(target)


def summarize(metrics: dict[str, Metric], bundle: Path, preset: Preset, threads: int | None = None,
              app_load: tuple[float, dict] | None = None) -> BenchReport:
    """The report's measured part, from `device_bench.speed.run`'s metrics. `app_load`: (seconds, memory) of
    the app's own load, when the benchmark measured the app's session: memory as the Model screen records it,
    resident right after ("anonymous", "file") and the load's peaks ("peak_anonymous", "peak_file")."""
    summary = {k: m.summary() for k, m in metrics.items() if m.samples}
    decode = [v for k, v in summary.items() if k.startswith("decode/")]
    prefill = {int(k.split("/")[1]): v for k, v in summary.items() if k.startswith("prefill/")}
    longest = max(prefill) if prefill else 0

    def median(key: str) -> float:
        return summary[key]["median"] if key in summary else 0.0

    anon_after, file_after = median("anon_after_load"), median("file_after_load")
    load_memory = app_load[1] if app_load is not None and app_load[1] else {}
    if load_memory:  # right after the app's load beats "before the warm-up"
        anon_after, file_after = load_memory.get("anonymous", 0.0), load_memory.get("file", 0.0)
    try:
        weights = sum(p.stat().st_size for p in Path(bundle).iterdir() if p.name.startswith("model.onnx"))
    except OSError:
        weights = 0
    return BenchReport(
        bundle=str(bundle), preset=preset.name, threads=threads or preset.threads,
        prefill_tps=prefill[longest]["median"] if prefill else 0.0, prefill_tokens=longest,
        decode_tps=max(v["median"] for v in decode) if decode else 0.0,
        ttft_s=median("ttft"), load_s=app_load[0] if app_load is not None else median("load"),
        peak_rss_mb=median("peak_rss"), rss_decoding_mb=median("rss_decoding"),
        disturbed=any(v["quiet_runs"] == 0 for v in decode),
        anon_after_load_mb=anon_after, file_after_load_mb=file_after,
        anon_decoding_mb=median("anon_decoding"), file_decoding_mb=median("file_decoding"),
        peak_anon_mb=median("peak_anon"), peak_file_mb=median("peak_file"),
        load_peak_anon_mb=load_memory.get("peak_anonymous", 0.0), load_peak_file_mb=load_memory.get("peak_file", 0.0),
        load_measured="app" if app_load is not None else "benchmark", weights_mb=weights / 1e6,
        model_label=roofline.bundle_label(bundle))


def add_roofline(report: BenchReport, bundle: Path, bandwidth_gbs: float) -> BenchReport:
    """Bytes per token from the bundle's manifest.json (lfm-export records them, so a phone build without the
    onnx package has them), else from its graph, which needs onnx (bundles from onnxruntime-genai's builder).
    Then the phone prediction for LFM2.5-8B-A1B int4: at this bundle's efficiency if it is memory-bound, else at
    the full model's recorded one (also when this bundle's bytes per token are unknown)."""
    tokens = None
    try:
        tokens = roofline.bytes_per_token(bundle)
    except ImportError as e:
        report.roofline_error = (f"{e.name or 'onnx'} is not installed and the bundle's manifest.json does not "
                                 "record bytes per token (a bundle from lfm-export does)")
    if tokens is not None:
        report.bandwidth_gbs, report.bytes_per_token = bandwidth_gbs, tokens.total
        report.ceiling_tps = roofline.ceiling(bandwidth_gbs, tokens.total)
    report.prediction = roofline.phone_prediction(bundle, tokens, report.fraction)
    return report


def stage_count(preset: Preset, loads: bool = True) -> int:
    """How many progress messages `speed.run` sends, plus the bandwidth probe: the progress bar's length.
    `loads`: whether each run loads the bundle (not when the app's session is measured)."""
    per_run = int(loads) + len(preset.prompts) + len(preset.depths) * len(preset.decode)
    return 1 + (preset.runs + 1) * per_run


def run_benchmark(bundle: Path, preset: Preset, progress: Callable[[int, int, str], None] = lambda *a: None,
                  cancel: threading.Event | None = None, session: Session | None = None,
                  app_load: tuple[float, dict] | None = None) -> BenchReport:
    """Blocking; call it from a worker thread. `progress(done, total, message)`; a set `cancel` stops the run
    with `Cancelled` within one model step.

    `session`: the session the app already holds (its chat's), measured as it is: the app then holds one
    copy of the model, and the thread count is that session's; `app_load` = (seconds, memory right after)
    of the app's load stands in for the load the benchmark does not repeat. Without `session` each run loads
    the bundle through `backends.open_session` (a phone build without onnxruntime's Python binding runs it on
    its Java or Objective-C backend)."""
    bundle = Path(bundle)
    total, done = stage_count(preset, loads=session is None), 0

    def step(message: str) -> None:
        nonlocal done
        progress(done, total, message)
        done += 1

    if cancel is not None and cancel.is_set():
        raise Cancelled("benchmark cancelled")
    step("measuring read bandwidth")
    bandwidth = roofline.read_bandwidth(gib=preset.bandwidth_gib)
    threads = (session.threads or None) if session is not None else None
    metrics = speed.run(bundle, threads or preset.threads, list(preset.prompts), list(preset.depths),
                        list(preset.decode), preset.runs, progress=step, open_session=backends.open_session,
                        cancel=cancel, session=session)
    progress(total, total, "done")
    report = add_roofline(summarize(metrics, bundle, preset, threads, app_load if session is not None else None),
                          bundle, bandwidth)
    report.threads_note = thread_note(session.thread_choice if session is not None else None)
    return report


@dataclass
class SustainedReport:
    """The Sustained workload's result (device_bench/sustained.py `run`): speed per window beside heat."""

    bundle: str
    minutes: float
    threads: int
    result: dict

    @property
    def summary(self) -> dict:
        return self.result["summary"]

    def headline(self) -> str:
        s = self.summary
        if not s["first_tps"] or not s["last_tps"]:
            return "Sustained: too short to compare a first and a last stretch"
        edge = "minute" if s["edge_s"] >= 60 else f"{s['edge_s']:.0f} s"
        return (f"Sustained: last {edge} {s['last_tps']:.1f} tok/s, {s['last_over_first']:.2f}x the first "
                f"({s['first_tps']:.1f})")

    def rows(self) -> list[tuple[str, str]]:
        s, windows = self.summary, self.result["windows"]
        statuses = [w["platform_thermal_status"] for w in windows if w.get("platform_thermal_status")]
        return [("Decoded", f"{s['decoded_tokens']:,} tokens in {s['duration_s']:.0f} s ({s['turns']} turns)"),
                ("Overall decode", f"{s['overall_tps']:.1f} tok/s" if s["overall_tps"] else "n/a"),
                ("Hottest thermal zone", f"{s['hottest_c']:.1f} °C" if s["hottest_c"] is not None else "not exposed"),
                ("Thermal status (last)", statuses[-1] if statuses else "not exposed"),
                ("Anonymous memory (last)", f"{windows[-1]['anonymous_mb']:.0f} MB" if windows else "n/a"),
                ("Threads", str(self.threads))]

    def missing_text(self) -> str:
        missing = self.summary["missing_sensors"]
        return ("Not exposed on this device (missing, not zero): " + "; ".join(missing)) if missing else ""


def run_sustained(bundle: Path, session: Session, minutes: float = SUSTAINED_MINUTES,
                  progress: Callable[[int, int, str], None] = lambda *a: None,
                  cancel: threading.Event | None = None) -> SustainedReport:
    """Blocking; call it from a worker thread. Decodes on the app's session for `minutes` (a set `cancel` stops it
    with `Cancelled` within one step); `progress(done, total, message)` per window."""
    threads = session.threads or 1
    result = sustained.run(session, minutes * 60, progress=lambda f, m: progress(int(f * 1000), 1000, m),
                           cancel=cancel, threads=threads)
    progress(1000, 1000, "done")
    return SustainedReport(str(bundle), minutes, threads, result)
