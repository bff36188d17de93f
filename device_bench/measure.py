"""How the benchmarks measure: timed regions that record how long this process's threads waited for a CPU
(the kernel's per-thread schedstat) and the load average, so a run disturbed by another process is known as
such; summaries use the quiet runs when there are any. And what machine it was (`device_info`).
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..runtime import hugepages

QUIET_WAIT_SHARE = 0.05  # a run whose threads waited for a CPU more than 5% of the time is disturbed


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


def cpu_wait_seconds() -> float:
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
    wait0, t0 = cpu_wait_seconds(), time.perf_counter()
    fn()
    wall = time.perf_counter() - t0
    wait = cpu_wait_seconds() - wait0
    return wall, wait / max(wall * threads, 1e-9), os.getloadavg()[0]


def device_info(threads: int) -> dict:
    import onnxruntime as ort

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
