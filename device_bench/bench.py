"""The benchmark: load, time to first token, prefill and decode speed at several context depths.

Every timed region also records how long this process's threads waited for a CPU (from the kernel's
per-thread schedstat) and the load average, so a run disturbed by another process is known as such;
summaries use the quiet runs when there are any. Decode steps feed varied token ids, so routing varies
as in real text (a repeated token keeps re-reading the same experts and flatters the number).
"""

from __future__ import annotations

import gc
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

QUIET_WAIT_SHARE = 0.05  # a run whose threads waited for a CPU more than 5% of the time is disturbed


class Cancelled(Exception):
    """`run` stopped because its `cancel` event was set; no metrics are returned."""


@dataclass
class Sample:
    value: float  # tokens/s or seconds, as the metric says
    wall: float
    cpu_wait_share: float
    loadavg: float

    @property
    def quiet(self) -> bool:
        return self.cpu_wait_share <= QUIET_WAIT_SHARE


@dataclass
class Metric:
    unit: str
    samples: list[Sample] = field(default_factory=list)

    def summary(self) -> dict:
        quiet = [s.value for s in self.samples if s.quiet]
        used = quiet or [s.value for s in self.samples]
        return {"unit": self.unit, "median": statistics.median(used), "min": min(used), "max": max(used),
                "runs": len(self.samples), "quiet_runs": len(quiet), "basis": "quiet" if quiet else "all (disturbed)",
                "samples": [asdict(s) | {"quiet": s.quiet} for s in self.samples]}


def _cpu_wait_seconds() -> float:
    """Seconds this process's threads have spent runnable but waiting for a CPU."""
    total = 0
    for task in Path("/proc/self/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[1])
        except (OSError, IndexError, ValueError):
            continue
    return total / 1e9


def timed(fn: Callable[[], object], threads: int) -> tuple[float, float, float]:
    """(wall seconds, share of thread-time spent waiting for a CPU, 1-minute load average) around fn()."""
    wait0, t0 = _cpu_wait_seconds(), time.perf_counter()
    fn()
    wall = time.perf_counter() - t0
    wait = _cpu_wait_seconds() - wait0
    return wall, wait / max(wall * threads, 1e-9), os.getloadavg()[0]


def device_info(threads: int) -> dict:
    import onnxruntime as ort

    from ..runtime import hugepages

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "Hardware", "Processor")):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu_model": cpu, "cores": os.cpu_count(), "threads": threads, "machine": platform.machine(),
            "system": platform.platform(), "python": platform.python_version(), "onnxruntime": ort.__version__,
            **hugepages.describe()}


def _lfm_session(bundle: Path, threads: int) -> Any:
    from ..runtime.backends.python import LfmSession

    return LfmSession(bundle, threads=threads, verify="none")


def run(bundle: Path, threads: int, prompts: list[int], depths: list[int], decode: list[int], runs: int,
        progress: Callable[[str], None] = lambda m: None, seed: int = 0, *,
        open_session: Callable[[Path, int], Any] | None = None,
        cancel: threading.Event | None = None, session: Any = None) -> dict[str, Metric]:
    """Measure `runs` times after one warm-up; returns metrics keyed 'load', 'ttft', 'prefill/P',
    'decode/N@D' (N tokens decoded after D tokens of context), and memory: 'peak_rss', 'rss_decoding' and
    resident memory split into anonymous and file-backed pages (runtime/generate.py resident_mb) right after
    load ('anon_after_load', 'file_after_load') and right after each decode measurement ('anon_decoding',
    'file_decoding', the largest of the run).

    `session`: an already loaded session to measure instead of loading the bundle each run (the app passes
    the one its chat uses, so the model is in memory once); then there is no 'load' metric and the
    "after load" memory is what the process holds before the warm-up.

    `open_session(bundle, threads)` loads the bundle (default: LfmSession with onnxruntime's Python binding,
    no file check); an app passes `lfm_edge.runtime.backends.open_session` to run on a phone's Java or
    Objective-C backend. A set `cancel` raises `Cancelled` (no partial metrics: a half-measured run would
    be misread as a result) before each stage, before and after each prefill step (one step of the model
    cannot be interrupted), and before each decode step, so a cancel set mid-decode stops within one step."""
    from ..runtime.memory import current_rss_mb, peak_rss_mb, resident_mb

    open_session = open_session or _lfm_session

    def check() -> None:
        if cancel is not None and cancel.is_set():
            raise Cancelled("benchmark cancelled")

    def stage(message: str) -> None:
        check()
        progress(message)
        check()  # the progress callback may have set it

    rng = np.random.default_rng(seed)
    metrics: dict[str, Metric] = {"load": Metric("s"), "ttft": Metric("s"), "peak_rss": Metric("MB"),
                                  "rss_decoding": Metric("MB")}
    for key in ("anon_after_load", "file_after_load", "anon_decoding", "file_decoding"):
        metrics[key] = Metric("MB")
    given = session

    def load():
        nonlocal session
        session = open_session(bundle, threads)

    def memory(prefix: str) -> None:
        now = resident_mb()
        for kind in ("anon", "file"):
            metrics[f"{kind}_{prefix}"].samples.append(
                Sample(now["anonymous" if kind == "anon" else "file"], 0.0, 0.0, os.getloadavg()[0]))

    vocab_hi = 0

    def ids(n: int) -> np.ndarray:
        return rng.integers(100, vocab_hi, (1, n))

    for r in range(runs + 1):
        decoding_rss = 0.0  # resident memory right after each decode measurement, the largest of this run
        decoding_memory = {"anonymous": 0.0, "file": 0.0}
        label = "warm-up" if r == 0 else f"run {r}/{runs}"
        if given is None:
            stage(f"{label}: load")
            wall, wait, la = timed(load, threads)
            check()
            if r:
                metrics["load"].samples.append(Sample(wall, wall, wait, la))
                memory("after_load")
        elif r == 0:
            memory("after_load")
        vocab_hi = vocab_hi or min(session.vocab_size, 30000)
        for p in prompts:
            stage(f"{label}: prefill {p}")
            cache = session.new_cache(1, p + 1)
            prompt = ids(p)
            # as a generation prefills: logits for the last row only (where the graph can skip the others)
            wall, wait, la = timed(lambda c=cache, x=prompt: c.step(x, last=1), threads)
            check()
            if r:
                metrics.setdefault(f"prefill/{p}", Metric("tok/s")).samples.append(Sample(p / wall, wall, wait, la))
                if p == min(prompts):
                    metrics["ttft"].samples.append(Sample(wall, wall, wait, la))
        for d in depths:
            for n in decode:
                stage(f"{label}: decode {n} at depth {d}")
                cache = session.new_cache(1, d + n + 1)
                if d:
                    cache.step(ids(d), last=1)
                    check()
                steps = ids(n)

                def decode_loop(c=cache, s=steps):
                    for i in range(s.shape[1]):
                        check()
                        c.step(s[:, i:i + 1])

                wall, wait, la = timed(decode_loop, threads)
                if r:
                    sample = Sample(n / wall, wall, wait, la)
                    metrics.setdefault(f"decode/{n}@{d}", Metric("tok/s")).samples.append(sample)
                    decoding_rss = max(decoding_rss, current_rss_mb())
                    now = resident_mb()
                    decoding_memory = {k: max(v, now[k]) for k, v in decoding_memory.items()}
        if r:
            rss = peak_rss_mb()
            metrics["peak_rss"].samples.append(Sample(rss, 0.0, 0.0, os.getloadavg()[0]))
            if decoding_rss:
                metrics["rss_decoding"].samples.append(Sample(decoding_rss, 0.0, 0.0, os.getloadavg()[0]))
                for kind, key in (("anon", "anonymous"), ("file", "file")):
                    metrics[f"{kind}_decoding"].samples.append(
                        Sample(decoding_memory[key], 0.0, 0.0, os.getloadavg()[0]))
        # drop every reference to this run's session before the next load, or two would coexist
        cache = decode_loop = None  # noqa: F841
        session = given
        gc.collect()
    return {k: m for k, m in metrics.items() if m.samples}
