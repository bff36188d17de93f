"""This process's memory, as the runtime, the benchmarks and the app report it: peak and current resident
memory, its anonymous and file-backed parts, and what the system can still give (Linux and Android read
/proc; elsewhere the figures fall back as each function says)."""

from __future__ import annotations

import os
import resource
import sys
from pathlib import Path

__all__ = ["available_memory", "current_rss_mb", "peak_rss_mb", "resident_mb"]


def peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB elsewhere


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
