"""Where a loaded bundle's memory goes, stage by stage: resident memory (anonymous and file-backed) before import,
after importing onnxruntime, during and after the load, after a prefill and a few decode steps, and after the
C heap hands freed pages back (malloc_trim), each against the weights' size.

    python -m lfm_edge.device_bench.studies.load_memory BUNDLE [--prefill 512] [--out DIR]

The prompt is prefilled as the runtime prefills it (runtime.Generation: chunks of `--prefill-chunk` tokens,
shorter deep in the context so attention's transient tensors stay within its budget), so `--prefill 32768`
measures the peak a 32K-token prompt costs a user, not one 32K-wide step (which would need tens of GB).

Writes load_memory.json and load_memory.md in DIR (default build/load-memory). Run it in a fresh process: what
the process held before counts against the bundle.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

from ...runtime.generate import Generation
from ...runtime.memory import PeakMemory, release_free_heap, resident_mb
from . import parser, write_result

MIB = 1 << 20


def measure(bundle: Path, prefill: int = 512, decode: int = 8, threads: int = 2, prefill_chunk: int = 512) -> dict:
    weights = sum(p.stat().st_size for p in bundle.iterdir() if p.name.startswith("model.onnx")) / MIB
    stages = [("before import", resident_mb(), None)]
    from ...runtime.backends.python import LfmSession  # onnxruntime: its import is a stage of its own

    stages.append(("onnxruntime imported", resident_mb(), None))
    started = time.perf_counter()
    with PeakMemory() as peak:
        session = LfmSession(bundle, threads=threads, verify="none")
    load_s = time.perf_counter() - started
    stages.append(("after load", resident_mb(), peak.peaks()))
    cache = session.new_cache(1, prefill + decode + 1)
    rng = np.random.default_rng(0)
    high = min(session.vocab_size, 30000)
    prompt = rng.integers(100, high, prefill).tolist()
    chunks = []
    started = time.perf_counter()
    with PeakMemory() as peak:
        for _ in Generation(session, [prompt], 0, cache=cache, prefill_chunk=prefill_chunk,
                            on_prefill=lambda c: chunks.append(c.length)):
            pass
    prefill_s = time.perf_counter() - started
    stages.append((f"after a {prefill}-token prefill", resident_mb(), peak.peaks()))
    for token in rng.integers(100, high, decode):
        cache.step(np.array([[token]]))
    stages.append((f"after {decode} decode steps", resident_mb(), None))
    trimmed = release_free_heap()
    stages.append(("after malloc_trim" if trimmed else "after malloc_trim (not available)", resident_mb(), None))
    return {"bundle": str(bundle), "weights_mib": weights, "load_s": load_s, "threads": threads,
            "prefill": {"tokens": prefill, "chunk": prefill_chunk, "chunks": len(chunks), "seconds": prefill_s},
            "stages": [{"stage": name, **{k: round(v, 1) for k, v in now.items()},
                        "peaks": {k: round(v, 1) for k, v in peaks.items()} if peaks else None}
                       for name, now, peaks in stages]}


def markdown(result: dict) -> str:
    w = result["weights_mib"]
    lines = [f"# Memory by stage: {result['bundle']}", "",
             f"Weights (model.onnx*): {w:,.0f} MiB; load {result['load_s']:.1f} s, {result['threads']} threads.", ""]
    pre = result.get("prefill")
    if pre:
        lines += [f"Prefill: {pre['tokens']:,} tokens in {pre['chunks']} chunks (at most {pre['chunk']}, "
                  f"runtime.Generation), {pre['seconds']:.1f} s.", ""]
    lines += ["| stage | anonymous MiB | file-backed MiB | anonymous - weights | RSS - weights | "
              "peak RSS during it (- weights) | peak anonymous / file during it |",
              "|---|---|---|---|---|---|---|"]
    for s in result["stages"]:
        peaks = f"{s['peaks'].get('anonymous', 0):,.0f} / {s['peaks'].get('file', 0):,.0f}" if s["peaks"] else ""
        rss = s.get("rss", s["anonymous"] + s["file"])
        peak_rss = f"{s['peaks']['rss']:,.0f} ({s['peaks']['rss'] - w:+,.0f})" if s["peaks"] and "rss" in s["peaks"] \
            else ""
        lines.append(f"| {s['stage']} | {s['anonymous']:,.0f} | {s['file']:,.0f} | {s['anonymous'] - w:+,.0f} | "
                     f"{rss - w:+,.0f} | {peak_rss} | {peaks} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = parser(__file__, __doc__)
    p.add_argument("bundle")
    p.add_argument("--prefill", type=int, default=512)
    p.add_argument("--prefill-chunk", type=int, default=512, help="the runtime's prefill chunk (Generation)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="build/load-memory")
    args = p.parse_args(argv)
    result = measure(Path(args.bundle), args.prefill, threads=args.threads, prefill_chunk=args.prefill_chunk)
    write_result(args.out, "load_memory", result, markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
