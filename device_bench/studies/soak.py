"""Soak: one loaded model under many threads and many generations.

    python -m lfm_edge.device_bench.studies.soak BUNDLE [--threads 8 --per-thread 50 --generations 1000]

Checks that concurrent generations give exactly the serial results and that resident memory stays flat
over many generations (bounded growth after a warm-up); then the same for conversations that keep their
state (`--conversations`: many multi-turn conversations over one model, from many threads, saved and
loaded midway). Prints a JSON summary, exits 1 on a failure.
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

from ...runtime import LfmModel
from ...runtime.backends.python import LfmSession
from ...runtime.generate import generate


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


def soak_conversations(bundle: Path, threads: int = 4, conversations: int = 40, turns: int = 4,
                       new_tokens: int = 6, seed: int = 0, save_to: Path | None = None) -> dict:
    """Multi-turn conversations (state kept, an edit midway, saved and reloaded when `save_to` is a folder)
    over one LfmModel from `threads` threads: identical to serial runs, resident memory flat."""

    model = LfmModel(bundle, threads=1)
    rng = np.random.default_rng(seed)
    words = ["list", "tuple", "set", "dict", "loop", "class", "file", "string", "number", "module", "error"]
    scripts = [[f"What is a {w}?" for w in rng.choice(words, turns)] for _ in range(conversations)]

    def talk(n: int) -> list[list[int]]:
        conv = model.conversation(system="You answer briefly." if n % 2 else None, snapshot_every=8)
        said = []
        for t, question in enumerate(scripts[n]):
            said.append(conv.say(question, max_new_tokens=new_tokens).tokens)
            if t == turns // 2:
                conv.messages[-1]["content"] = conv.messages[-1]["content"][:4]  # an edited answer: rollback
                if save_to is not None:
                    conv.save(save_to / f"conv{n}.safetensors")
                    conv = model.load_conversation(save_to / f"conv{n}.safetensors")
        return said

    start = time.perf_counter()
    serial = [talk(n) for n in range(conversations)]
    with ThreadPoolExecutor(max_workers=threads) as pool:
        parallel = list(pool.map(talk, range(conversations)))
    samples = []
    for n in range(conversations):
        talk(n)
        samples.append(round(rss_mb(), 1))
    warm = samples[min(len(samples) - 1, 4)]
    return {"threads": threads, "conversations": conversations, "turns": turns,
            "mismatches": sum(a != b for a, b in zip(serial, parallel, strict=True)),
            "rss_mb": samples[::max(1, len(samples) // 10)], "growth_after_warmup_mb": round(samples[-1] - warm, 1),
            "seconds": round(time.perf_counter() - start, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="soak", description=__doc__)
    parser.add_argument("bundle")
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--per-thread", type=int, default=50)
    parser.add_argument("--generations", type=int, default=1000)
    parser.add_argument("--max-growth-mb", type=float, default=50.0)
    parser.add_argument("--conversations", type=int, default=0, help="also soak this many multi-turn "
                        "conversations (the bundle needs its tokenizer and chat template)")
    args = parser.parse_args(argv)
    results = [soak(Path(args.bundle), args.threads, args.per_thread, args.generations)]
    if args.conversations:
        import tempfile

        with tempfile.TemporaryDirectory() as folder:
            results.append(soak_conversations(Path(args.bundle), args.threads, args.conversations,
                                              save_to=Path(folder)))
    print(json.dumps(results, indent=2))
    return 0 if all(r["mismatches"] == 0 and r["growth_after_warmup_mb"] <= args.max_growth_mb
                    for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
