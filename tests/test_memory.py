"""runtime/memory.py: the peaks of one stretch of work, not of what the process did before it."""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import pytest

from lfm_edge.runtime.memory import PeakMemory, can_reset_peak, children_peak_rss_mb, peak_rss_mb, resident_mb


def test_peak_memory_is_its_own_stretchs_and_split_into_anonymous_and_file_backed():
    if not can_reset_peak():
        pytest.skip("this system cannot reset the resident high-water mark (/proc/self/clear_refs)")
    earlier = np.ones(384 << 20, np.uint8)  # 384 MiB written, then freed: before the stretch
    del earlier
    process_peak, start = peak_rss_mb(), resident_mb()
    with PeakMemory(interval=0.005) as peak:
        held = np.ones(128 << 20, np.uint8)
        time.sleep(0.05)  # a few samples while it is held
        del held
    peaks = peak.peaks()
    assert peak.reset and peaks["rss"] < process_peak - 200  # the earlier 384 MiB is not this stretch's
    assert peaks["rss"] >= start["rss"] + 120
    assert peaks["anonymous"] >= start["anonymous"] + 120  # a buffer of its own: anonymous, not file-backed
    assert start["file"] - 20 < peaks["file"] < start["file"] + 50


def test_a_childs_peak_is_counted_where_this_process_would_miss_it():
    """lfm-export prints it beside its own: a phone export's onnxruntime tools run in child processes."""
    before, own = children_peak_rss_mb(), peak_rss_mb()
    size = int(own + 300) << 20  # more than this process ever held, every page written
    subprocess.run([sys.executable, "-c", f"b = bytearray({size}); b[::4096] = b'x' * len(b[::4096])"], check=True)
    assert children_peak_rss_mb() >= max(before, own + 300)
    assert peak_rss_mb() < own + 100  # this process did not hold it
