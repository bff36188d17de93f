"""The test tiers: `make test` runs everything (what CI runs); `make test-fast` (`pytest -m "not slow"`) runs, for
the edit loop, the tests not marked slow and, of each parametrized test, its first case only (the other cases
are the same check over more configurations). Tests marked `llama` run llama.cpp beside us (the optional [llama]
extra): slow, and skipped where llama-cpp-python is not installed."""

from __future__ import annotations

import importlib.util
import os
import tempfile
from pathlib import Path

import pytest

from lfm_edge.runtime.backends import release_thread
from lfm_edge.runtime.threads import CACHE_ENV


def pytest_configure(config: pytest.Config) -> None:
    # threads="auto", the command lines' default, remembers what it measured per device and bundle: for this run
    # (and the command lines it starts) in a file of its own, never in the user's cache
    os.environ[CACHE_ENV] = str(Path(tempfile.mkdtemp(prefix="lfm-edge-threads-")) / "threads.json")
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # one of pytest-xdist's workers, a core each: torch's pool (a thread per core by default, in this process
        # and the exports it starts) would run two threads per core (test_quant + test_export_exact: 110 s with
        # it, 57 s without; 63 s serially). Set before any test module imports torch.
        os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True)
def _detached_from_the_jvm():
    """Each test leaves its thread detached from the JVM the Java backend's tests start (pyjnius), as an app's
    worker thread does before it ends (backends.release_thread()). Left attached, pytest's main thread kept the
    JVM's stack guard, and native code a later test file ran on it (numpy's LAPACK in test_quant, in the same
    pytest-xdist worker) died in SIGSEGV at a stack address: about one run in two with two workers, none in
    seven runs with this."""
    yield
    release_thread()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    seen: set[tuple[str, str]] = set()
    no_llama = importlib.util.find_spec("llama_cpp") is None
    for item in items:
        if item.get_closest_marker("llama"):
            item.add_marker(pytest.mark.slow)
            if no_llama:
                item.add_marker(pytest.mark.skip(reason="llama-cpp-python is the optional [llama] extra"))
        if getattr(item, "callspec", None) is None:
            continue
        key = (item.nodeid.split("::")[0], item.originalname)
        if key in seen:
            item.add_marker(pytest.mark.slow)
        seen.add(key)
