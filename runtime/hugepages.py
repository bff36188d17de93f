"""Transparent huge pages for onnxruntime's prepacked weights (Linux with glibc).

onnxruntime copies every quantized weight into its kernels' layout when a session loads (prepacking), into
memory from malloc. With 4 KiB pages a 5 GB model costs over a million page faults to load, and decoding,
which streams all active weights once per token, misses the TLB on every new page. glibc's
`glibc.malloc.hugetlb=1` tunable makes malloc madvise its large allocations for transparent huge pages,
which the kernel grants when THP is "madvise" or "always". Tunables are read once, when the process starts,
so the command-line tools re-execute themselves with it set
(device_bench/results/notes/2026-11-22-full-geometry-vs-llama.md has the measurements).
`LFM_EDGE_HUGEPAGES=0` turns this off. Android (bionic) and iOS have neither the tunable nor the need to
re-execute: there the app process is what it is.
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

TUNABLE = "glibc.malloc.hugetlb=1"
_THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def transparent_hugepages() -> str:
    """The kernel's THP mode ("always", "madvise", "never"), or "unavailable"."""
    try:
        text = _THP.read_text()
    except OSError:
        return "unavailable"
    return text[text.index("[") + 1:text.index("]")] if "[" in text else "unavailable"


def malloc_hugepages() -> bool:
    """Whether this process's malloc asks for huge pages."""
    return TUNABLE in os.environ.get("GLIBC_TUNABLES", "").split(":")


def wanted() -> bool:
    return (os.environ.get("LFM_EDGE_HUGEPAGES", "1") != "0" and sys.platform.startswith("linux")
            and platform.libc_ver()[0] == "glibc" and transparent_hugepages() in ("always", "madvise"))


def reexec_with_hugepages() -> None:
    """Restart this command with the tunable set, when it helps and is not set yet; otherwise return."""
    if not wanted() or "glibc.malloc.hugetlb" in os.environ.get("GLIBC_TUNABLES", ""):  # set either way
        return
    current = os.environ.get("GLIBC_TUNABLES", "")
    env = dict(os.environ, GLIBC_TUNABLES=f"{current}:{TUNABLE}" if current else TUNABLE)
    argv = list(getattr(sys, "orig_argv", [])) or [sys.executable, *sys.argv]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *argv[1:]], env)


def describe() -> dict:
    return {"transparent_hugepages": transparent_hugepages(), "malloc_hugepages": malloc_hugepages()}
