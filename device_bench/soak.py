"""Soak: one loaded model under many threads and many generations.

    python -m lfm_edge.device_bench.soak BUNDLE [--threads 8 --per-thread 50 --generations 1000]

Checks that concurrent generations give exactly the serial results and that resident memory stays flat
over many generations (bounded growth after a warm-up); prints a JSON summary, exits 1 on a failure.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ..runtime.generate import generate
from ..runtime.session import LfmSession


def rss_mb() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def soak(bundle: Path, threads: int = 8, per_thread: int = 50, generations: int = 1000, new_tokens: int = 8,
         warmup: int = 20, seed: int = 0) -> dict:
    session = LfmSession(bundle, threads=1)
    rng = np.random.default_rng(seed)
    vocab = min(session.vocab_size, 2000)
    prompts = [rng.integers(20, vocab, rng.integers(3, 24)).tolist() for _ in range(threads * per_thread)]

    start = time.perf_counter()
    serial = [generate(session, [p], new_tokens, eos_token_ids=[])[0] for p in prompts]
    with ThreadPoolExecutor(max_workers=threads) as pool:
        parallel = list(pool.map(lambda p: generate(session, [p], new_tokens, eos_token_ids=[])[0], prompts))
    mismatches = sum(a != b for a, b in zip(serial, parallel, strict=True))

    samples = []
    for i in range(generations):
        generate(session, [prompts[i % len(prompts)]], new_tokens, eos_token_ids=[])
        if i + 1 == warmup or (i + 1) % max(1, generations // 10) == 0:
            samples.append((i + 1, round(rss_mb(), 1)))
    after_warmup = next(mb for n, mb in samples if n >= warmup)
    growth = samples[-1][1] - after_warmup
    return {"threads": threads, "concurrent_generations": len(prompts), "mismatches": mismatches,
            "generations": generations, "rss_mb": samples, "growth_after_warmup_mb": round(growth, 1),
            "seconds": round(time.perf_counter() - start, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="soak", description=__doc__)
    parser.add_argument("bundle")
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--per-thread", type=int, default=50)
    parser.add_argument("--generations", type=int, default=1000)
    parser.add_argument("--max-growth-mb", type=float, default=50.0)
    args = parser.parse_args(argv)
    result = soak(Path(args.bundle), args.threads, args.per_thread, args.generations)
    print(json.dumps(result, indent=2))
    return 0 if result["mismatches"] == 0 and result["growth_after_warmup_mb"] <= args.max_growth_mb else 1


if __name__ == "__main__":
    sys.exit(main())
