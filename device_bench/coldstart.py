"""Cold start, A/B: loads of one bundle with the prepack cache off and mapped, alternated, each in a fresh process;
with `--llama GGUF` also llama.cpp's load of the same weights (llama-cpp-python, the optional [llama] extra).

    lfm-bench coldstart BUNDLE [--rounds 6] [--decode 64] [--threads 2] [--llama GGUF] [--no-cache]

Each load is a new process (a session loaded twice in one process would find its pages, allocator and page
tables warm), in the order off/use, then use/off, and so on, so that drift in the host's load hits both sides.
Per load: seconds to a ready LfmSession, anonymous and file-backed resident memory right after the load and
after decoding `--decode` tokens (runtime/generate.py resident_mb), decode tok/s and the load average before.
A missing cache is written first (prepack_cache="auto", not timed). Prints one JSON line per load, then the
medians and the median of the per-round load and decode ratios (mapped / off).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

from ..runtime.hugepages import reexec_with_hugepages

CHILD = """
import json, os, sys, time
import numpy as np
from lfm_edge.runtime.memory import resident_mb
from lfm_edge.runtime.backends.python import LfmSession
bundle, mode, threads, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
loadavg = os.getloadavg()[0]
t = time.perf_counter()
session = LfmSession(bundle, threads=threads, prepack_cache=mode, verify="none")
load = time.perf_counter() - t
after = resident_mb()
rng = np.random.default_rng(0)
cache = session.new_cache(1, 17 + n)
cache.step(rng.integers(100, 30000, (1, 16)))
ids = rng.integers(100, 30000, (1, n))
t = time.perf_counter()
for i in range(n):
    cache.step(ids[:, i:i + 1])
tps = n / (time.perf_counter() - t)
now = resident_mb()
print(json.dumps({"mode": mode, "state": session.prepack.state, "load_s": load, "decode_tps": tps,
                  "anon_after_load": after["anonymous"], "file_after_load": after["file"],
                  "anon_decoding": now["anonymous"], "file_decoding": now["file"], "loadavg": loadavg}))
"""
LLAMA_CHILD = """
import json, os, sys, time
import llama_cpp
from lfm_edge.runtime.memory import resident_mb
gguf, threads, n = sys.argv[1], int(sys.argv[3]), int(sys.argv[4])
loadavg = os.getloadavg()[0]
t = time.perf_counter()
llm = llama_cpp.Llama(model_path=gguf, n_threads=threads, n_threads_batch=threads, n_ctx=17 + n + 8, verbose=False)
load = time.perf_counter() - t
after = resident_mb()
llm.eval(list(range(100, 116)))
t = time.perf_counter()
for i in range(n):
    llm.eval([200 + i])
tps = n / (time.perf_counter() - t)
now = resident_mb()
print(json.dumps({"mode": "llama", "state": "llama.cpp", "load_s": load, "decode_tps": tps,
                  "anon_after_load": after["anonymous"], "file_after_load": after["file"],
                  "anon_decoding": now["anonymous"], "file_decoding": now["file"], "loadavg": loadavg}))
"""
KEYS = ("load_s", "decode_tps", "anon_after_load", "file_after_load", "anon_decoding", "file_decoding", "loadavg")


def load_once(bundle: str, mode: str, threads: int, decode: int) -> dict:
    """One load in a fresh process: the bundle with the prepack cache `mode`, or (mode "llama") a GGUF."""
    out = subprocess.run([sys.executable, "-c", LLAMA_CHILD if mode == "llama" else CHILD, bundle, mode, str(threads),
                          str(decode)], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{mode} load failed: {out.stderr.strip()[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    if argv is None:  # as the command-line tools do: the repacked weights in huge pages (runtime/hugepages.py)
        reexec_with_hugepages()
    parser = argparse.ArgumentParser(prog="lfm-bench coldstart", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--decode", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--llama", metavar="GGUF", help="also load this GGUF with llama.cpp in each round")
    parser.add_argument("--no-cache", action="store_true", help="loads without the prepack cache only (it takes "
                        "~2.1x the bundle on disk)")
    args = parser.parse_args(argv)
    if not args.no_cache:
        first = load_once(args.bundle, "auto", args.threads, 1)  # writes the cache if it is missing
        if first["state"] not in ("written", "mapped"):
            print(f"lfm-bench coldstart: error: no prepack cache for {args.bundle} ({first['state']})",
                  file=sys.stderr)
            return 2
    modes = ("off",) + (() if args.no_cache else ("use",)) + (("llama",) if args.llama else ())
    rows = []
    for r in range(args.rounds):
        pair = []
        for mode in modes if r % 2 == 0 else modes[::-1]:
            row = load_once(args.llama if mode == "llama" else args.bundle, mode, args.threads, args.decode)
            pair.append(row)
            print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
        rows.append({p["mode"]: p for p in pair})
    summary = {mode: {k: statistics.median(r[mode][k] for r in rows) for k in KEYS} for mode in modes}
    for key in ("load_s", "decode_tps"):
        if not args.no_cache:
            summary[f"{key}_ratio_use_over_off"] = statistics.median(r["use"][key] / r["off"][key] for r in rows)
        if args.llama:
            summary[f"{key}_ratio_off_over_llama"] = statistics.median(r["off"][key] / r["llama"][key] for r in rows)
    summary["rounds"] = args.rounds
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
