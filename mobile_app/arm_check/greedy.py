"""Greedy-decode an lfm-edge bundle with plain onnxruntime; print JSON {prompt: [token ids]}.

Standalone on purpose (numpy + onnxruntime + tokenizers only, no lfm_edge) so the very same
file runs on x86 and inside the arm64 chroot, and any difference comes from ORT's kernels.

    python greedy.py BUNDLE [--model model.onnx] [--steps 32] [--margins] [PROMPT ...]

--margins adds, per step, the gap between the best and second-best logit, which tells whether
a token that differs across machines was a near tie.
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

PROMPTS = ["The list", "A class", "If the"]
# Every element type a bundle's inputs can have: fp32/fp16 conv state and KV, int8 KV (--kv-cache int8, the
# phone default), uint8 KV (int4, two values a byte), int64 ids and mask.
NP_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int8)": np.int8,
            "tensor(uint8)": np.uint8, "tensor(int64)": np.int64, "tensor(int32)": np.int32}


def zero_state(session: ort.InferenceSession, maxlen: int) -> dict[str, np.ndarray]:
    """Zeros for every cache input: conv [1, H, K-1] as declared, KV [1, kv_heads, maxlen, head_dim]."""
    state = {}
    for inp in session.get_inputs():
        if inp.name in ("input_ids", "attention_mask"):
            continue
        if inp.type not in NP_TYPES:
            raise SystemExit(f"greedy.py: input {inp.name} has element type {inp.type}, which has no numpy type here")
        dims = [1] + [d if isinstance(d, int) else maxlen for d in inp.shape[1:]]
        state[inp.name] = np.zeros(dims, dtype=NP_TYPES[inp.type])
    return state


def greedy(session: ort.InferenceSession, ids: list[int], steps: int) -> tuple[list[int], list[float]]:
    # GroupQueryAttention shares one buffer of max length between past and present.
    state = zero_state(session, len(ids) + steps)
    outputs = [o.name for o in session.get_outputs()]
    feed_ids, total, tokens, margins = list(ids), len(ids), [], []
    for _ in range(steps):
        feeds = {
            "input_ids": np.array([feed_ids], dtype=np.int64),
            "attention_mask": np.ones((1, total), dtype=np.int64),
            **state,
        }
        results = dict(zip(outputs, session.run(outputs, feeds), strict=True))
        last = results["logits"][0, -1].astype(np.float64)
        top2 = np.argsort(last)[-2:]
        tokens.append(int(top2[1]))
        margins.append(float(last[top2[1]] - last[top2[0]]))
        # present.{i}.conv -> past.{i}.conv, present.{i}.key -> past_key_values.{i}.key
        for name in state:
            layer, kind = name.split(".")[-2:]
            state[name] = results[f"present.{layer}.{kind}"]
        feed_ids, total = [tokens[-1]], total + 1
    return tokens, margins


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("prompts", nargs="*", default=PROMPTS)
    parser.add_argument("--model", default="model.onnx", help="file in the bundle (model.onnx or model.ort)")
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--margins", action="store_true", help="also print the top-1 minus top-2 logit per step")
    args = parser.parse_args()

    tokenizer = Tokenizer.from_file(str(args.bundle / "tokenizer.json"))
    session = ort.InferenceSession(str(args.bundle / args.model), providers=["CPUExecutionProvider"])
    out = {}
    for prompt in args.prompts:
        tokens, margins = greedy(session, tokenizer.encode(prompt).ids, args.steps)
        out[prompt] = {"tokens": tokens, "margins": [round(m, 5) for m in margins]} if args.margins else tokens
    json.dump(out, sys.stdout)
    print()


if __name__ == "__main__":
    main()
