"""runtime/backends/pages.py: weight pages onnxruntime keeps mapped are given back, and nothing is lost doing it."""

import mmap
import sys

import numpy as np
import pytest
from shared_bundles import demo_bundle

from lfm_edge.runtime.backends import pages
from lfm_edge.runtime.backends.python import LfmSession

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/smaps is Linux's")


def test_only_never_written_mappings_are_released_and_reads_still_see_the_file(tmp_path):
    path = tmp_path / "weights.bin"
    content = np.random.default_rng(0).integers(0, 256, 1 << 20, dtype=np.uint8).tobytes()
    path.write_bytes(content)
    with open(path, "rb") as f:
        clean = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # private, like onnxruntime's
        dirty = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    assert clean[:] == content and dirty[:] == content  # both resident now
    dirty[0] = (dirty[0] + 1) % 256  # a private write: releasing would lose it
    listed = pages.clean_file_mappings({str(path.resolve())})
    assert len(listed) == 1 and listed[0][2] >= (1 << 20) - 4096
    assert pages.release_clean_pages([path]) == listed[0][2]
    assert pages.clean_file_mappings({str(path.resolve())}) == []  # nothing resident is left to release
    assert clean[:] == content  # faulted back in from the file
    assert dirty[0] == (content[0] + 1) % 256 and dirty[1:] == content[1:]  # the written mapping was kept


@pytest.mark.slow
def test_a_session_gives_logits_identical_to_one_that_keeps_its_pages(tmp_path_factory, monkeypatch):
    bundle = demo_bundle(tmp_path_factory.getbasetemp(), "int4")
    prompt = np.array([[5, 17, 99, 3, 250, 42]])

    def run(session):
        cache = session.new_cache(1, 16)
        out = [cache.step(prompt)[0, -1]]
        for t in (7, 8, 9):
            out.append(cache.step(np.array([[t]]))[0, -1])
        return np.stack(out)

    released = LfmSession(bundle, threads=1)
    monkeypatch.setattr("lfm_edge.runtime.backends.python.release_clean_pages", lambda files: 0)
    kept = LfmSession(bundle, threads=1)
    assert kept.released_bytes == 0
    np.testing.assert_array_equal(run(released), run(kept))
