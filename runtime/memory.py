"""This process's memory, as the runtime, the benchmarks and the app report it: peak and current resident
memory, its anonymous and file-backed parts, and what the system can still give (Linux and Android read
/proc; elsewhere the figures fall back as each function says). `PeakMemory` measures the peaks of one
stretch of work (a load, a benchmark run), not of everything the process did before it.
"""

from __future__ import annotations

import os
import resource
import sys
import threading
from pathlib import Path

__all__ = ["PeakMemory", "available_memory", "can_reset_peak", "children_peak_rss_mb", "current_rss_mb",
           "maxrss_mb", "peak_rss_mb", "release_free_heap", "reset_peak_rss", "resident_mb", "status_mb"]

CLEAR_REFS = "/proc/self/clear_refs"


def peak_rss_mb() -> float:
    """The resident high-water mark in MB (MiB): since the last `reset_peak_rss()` where the kernel keeps it
    (Linux and Android, /proc/self/status VmHWM), else the process's (getrusage). getrusage is not used on
    Linux: it keeps the peak of any thread that exited, which a reset does not clear."""
    hwm = status_mb("VmHWM").get("VmHWM")
    if hwm is not None:
        return hwm
    return maxrss_mb(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def children_peak_rss_mb() -> float:
    """The resident high-water mark in MB (MiB) of the largest child process this one has waited for (getrusage
    RUSAGE_CHILDREN): e.g. the onnxruntime tools a phone export runs in processes of their own."""
    return maxrss_mb(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)


def maxrss_mb(maxrss: int) -> float:
    """A `ru_maxrss` (getrusage, wait4) in MB (MiB): bytes on macOS, KiB elsewhere."""
    return maxrss / (1 << 20) if sys.platform == "darwin" else maxrss / 1024


def can_reset_peak() -> bool:
    """Whether `reset_peak_rss` can work here (Linux and Android; not macOS or iOS)."""
    return os.access(CLEAR_REFS, os.W_OK)


def reset_peak_rss() -> bool:
    """Start the resident high-water mark afresh (5 > /proc/self/clear_refs), so that `peak_rss_mb()` covers
    only what follows: a benchmark's figure must not include its own bandwidth probe, an earlier run or an
    earlier model. False where it cannot (the peak then stays the process's)."""
    try:
        Path(CLEAR_REFS).write_text("5")
        return True
    except OSError:
        return False


def status_mb(*keys: str, pid: int | str = "self") -> dict[str, float]:
    """Fields of /proc/PID/status (this process's by default) in MB (MiB); {} where there is none (no /proc, a
    process that has ended). The kernel keeps these as counters, so reading them costs microseconds
    (smaps_rollup walks every mapping's pages)."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in keys:
                    out[key] = int(value.split()[0]) / 1024
    except (OSError, ValueError, IndexError):
        return {}
    return out


class PeakMemory:
    """The peak resident memory of a stretch of work, in total and split into anonymous and file-backed:

        with PeakMemory() as peak:
            load()
        peak.peaks()  # {"rss": ..., "anonymous": ..., "file": ...} in MB

    The total is the kernel's high-water mark, reset on entry (`reset_peak_rss`; where that cannot work it is
    the process's, and `reset` is False). The kernel keeps no high-water mark of the parts, so they are
    sampled on a thread every `interval` seconds (/proc/self/status RssAnon, and RssFile + RssShmem as
    `resident_mb` counts file-backed): a load that maps a bundle while it repacks it shows both at their
    highest, which a total alone hides. A spike shorter than the interval can escape the parts, never the
    total; the parts' peaks need not fall at the same moment, so they can add up to more than the total.
    Where /proc/self/status is unreadable the parts are absent."""

    def __init__(self, interval: float = 0.02):
        self.interval = interval
        self.reset = False
        self.rss = 0.0
        self.anonymous: float | None = None
        self.file: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        now = status_mb("RssAnon", "RssFile", "RssShmem")
        if "RssAnon" not in now:
            return
        file = now.get("RssFile", 0.0) + now.get("RssShmem", 0.0)
        self.anonymous = max(self.anonymous or 0.0, now["RssAnon"])
        self.file = max(self.file or 0.0, file)

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> PeakMemory:
        self.reset = reset_peak_rss()
        self._sample()
        self._thread = threading.Thread(target=self._watch, name="peak-memory", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()
        self.rss = peak_rss_mb()

    def peaks(self) -> dict[str, float]:
        """{"rss"} and, where they could be read, {"anonymous", "file"}: MB (MiB), as the other RSS figures."""
        parts = {"anonymous": self.anonymous, "file": self.file}
        return {"rss": self.rss} | {k: v for k, v in parts.items() if v is not None}


def current_rss_mb() -> float:
    """Resident memory now (Linux and Android; elsewhere the peak stands in)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / (1 << 20)
    except (OSError, ValueError, IndexError):
        return peak_rss_mb()


def resident_mb() -> dict[str, float]:
    """Resident memory now, split: {"rss", "anonymous", "file"} in MB (MiB, as the other RSS figures).

    Anonymous pages are this process's own copies (malloc, onnxruntime's repacked weights, pages written
    through a private file mapping); file-backed pages are the kernel's page cache mapped in, which it can
    drop and read again under pressure, and which every process mapping the same file shares. A phone's
    low-memory killer and the "copied, not mapped" question are about the anonymous part. From
    /proc/self/smaps_rollup (Linux 4.14+, Android 8+); elsewhere all of it counts as anonymous."""
    try:
        fields = {}
        for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
            key, _, value = line.partition(":")
            parts = value.split()
            if len(parts) == 2 and parts[1] == "kB":
                fields[key] = int(parts[0]) / 1024
        rss, anonymous = fields["Rss"], fields["Anonymous"]
    except (OSError, KeyError, ValueError):
        rss = current_rss_mb()
        return {"rss": rss, "anonymous": rss, "file": 0.0}
    return {"rss": rss, "anonymous": anonymous, "file": max(rss - anonymous, 0.0)}


def release_free_heap() -> bool:
    """Hand the C heap's free pages back to the system, where the C library can: glibc's malloc_trim (freed
    buffers of a few MB sit in the heap otherwise: glibc raises its mmap threshold as buffers come and go), and
    Android's bionic mallopt(M_PURGE). False where neither exists (the pages then go back as the allocator
    decides). Milliseconds: memory pressure calls it, never a token step."""
    import ctypes  # here only: the one caller is memory pressure

    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return False
    if hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)
        return True
    if sys.platform == "linux" and hasattr(libc, "mallopt"):  # bionic (Android 9+): M_PURGE
        return bool(libc.mallopt(-101, 0))
    return False


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation (Linux and Android: MemAvailable); None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None
