"""Give back the pages of weights onnxruntime keeps mapped but no longer reads.

onnxruntime maps a bundle's external data, then copies most weights into its kernels' layout (prepacking).
Mappings it keeps stay resident although almost nothing reads them again: the vocabulary codes that the
embedding's GatherBlockQuantized shares with the prepacked LM head are read a few rows per token, yet all of
them were touched by prepacking (about 145 MB for LFM2.5's 128000 x 2048 table). Dropping the page-table
entries of such mappings lowers RSS without losing anything: a later read faults the page back in from the
file. Only mappings with no page written through them are dropped (a write to a private file mapping makes
an anonymous copy of the page: "Anonymous: 0 kB" in /proc/self/smaps), since MADV_DONTNEED discards those.
"""

from __future__ import annotations

import ctypes
import re
import sys
from pathlib import Path

MADV_DONTNEED = 4
_HEADER = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) \S+ ([0-9a-f]+) \S+ \S+\s*(.*)$")


def clean_file_mappings(files: set[str], ranges: list[tuple[int, int]] | None = None
                        ) -> list[tuple[int, int, int]]:
    """(start, length, resident bytes) of this process's mappings of `files` that hold no written page; with
    `ranges` ([(file offset, end)]), only mappings that lie inside one of them."""
    out, current, fields = [], None, {}
    lines = Path("/proc/self/smaps").read_text().splitlines() + ["0-0 x 0 0 0 "]
    for line in lines:
        header = _HEADER.match(line)
        if header:
            if current and fields.get("Anonymous", 1) == 0 and fields.get("Rss", 0) > 0:
                out.append((current[0], current[1] - current[0], fields["Rss"]))
            start, end, offset, name = int(header[1], 16), int(header[2], 16), int(header[3], 16), header[4]
            inside = ranges is None or any(lo <= offset and offset + end - start <= hi for lo, hi in ranges)
            current, fields = ((start, end) if name in files and inside else None), {}
        elif current and ":" in line:
            key, _, value = line.partition(":")
            parts = value.split()
            if len(parts) == 2 and parts[1] == "kB":
                fields[key] = int(parts[0]) * 1024
    return out


def release_clean_pages(files: list[Path], ranges: list[tuple[int, int]] | None = None) -> int:
    """Drop resident, never-written pages of mappings of `files` (with `ranges`: only of those that map a part
    of the file inside one of them); returns the bytes released (0 off Linux)."""
    if not sys.platform.startswith("linux"):
        return 0
    try:
        mappings = clean_file_mappings({str(f.resolve()) for f in files}, ranges)
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return 0
    released = 0
    for start, length, resident in mappings:
        if libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(length), MADV_DONTNEED) == 0:
            released += resident
    return released
