"""The command-line tools restart once with glibc's huge-page tunable (runtime/hugepages.py)."""

import os
import subprocess
import sys

import pytest

from lfm_edge.runtime import hugepages

SCRIPT = ("import os, sys; from lfm_edge.runtime.hugepages import reexec_with_hugepages; reexec_with_hugepages(); "
          "print(os.environ.get('GLIBC_TUNABLES', ''), '|', ' '.join(sys.argv[1:]))")


def run(env_extra: dict) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "LFM_EDGE_HUGEPAGES")} | env_extra
    out = subprocess.run([sys.executable, "-c", SCRIPT, "a b", "--flag"], env=env, capture_output=True, text=True,
                         check=True, timeout=60)
    return out.stdout.strip()


@pytest.mark.skipif(not hugepages.wanted(), reason="needs Linux, glibc and transparent huge pages not 'never'")
@pytest.mark.slow
def test_restarts_once_with_the_tunable_and_the_same_arguments():
    tunables, _, args = run({}).partition(" | ")
    assert tunables == hugepages.TUNABLE
    assert args == "a b --flag"
    # other tunables are kept
    tunables, _, _ = run({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}).partition(" | ")
    assert tunables == f"glibc.malloc.arena_max=2:{hugepages.TUNABLE}"


def test_opt_out_and_an_explicit_setting_are_respected():
    assert run({"LFM_EDGE_HUGEPAGES": "0"}) == "| a b --flag"
    assert run({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}).startswith("glibc.malloc.hugetlb=0 |")


def test_bench_records_the_page_setting():
    from lfm_edge.device_bench.measure import device_info

    info = device_info(1)
    assert info["transparent_hugepages"] in ("always", "madvise", "never", "unavailable")
    assert info["malloc_hugepages"] is hugepages.malloc_hugepages()
