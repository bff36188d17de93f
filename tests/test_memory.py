"""runtime/memory.py: the peaks of one stretch of work, not of what the process did before it."""

from __future__ import annotations

import time

import numpy as np
import pytest

from lfm_edge.runtime.memory import PeakMemory, can_reset_peak, peak_rss_mb, resident_mb


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
