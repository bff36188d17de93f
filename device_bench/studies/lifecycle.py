"""On a phone's terms: what trim_memory releases per level, and what autosave's checkpoints cost in decode speed.

    python -m lfm_edge.device_bench.studies.lifecycle BUNDLE [--runs 7 --tokens 256 --every 32,1 --threads 1]

Trim: one conversation answers twice (with the prefix cache, snapshots and a KV buffer grown past its rows),
then each level is applied in turn; the bytes each releases, what was held beyond the weights and the live
state, and the anonymous resident memory before and after. Autosave: answers of `--tokens` tokens (the prompt
is the same each time) without autosave and with a checkpoint every N tokens, interleaved, `--runs` times;
the median decode tok/s of each, its ratio to none, and the median time of one checkpoint. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from ...runtime import LfmModel, TrimLevel
from ...runtime.memory import resident_mb

SYSTEM = "You are a helpful assistant who answers in one sentence."


def trim(model: LfmModel, tokens: int) -> dict[str, Any]:
    conv = model.conversation(system=SYSTEM)
    for question in ("What is a list?", "And a tuple?"):
        conv.say(question, max_new_tokens=tokens)
    held = model.prefix_cache.nbytes + conv.trimmable_bytes
    before = resident_mb()["anonymous"]
    freed = {level.name.lower(): model.trim_memory(level) for level in TrimLevel}
    return {"held_beyond_weights_and_live_state": held, "freed": freed,
            "share_freed": round(sum(freed.values()) / held, 4) if held else None,
            "anonymous_mb_before": round(before, 1), "anonymous_mb_after": round(resident_mb()["anonymous"], 1)}


def checkpoint_cost(model: LfmModel, runs: int, tokens: int, intervals: list[int]) -> dict[str, Any]:
    speeds: dict[str, list[float]] = {"none": [], **{f"every {n}": [] for n in intervals}}
    spent: dict[str, list[float]] = {name: [] for name in speeds}
    with tempfile.TemporaryDirectory() as folder:
        for run in range(runs):
            for every in [0, *intervals]:
                name = f"every {every}" if every else "none"
                conv = model.conversation(system=SYSTEM)
                if every:
                    conv.autosave(Path(folder) / f"{run}-{every}.safetensors", every_tokens=every, every_seconds=1e9)
                    writer, times = conv._journal, spent[name]
                    checkpoint = writer.checkpoint

                    def timed(*args: Any, _checkpoint=checkpoint, _times=times, **kwargs: Any) -> None:
                        start = time.perf_counter()
                        _checkpoint(*args, **kwargs)
                        if args[2] is not None:  # an answer's checkpoint (not its start or end)
                            _times.append(time.perf_counter() - start)
                    writer.checkpoint = timed
                done = conv.say("What is a list?", max_new_tokens=tokens)
                speeds[name].append(done.stats.decode_tokens_per_second)
    none = statistics.median(speeds["none"])
    return {name: {"median_tok_s": round(statistics.median(s), 2),
                   "ratio": round(statistics.median(s) / none, 3), "runs": [round(x, 1) for x in s],
                   "checkpoint_ms_median": round(statistics.median(spent[name]) * 1e3, 3) if spent[name] else None,
                   "checkpoints": len(spent[name])} for name, s in speeds.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lifecycle", description=__doc__)
    parser.add_argument("bundle")
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--every", default="32,1", help="checkpoint intervals in tokens, comma-separated")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    model = LfmModel(args.bundle, threads=args.threads)
    result = {"bundle": str(args.bundle), "threads": args.threads, "trim": trim(model, min(args.tokens, 64)),
              "autosave": checkpoint_cost(model, args.runs, args.tokens, [int(n) for n in args.every.split(",")])}
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
