"""Prefill with logits for every prompt row against the last row only, on one bundle, in alternating turns.

The graph's optional `logits_to_keep` input decides how many rows reach the final norm and the LM head (0: all,
as onnxruntime-genai runs it; 1: what a generation needs). Each round prefills the same random prompt both ways,
the order alternating, on one session; every sample records its CPU wait and /proc/loadavg, and the speed-up is
the median of per-round ratios. `python -m lfm_edge.device_bench.studies.prefill_rows BUNDLE [--prompts 128 512]`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np

from ...runtime.backends.python import LfmSession
from ...runtime.files import write_text
from ..measure import timed


def _loadavg() -> str:
    try:
        return Path("/proc/loadavg").read_text().strip()
    except OSError:
        return ""


def alternate(bundle: Path, prompts: tuple[int, ...] = (128, 512), rounds: int = 6, threads: int = 2,
              seed: int = 0, progress=lambda m: None) -> dict:

    session = LfmSession(bundle, threads=threads, verify="none")
    if not session.logits_to_keep:
        raise ValueError(f"{bundle}: the graph has no logits_to_keep input (exported before it existed?)")
    rng = np.random.default_rng(seed)
    high = min(session.vocab_size, 30000)
    rows: dict[int, list[dict]] = {p: [] for p in prompts}
    for r in range(rounds + 1):
        for p in prompts:
            ids = rng.integers(min(100, high // 2), high, (1, p))
            sample = {}
            for last in ((None, 1) if r % 2 else (1, None)):
                cache = session.new_cache(1, p)
                before = _loadavg()
                wall, wait, _ = timed(lambda c=cache, x=ids, n=last: c.step(x, last=n), threads)
                sample["last_row" if last else "all_rows"] = {"tok_s": p / wall, "wall": wall, "cpu_wait": wait,
                                                              "loadavg_before": before, "loadavg_after": _loadavg()}
            progress(f"round {r}/{rounds}{' (warm-up)' if r == 0 else ''} prefill {p}: all rows "
                     f"{sample['all_rows']['tok_s']:.1f}, last row {sample['last_row']['tok_s']:.1f} tok/s "
                     f"(load {sample['last_row']['loadavg_after'].split()[0]})")
            if r:
                rows[p].append(sample)
    summary = {}
    for p, samples in rows.items():
        summary[p] = {"all_rows_tok_s": statistics.median(s["all_rows"]["tok_s"] for s in samples),
                      "last_row_tok_s": statistics.median(s["last_row"]["tok_s"] for s in samples),
                      "speedup_per_round": statistics.median(s["last_row"]["tok_s"] / s["all_rows"]["tok_s"]
                                                             for s in samples),
                      "max_cpu_wait": max(max(s["all_rows"]["cpu_wait"], s["last_row"]["cpu_wait"])
                                          for s in samples)}
    return {"bundle": str(bundle), "threads": threads, "rounds": rounds, "prompts": list(prompts),
            "summary": summary, "samples": rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lfm_edge.device_bench.studies.prefill_rows", description=__doc__)
    parser.add_argument("bundle")
    parser.add_argument("--prompts", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="build/bench/prefill_rows.json")
    args = parser.parse_args(argv)
    result = alternate(Path(args.bundle), tuple(args.prompts), args.rounds, args.threads,
                       progress=lambda m: print(f"  {m}", file=sys.stderr, flush=True))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_text(args.out, json.dumps(result, indent=2))
    for p, s in result["summary"].items():
        print(f"prefill {p}: all rows {s['all_rows_tok_s']:.1f} tok/s, last row {s['last_row_tok_s']:.1f} tok/s, "
              f"x{s['speedup_per_round']:.3f} (median of per-round ratios; max CPU wait {s['max_cpu_wait']:.1%})")
    print(f"Wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
