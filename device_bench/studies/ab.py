"""Ours and llama.cpp loaded side by side in one process and measured in turns.

On a shared machine the speed of memory moves with other tenants' traffic, which a process does not see as
CPU wait: two systems measured minutes apart can differ by 20% for that alone. Here every round measures
both, in alternating order, on the same prompt and the same decoded token ids (random ids, so routing varies
as in real text; neither side samples), and the ratio is taken per round. Both compute the logits a generation
needs: the prompt's last row (llama.cpp's `eval` without `logits_all`; ours through `logits_to_keep`, as
runtime.Generation asks), then one row per decoded token.
`python -m lfm_edge.device_bench.studies.ab BUNDLE GGUF [--rounds N]` prints and writes JSON.

`python -m lfm_edge.device_bench.studies.ab FILE.gguf` compares llama.cpp with a bundle exported from that very file
(`lfm-export FILE.gguf`: its Q4_0 blocks as they are), so both run the same weights, not two quantizations of
one checkpoint; the JSON says which (`same_weights`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ...export.exporter import export
from ...export.options import ExportError
from ...export.provenance import file_sha256
from ...runtime.backends.python import LfmSession
from ...runtime.files import write_text
from ...runtime.hugepages import reexec_with_hugepages
from ..measure import timed


class CopyBandwidth:
    """GB/s that `threads` threads copying `mb` MB each reach now (read + write): this host's memory speed at the
    moment, which moves with other tenants' traffic. Decode is memory-bound, so each round records it beside the
    tok/s (device_bench/results/notes/2026-11-30-block-256.md: our decode follows it more closely than llama.cpp's).
    The buffers
    are allocated and touched once: a first touch would time this VM's page faults instead. The best of `tries`
    copies: single copies of this size still dip at random (a thread started late, an interrupt)."""

    def __init__(self, threads: int = 2, mb: int = 128, tries: int = 3):
        self.tries = tries
        self.src = [np.ones(mb << 18, np.float32) for _ in range(threads)]
        self.dst = [a.copy() for a in self.src]

    def __call__(self) -> float:
        return max(self._once() for _ in range(self.tries))

    def _once(self) -> float:
        import threading

        workers = [threading.Thread(target=np.copyto, args=(d, a)) for d, a in zip(self.dst, self.src, strict=True)]
        start = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        return 2 * len(self.src) * self.src[0].nbytes / (time.perf_counter() - start) / 1e9


class LlamaBench:
    """llama.cpp's own `llama-bench` binary as the peer of a round, for a machine without llama-cpp-python (it
    compiles llama.cpp): one run per round, `-p PROMPT -n DECODE -r 1`, its prompt and generation tok/s. Its
    generation decodes from an empty context while ours decodes after the prompt (a few percent against us at
    512 tokens); the model is mapped again each run, which its timings exclude."""

    def __init__(self, binary: str, gguf: Path, threads: int):
        # its own warm-up run first: the model is mapped anew each run, and a first pass would time page faults
        self.command = [binary, "-m", str(gguf), "-t", str(threads), "-r", "1", "-o", "json"]

    def __call__(self, ids: list[int], steps: list[int]) -> tuple[float, float]:
        out = subprocess.run(self.command + ["-p", str(len(ids)), "-n", str(len(steps))], check=True,
                             capture_output=True, text=True).stdout
        tests = json.loads(out)
        speed = {("prompt" if t["n_prompt"] else "decode"): float(t["avg_ts"]) for t in tests}
        return speed["prompt"], speed["decode"]


def alternate(bundle: Path, gguf: Path, threads: int = 2, prompt: int = 512, decode: int = 128,
              rounds: int = 8, seed: int = 0, progress=lambda m: None, warmup_s: float = 0.0,
              llama_bench: str | None = None) -> dict:
    """`warmup_s`: both sides decode in turns for this long before round 0 (see main's --warmup);
    `llama_bench`: a llama-bench binary as the peer instead of llama-cpp-python (LlamaBench)."""
    session = LfmSession(bundle, threads=threads, verify="none")
    rng = np.random.default_rng(seed)
    copy_bandwidth = CopyBandwidth(threads)
    if llama_bench:
        bench = LlamaBench(llama_bench, gguf, threads)
        high = min(session.vocab_size, 30000)
    else:
        import llama_cpp

        llm = llama_cpp.Llama(model_path=str(gguf), n_threads=threads, n_threads_batch=threads,
                              n_ctx=prompt + decode + 16, n_batch=prompt, n_ubatch=prompt, verbose=False)
        high = min(session.vocab_size, llm.n_vocab(), 30000)

    ours = our_run(session, threads)

    def theirs(ids: list[int], steps: list[int]) -> tuple[float, float]:
        if llama_bench:
            return bench(ids, steps)
        llm.reset()
        pre = timed(lambda: llm.eval(ids), threads)[0]
        dec = timed(lambda: [llm.eval([t]) for t in steps], threads)[0]
        return len(ids) / pre, len(steps) / dec

    if warmup_s > 0:
        start, turns = time.perf_counter(), 0
        while time.perf_counter() - start < warmup_s:
            steps = rng.integers(min(100, high // 2), high, decode).tolist()
            ours(steps[:8], steps)
            theirs(steps[:8], steps)
            turns += 1
        progress(f"warm-up: {turns} turns of {decode} decoded tokens each side in {warmup_s:.0f} s")
    rows, med = alternated_rounds(ours, theirs, "llama", "llama.cpp", rounds, prompt, decode, rng,
                                  min(100, high // 2), high, copy_bandwidth, progress)
    manifest = json.loads((Path(bundle) / "manifest.json").read_text())
    return {"bundle": str(bundle), "gguf": str(gguf), "same_weights": exported_from(bundle, Path(gguf)),
            "gguf_layout": manifest.get("gguf_layout"), "bytes_per_token": manifest["bytes_per_token"]["total"],
            "peer": "llama-bench" if llama_bench else "llama-cpp-python", "threads": threads, "prompt": prompt,
            "decode": decode, "rounds": rows, "median": med,
            **ratios_per_round(rows, "llama")}


Run = Callable[[list[int], list[int]], tuple[float, float]]  # (prompt ids, decode ids) -> (prefill, decode) tok/s


def our_run(session: LfmSession, threads: int) -> Run:
    """One turn of ours: the prompt's prefill (its last row's logits) then one step per decoded id, on a fresh
    cache, as tok/s."""
    def run(ids: list[int], steps: list[int]) -> tuple[float, float]:
        cache = session.new_cache(1, len(ids) + len(steps))
        pre = timed(lambda: cache.step(np.array([ids]), last=1), threads)[0]
        dec = timed(lambda: [cache.step(np.array([[t]])) for t in steps], threads)[0]
        return len(ids) / pre, len(steps) / dec

    return run


def ratios_per_round(rows: list[dict], key: str) -> dict[str, float]:
    """Medians over rounds of ours over the peer's (`key`: its prefix in the rows), decode and prefill."""
    return {f"{kind}_ratio_per_round": statistics.median(r[f"ours_{kind}"] / r[f"{key}_{kind}"] for r in rows)
            for kind in ("decode", "prefill")}


def alternated_rounds(ours: Run, theirs: Run, key: str, label: str, rounds: int, prompt: int, decode: int,
                      rng: np.random.Generator, low: int, high: int, bandwidth: Callable[[], float],
                      progress: Callable[[str], None]) -> tuple[list[dict], dict]:
    """Round 0 (a warm-up) and `rounds` measured rounds, each on fresh ids for both sides, the order swapped every
    round and the host's copy bandwidth taken before it: the rows (`ours_*`, `{key}_*`, `copy_gbs`) and their
    medians. Ratios are taken per round by the caller. Each row also holds the load average (1, 5, 15 min) as the
    round began: on a shared machine a ratio means little without it."""
    rows = []
    for r in range(rounds + 1):
        ids = rng.integers(low, high, prompt).tolist()
        steps = rng.integers(low, high, decode).tolist()
        first, second = (ours, theirs) if r % 2 else (theirs, ours)
        copy_gbs = bandwidth()
        load = [round(x, 2) for x in os.getloadavg()]
        a, b = first(ids, steps), second(ids, steps)
        o, t = (a, b) if first is ours else (b, a)
        progress(f"round {r}/{rounds}{' (warm-up)' if r == 0 else ''}: decode ours {o[1]:.1f} {label} {t[1]:.1f} "
                 f"tok/s; prefill {o[0]:.0f} / {t[0]:.0f}; memory copy {copy_gbs:.1f} GB/s; load {load[0]:.2f}")
        if r:
            rows.append({"ours_prefill": o[0], "ours_decode": o[1], f"{key}_prefill": t[0], f"{key}_decode": t[1],
                         "copy_gbs": copy_gbs, "loadavg": load})
    return rows, {k: statistics.median(row[k] for row in rows) for k in rows[0] if k != "loadavg"}


def exported_from(bundle: Path, gguf: Path) -> bool:
    """Whether the bundle's manifest names this very GGUF file (by name and sha256, export/provenance.py)."""

    try:
        source = json.loads((Path(bundle) / "manifest.json").read_text())["source"]
        recorded = source["gguf_sha256"][Path(gguf).name]
    except (OSError, KeyError, ValueError, TypeError):
        return False
    return recorded == file_sha256(Path(gguf))


def bundle_for(gguf: Path, folder: Path, quant: str = "int4", tokenizer: str | None = None) -> Path:
    """The bundle of `gguf` in `folder`, exported unless one from this very file is there already (`tokenizer`:
    a tokenizer.json or its folder, for a GGUF that carries none)."""
    if (folder / "model.onnx").is_file() and exported_from(folder, gguf):
        return folder
    return export(gguf, folder, quant=quant, tokenizer=tokenizer).bundle


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lfm_edge.device_bench.studies.ab", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", help="our bundle, or a .gguf to export and compare with itself")
    parser.add_argument("gguf", nargs="?", help="llama.cpp's file (omit when the first argument is one)")
    parser.add_argument("--bundle-dir", default=None, help="where a GGUF's bundle is exported (default: beside --out)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--decode", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--warmup", type=float, default=0.0, metavar="SECONDS",
                        help="both sides decode in turns this long before round 0 (on this VM it did not narrow "
                        "our decode's round-to-round spread, the 2026-11-30 notes)")
    parser.add_argument("--tokenizer", default=None, metavar="PATH",
                        help="a GGUF without a token list: the tokenizer.json (or its folder) its bundle gets")
    parser.add_argument("--llama-bench", default=None, metavar="BINARY",
                        help="llama.cpp's llama-bench as the peer, one run per round (without llama-cpp-python)")
    parser.add_argument("--out", default="build/bench/ab.json")
    args = parser.parse_args(argv)
    if args.gguf is None:
        if not args.bundle.lower().endswith(".gguf"):
            parser.error("give BUNDLE GGUF, or one .gguf to compare with a bundle exported from it")
        args.gguf = args.bundle
        folder = Path(args.bundle_dir or Path(args.out).parent / (Path(args.gguf).stem + "-bundle"))
        try:
            args.bundle = str(bundle_for(Path(args.gguf), folder, tokenizer=args.tokenizer))
        except (ExportError, ValueError, OSError) as e:  # e.g. no token list: the message names --tokenizer
            print(f"ab: error: {e}", file=sys.stderr)
            return 2
    if argv is None:
        reexec_with_hugepages()
    result = alternate(Path(args.bundle), Path(args.gguf), args.threads, args.prompt, args.decode, args.rounds,
                       progress=lambda m: print(f"  {m}", file=sys.stderr, flush=True), warmup_s=args.warmup,
                       llama_bench=args.llama_bench)
    result["warmup_s"] = args.warmup
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_text(args.out, json.dumps(result, indent=2))
    m = result["median"]
    print(f"decode: ours {m['ours_decode']:.1f}, llama.cpp {m['llama_decode']:.1f} tok/s, ours/theirs per round "
          f"{result['decode_ratio_per_round']:.2f}x; prefill {args.prompt}: ours {m['ours_prefill']:.0f}, llama.cpp "
          f"{m['llama_prefill']:.0f} tok/s, {result['prefill_ratio_per_round']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
