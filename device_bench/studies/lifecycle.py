"""On a phone's terms: what trim_memory releases per level, what autosave's checkpoints cost in decode speed,
and how fast an answer killed mid-way continues at the next start.

    python -m lfm_edge.device_bench.studies.lifecycle BUNDLE [--runs 7 --tokens 256 --every 32,1 --threads 1]
    python -m lfm_edge.device_bench.studies.lifecycle BUNDLE --resume 4000 [--every 32 --kill-after 100]

Trim: one conversation answers twice (with the prefix cache, snapshots and a KV buffer grown past its rows),
then each level is applied in turn; the bytes each releases, what was held beyond the weights and the live
state, and the anonymous resident memory before and after. Autosave: answers of `--tokens` tokens (the prompt
is the same each time) without autosave and with a checkpoint every N tokens, interleaved, `--runs` times;
the median decode tok/s of each, its ratio to none, and the median time of one checkpoint. Resume (`--resume N`,
instead of both): a child process answers a user message that brings the conversation to about N tokens, with
autosave every `--every` tokens, and is SIGKILLed after `--kill-after` streamed pieces of the answer; a second
child then starts as an app would: imports, loads the model, loads the conversation and continues the partial
answer, timing each stage up to its first new token, and counts the answer's tokens the kill lost. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
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


def _killed_answer(bundle: str, path: Path, context: int, every: int, kill_after: int, threads: int) -> None:
    """Child 1: a conversation of about `context` tokens, its answer autosaved; prints a line per streamed piece
    (the parent kills it)."""
    model = LfmModel(bundle, threads=threads)
    words = " ".join(f"item {i} is" for i in range(context))
    ids = model.tokenizer.encode(words).ids[:max(context - kill_after - 40, 16)]  # template, question, answer so far
    conv = model.conversation(system=SYSTEM)
    conv.autosave(path, every_tokens=every, every_seconds=1e9)
    print("prefill", flush=True)
    pieces = 0
    # filler up to the length, then a question a small model answers at length
    for _ in conv.send(model.tokenizer.decode(ids) + "\n\nTell me about lists.", max_new_tokens=2 * kill_after + 64):
        pieces += 1
        print(f"piece {pieces} {time.time():.3f}", flush=True)


def _resumed(bundle: str, path: Path, threads: int, started: float) -> None:
    """Child 2: the next start; prints the stages' times (from `started`, when the parent launched it) as JSON."""
    marks = {"python started": time.time() - started}
    model = LfmModel(bundle, threads=threads)
    marks["model loaded"] = time.time() - started
    conv = model.load_conversation(path)
    marks["conversation loaded"] = time.time() - started
    partial = conv.partial or {}
    kept = len(conv.tokens) - partial.get("prompt_length", len(conv.tokens)) + (1 if partial else 0)
    for _ in conv.continue_answer():
        marks["first new token"] = time.time() - started
        break
    print(json.dumps({"marks": marks, "context_tokens": len(conv.tokens), "answer_tokens_kept": kept}), flush=True)


def resume(bundle: str, context: int, every: int, kill_after: int, threads: int) -> dict[str, Any]:
    """A kill mid-answer, then the next start's time to the first new token of that answer (see the docstring)."""
    me = [sys.executable, "-m", __spec__.name if __spec__ else "lfm_edge.device_bench.studies.lifecycle", bundle,
          "--threads", str(threads)]
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "chat.safetensors"
        child = subprocess.Popen([*me, "--child-killed", str(path), "--resume", str(context), "--every", str(every),
                                  "--kill-after", str(kill_after)], stdout=subprocess.PIPE, text=True)
        assert child.stdout is not None
        started, pieces = time.time(), 0
        for line in child.stdout:
            if line.startswith("prefill"):
                started = time.time()
            elif line.startswith("piece"):
                pieces = int(line.split()[1])
                if pieces >= kill_after:
                    break
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        if pieces < kill_after:
            raise RuntimeError(f"the answer ended after {pieces} pieces, before --kill-after {kill_after}")
        launched = time.time()
        done = subprocess.run([*me, "--child-resumed", str(path), "--launched", f"{launched:.6f}"],
                              capture_output=True, text=True, check=True)
        result = json.loads(done.stdout.strip().splitlines()[-1])
    marks = result["marks"]
    return {"context_tokens": result["context_tokens"], "every_tokens": every, "killed_after_pieces": pieces,
            "answer_tokens_kept": result["answer_tokens_kept"],
            "pieces_lost_at_most": max(pieces - result["answer_tokens_kept"], 0),
            "first_run_prefill_and_answer_s": round(time.time() - started, 1),
            "marks_s": {k: round(v, 3) for k, v in marks.items()},
            "restore_to_first_token_s": round(marks["first new token"] - marks["model loaded"], 3)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lifecycle", description=__doc__)
    parser.add_argument("bundle")
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--every", default="32,1", help="checkpoint intervals in tokens, comma-separated")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--resume", type=int, default=0, metavar="N", help="the resume workload at N tokens")
    parser.add_argument("--kill-after", type=int, default=100, help="resume: streamed pieces before the kill")
    parser.add_argument("--child-killed", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--child-resumed", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--launched", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child_killed:
        _killed_answer(args.bundle, args.child_killed, args.resume, int(args.every.split(",")[0]), args.kill_after,
                       args.threads)
        return 0
    if args.child_resumed:
        _resumed(args.bundle, args.child_resumed, args.threads, args.launched)
        return 0
    if args.resume:
        result = resume(args.bundle, args.resume, int(args.every.split(",")[0]), args.kill_after, args.threads)
        print(json.dumps({"bundle": str(args.bundle), "threads": args.threads, "resume": result}, indent=1))
        return 0
    model = LfmModel(args.bundle, threads=args.threads)
    result = {"bundle": str(args.bundle), "threads": args.threads, "trim": trim(model, min(args.tokens, 64)),
              "autosave": checkpoint_cost(model, args.runs, args.tokens, [int(n) for n in args.every.split(",")])}
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
