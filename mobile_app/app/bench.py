"""The benchmark screen's logic: lfm-bench's workload and roofline, summarized into what a user reads.

Numbers are chosen as `lfm-bench` chooses them (the best decode median against the roofline ceiling, the
phone table at the fraction of the ceiling this device reached), so the app and the CLI agree.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from lfm_edge.device_bench import bench, roofline
from lfm_edge.mobile_app import backends

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


Cancelled = bench.Cancelled  # what a cancelled `run_benchmark` raises


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
    bandwidth_gbs: float = 0.0
    bytes_per_token: float = 0.0
    ceiling_tps: float = 0.0
    phones: list[dict] = field(default_factory=list)
    roofline_error: str = ""

    @property
    def fraction(self) -> float:
        """Share of this device's memory-bandwidth ceiling the decode reached."""
        return self.decode_tps / self.ceiling_tps if self.ceiling_tps else 0.0

    @property
    def reaches_target(self) -> bool:
        return self.decode_tps >= TARGET

    @property
    def verdict(self) -> str:
        return verdict(self.decode_tps)

    def metric_rows(self) -> list[tuple[str, str]]:
        return [
            ("Decode", f"{self.decode_tps:.1f} tok/s"),
            (f"Prefill ({self.prefill_tokens} tokens)", f"{self.prefill_tps:.0f} tok/s"),
            ("Time to first token", f"{self.ttft_s * 1000:.0f} ms"),
            ("Peak memory (process)", f"{self.peak_rss_mb:.0f} MB"),
            *([("Memory while decoding", f"{self.rss_decoding_mb:.0f} MB")] if self.rss_decoding_mb else []),
            ("Load", f"{self.load_s:.2f} s"),
            ("Threads", str(self.threads)),
        ]

    def roofline_text(self) -> str:
        if self.roofline_error:
            return f"Roofline unavailable: {self.roofline_error}"
        return (f"Roofline: {self.bytes_per_token / 1e6:.1f} MB read per token at {self.bandwidth_gbs:.1f} GB/s "
                f"allows {self.ceiling_tps:.0f} tok/s here; decode reached {self.fraction:.0%} of it.")

    def phone_rows(self) -> list[tuple[str, str, str]]:
        """(SoC, predicted tok/s, meets 30 tok/s) at the fraction of the ceiling this device reached."""
        return [(p["soc"], f"{p['predicted_tps']:.1f}", "yes" if p["meets_target"] else "no") for p in self.phones]


def verdict(decode_tps: float, target: float = TARGET) -> str:
    if decode_tps >= target:
        return f"{decode_tps:.1f} tok/s: reaches {target:.0f} tok/s"
    return f"{decode_tps:.1f} tok/s: below the {target:.0f} tok/s target"


def summarize(metrics: dict[str, bench.Metric], bundle: Path, preset: Preset) -> BenchReport:
    """The report's measured part, from `device_bench.bench.run`'s metrics."""
    summary = {k: m.summary() for k, m in metrics.items() if m.samples}
    decode = [v for k, v in summary.items() if k.startswith("decode/")]
    prefill = {int(k.split("/")[1]): v for k, v in summary.items() if k.startswith("prefill/")}
    longest = max(prefill) if prefill else 0
    return BenchReport(
        bundle=str(bundle), preset=preset.name, threads=preset.threads,
        prefill_tps=prefill[longest]["median"] if prefill else 0.0, prefill_tokens=longest,
        decode_tps=max(v["median"] for v in decode) if decode else 0.0,
        ttft_s=summary["ttft"]["median"] if "ttft" in summary else 0.0,
        load_s=summary["load"]["median"], peak_rss_mb=summary["peak_rss"]["median"],
        rss_decoding_mb=summary["rss_decoding"]["median"] if "rss_decoding" in summary else 0.0,
        disturbed=any(v["quiet_runs"] == 0 for v in decode))


def add_roofline(report: BenchReport, bundle: Path, bandwidth_gbs: float) -> BenchReport:
    """Bytes per token from the bundle's manifest.json (lfm-export records them, so a phone build without the
    onnx package has them), else from its graph, which needs onnx (bundles from onnxruntime-genai's builder)."""
    try:
        tokens = roofline.bytes_per_token(bundle)
    except ImportError as e:
        report.roofline_error = (f"{e.name or 'onnx'} is not installed and the bundle's manifest.json does not "
                                 "record bytes per token (a bundle from lfm-export does)")
        return report
    report.bandwidth_gbs, report.bytes_per_token = bandwidth_gbs, tokens.total
    report.ceiling_tps = roofline.ceiling(bandwidth_gbs, tokens.total)
    report.phones = roofline.phone_predictions(tokens.total, report.fraction or None)
    return report


def stage_count(preset: Preset) -> int:
    """How many progress messages `bench.run` sends, plus the bandwidth probe: the progress bar's length."""
    per_run = 1 + len(preset.prompts) + len(preset.depths) * len(preset.decode)
    return 1 + (preset.runs + 1) * per_run


def run_benchmark(bundle: Path, preset: Preset, progress: Callable[[int, int, str], None] = lambda *a: None,
                  cancel: threading.Event | None = None) -> BenchReport:
    """Blocking; call it from a worker thread. `progress(done, total, message)`; a set `cancel` stops the run
    with `Cancelled` within one model step. The bundle is loaded through `backends.open_session`, so a phone
    build without onnxruntime's Python binding runs it on its Java or Objective-C backend."""
    bundle = Path(bundle)
    total, done = stage_count(preset), 0

    def step(message: str) -> None:
        nonlocal done
        progress(done, total, message)
        done += 1

    if cancel is not None and cancel.is_set():
        raise Cancelled("benchmark cancelled")
    step("measuring read bandwidth")
    bandwidth = roofline.read_bandwidth(gib=preset.bandwidth_gib)
    metrics = bench.run(bundle, preset.threads, list(preset.prompts), list(preset.depths), list(preset.decode),
                        preset.runs, progress=step, open_session=backends.open_session,
                        cancel=cancel)
    progress(total, total, "done")
    return add_roofline(summarize(metrics, bundle, preset), bundle, bandwidth)
