"""What constrained decoding costs per token, against a decode step of the same bundle in the same run.

    python -m lfm_edge.device_bench.studies.constrained BUNDLE [--tokenizer tokenizer.json] [--runs 3]

Greedy answers of `--tokens` tokens to one prompt, alternately free and held to a JSON schema (and to the
tool-call grammar), `--runs` times: the mask's median / p99 / mean per token (llguidance's computation and
its conversion to a boolean mask), the time to apply a mask to the logits, and the decode step's median, so
the share of a step is read from one run on one machine. `--tokenizer` measures the masks with another
tokenizer.json of the bundle's vocabulary size (a random-weights bundle carries a stand-in vocabulary whose
filler tokens make masks cheaper than a real one's); a tokenizer_config.json beside it comes along.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ...runtime import LfmModel
from ...runtime.sampling import Sampling, next_tokens
from ..common import link_view

SCHEMA = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 40}, "days": {"type": "integer", "minimum": 1, "maximum": 14},
    "notes": {"type": "array", "items": {"type": "string", "maxLength": 30}, "maxItems": 4}},
    "required": ["city", "days", "notes"], "additionalProperties": False}
MESSAGES = [{"role": "user", "content": "Plan the weather watch for Paris as JSON."}]


def measure(bundle: Path, tokens: int = 48, runs: int = 3, threads: int | None = None,
            tokenizer: Path | None = None) -> dict:

    folder = Path(bundle)
    with tempfile.TemporaryDirectory() as tmp:
        if tokenizer is not None:  # the same bundle, masks built from another vocabulary of its size
            folder = link_view(Path(bundle), Path(tmp) / "bundle")
            for name in ("tokenizer.json", "tokenizer_config.json"):  # a random bundle may have neither
                source = tokenizer if name == "tokenizer.json" else tokenizer.parent / name
                if source.is_file():
                    (folder / name).unlink(missing_ok=True)
                    shutil.copyfile(source, folder / name)
        model = LfmModel(folder, threads=threads, verify="size")
        start = time.perf_counter()
        vocab = model.constraints.vocabulary
        build_s = time.perf_counter() - start
        greedy = Sampling()
        masks, free_steps, held_steps = [], [], []
        for _ in range(runs):
            free = model.chat(MESSAGES, sampling=greedy, max_new_tokens=tokens)
            held = model.chat(MESSAGES, sampling=greedy, max_new_tokens=tokens, response_format=SCHEMA)
            free_steps.append(1 / free.stats.decode_tokens_per_second)
            held_steps.append(1 / held.stats.decode_tokens_per_second)
            masks += held.stats.mask_seconds
    logits = np.random.default_rng(0).standard_normal((1, vocab.size)).astype(np.float32)
    allowed = np.random.default_rng(1).random(vocab.size) < 0.3
    rng = np.random.default_rng(0)
    apply = []
    for _ in range(20):
        s = time.perf_counter()
        next_tokens(logits, greedy, rng, None, [allowed])
        masked = time.perf_counter() - s
        s = time.perf_counter()
        next_tokens(logits, greedy, rng)
        apply.append(max(0.0, masked - (time.perf_counter() - s)))
    step = statistics.median(free_steps)
    per_token = statistics.mean(masks) + statistics.median(apply)
    return {"bundle": str(bundle), "tokenizer": str(tokenizer) if tokenizer else "the bundle's", "vocab": vocab.size,
            "vocabulary_build_s": round(build_s, 3), "masked_steps": len(masks),
            "mask_median_us": round(statistics.median(masks) * 1e6, 1),
            "mask_p99_us": round(float(np.percentile(masks, 99)) * 1e6, 1),
            "mask_mean_us": round(statistics.mean(masks) * 1e6, 1),
            "apply_median_us": round(statistics.median(apply) * 1e6, 1),
            "decode_step_ms": round(step * 1e3, 3),
            "decode_step_held_ms": round(statistics.median(held_steps) * 1e3, 3),
            "mask_share_of_step": round(per_token / step, 4), "loadavg": Path("/proc/loadavg").read_text().split()[:3]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lfm_edge.device_bench.studies.constrained", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle")
    parser.add_argument("--tokenizer", type=Path, default=None)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    print(json.dumps(measure(Path(args.bundle), args.tokens, args.runs, args.threads, args.tokenizer), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
