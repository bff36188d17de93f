"""Ours and llama.cpp loaded side by side in one process and measured in turns.

On a shared machine the speed of memory moves with other tenants' traffic, which a process does not see as
CPU wait: two systems measured minutes apart can differ by 20% for that alone. Here every round measures
both, in alternating order, on the same prompt and the same decoded token ids (random ids, so routing varies
as in real text; neither side samples, both compute full logits every step), and the ratio is taken per
round. `python -m lfm_edge.device_bench.ab BUNDLE GGUF [--rounds N]` prints and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np

from .bench import timed


def alternate(bundle: Path, gguf: Path, threads: int = 2, prompt: int = 512, decode: int = 128,
              rounds: int = 8, seed: int = 0, progress=lambda m: None) -> dict:
    import llama_cpp

    from ..runtime.session import LfmSession

    session = LfmSession(bundle, threads=threads, verify="none")
    llm = llama_cpp.Llama(model_path=str(gguf), n_threads=threads, n_threads_batch=threads,
                          n_ctx=prompt + decode + 16, n_batch=prompt, n_ubatch=prompt, verbose=False)
    rng = np.random.default_rng(seed)
    high = min(session.vocab_size, llm.n_vocab(), 30000)

    def ours(ids: list[int], steps: list[int]) -> tuple[float, float]:
        cache = session.new_cache(1, len(ids) + len(steps))
        pre = timed(lambda: cache.step(np.array([ids])), threads)[0]
        dec = timed(lambda: [cache.step(np.array([[t]])) for t in steps], threads)[0]
        return len(ids) / pre, len(steps) / dec

    def theirs(ids: list[int], steps: list[int]) -> tuple[float, float]:
        llm.reset()
        pre = timed(lambda: llm.eval(ids), threads)[0]
        dec = timed(lambda: [llm.eval([t]) for t in steps], threads)[0]
        return len(ids) / pre, len(steps) / dec

    rows = []
    for r in range(rounds + 1):
        ids = rng.integers(min(100, high // 2), high, prompt).tolist()
        steps = rng.integers(min(100, high // 2), high, decode).tolist()
        first, second = (ours, theirs) if r % 2 else (theirs, ours)
        a, b = first(ids, steps), second(ids, steps)
        o, t = (a, b) if first is ours else (b, a)
        progress(f"round {r}/{rounds}{' (warm-up)' if r == 0 else ''}: decode ours {o[1]:.1f} llama.cpp {t[1]:.1f} "
                 f"tok/s; prefill {o[0]:.0f} / {t[0]:.0f}")
        if r:
            rows.append({"ours_prefill": o[0], "ours_decode": o[1], "llama_prefill": t[0], "llama_decode": t[1]})
    med = {k: statistics.median(row[k] for row in rows) for k in rows[0]}
    return {"bundle": str(bundle), "gguf": str(gguf), "threads": threads, "prompt": prompt, "decode": decode,
            "rounds": rows, "median": med,
            "decode_ratio_per_round": statistics.median(r["ours_decode"] / r["llama_decode"] for r in rows),
            "prefill_ratio_per_round": statistics.median(r["ours_prefill"] / r["llama_prefill"] for r in rows)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lfm_edge.device_bench.ab", description=__doc__)
    parser.add_argument("bundle")
    parser.add_argument("gguf")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--decode", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--out", default="build/bench/ab.json")
    args = parser.parse_args(argv)
    if argv is None:
        from ..runtime.hugepages import reexec_with_hugepages

        reexec_with_hugepages()
    result = alternate(Path(args.bundle), Path(args.gguf), args.threads, args.prompt, args.decode, args.rounds,
                       progress=lambda m: print(f"  {m}", file=sys.stderr, flush=True))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    m = result["median"]
    print(f"decode: ours {m['ours_decode']:.1f}, llama.cpp {m['llama_decode']:.1f} tok/s, ours/theirs per round "
          f"{result['decode_ratio_per_round']:.2f}x; prefill {args.prompt}: ours {m['ours_prefill']:.0f}, llama.cpp "
          f"{m['llama_prefill']:.0f} tok/s, {result['prefill_ratio_per_round']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
