"""The generation loop: prefill (in chunks), then one token at a time with the state fed back."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from .sampling import Sampling, next_tokens
from .session import Cache, LfmSession


def generate(model: LfmSession, prompts: Sequence[Sequence[int]], max_new_tokens: int,
             sampling: Sampling | None = None, eos_token_ids: Sequence[int] | None = None,
             prefill_chunk: int = 512) -> list[list[int]]:
    """New tokens for each prompt (a batch is left-padded); a row stops at its first EOS, kept in its output."""
    rows: list[list[int]] = [[] for _ in prompts]
    for step in stream(model, prompts, max_new_tokens, sampling, eos_token_ids, prefill_chunk):
        for row, token in zip(rows, step, strict=True):
            if token is not None:
                row.append(token)
    return rows


def stream(model: LfmSession, prompts: Sequence[Sequence[int]], max_new_tokens: int,
           sampling: Sampling | None = None, eos_token_ids: Sequence[int] | None = None,
           prefill_chunk: int = 512) -> Iterator[list[int | None]]:
    """Yields one list per step: each row's new token, or None once that row has finished."""
    sampling = sampling or Sampling()
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("prompts: expected at least one prompt, each with at least one token")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens {max_new_tokens}: expected >= 0")
    eos = set(model.eos_token_ids if eos_token_ids is None else eos_token_ids)
    width = max(len(p) for p in prompts)
    if width + max_new_tokens > model.context_length:
        raise ValueError(f"prompt ({width} tokens) + max_new_tokens ({max_new_tokens}) exceed the model's "
                         f"context length {model.context_length}")
    ids = np.full((len(prompts), width), model.pad_token_id, dtype=np.int64)
    mask = np.zeros_like(ids)
    for r, p in enumerate(prompts):
        ids[r, width - len(p):] = p
        mask[r, width - len(p):] = 1
    cache = Cache(model, len(prompts), width + max_new_tokens)
    rng = np.random.default_rng(sampling.seed)
    if model.share_buffer and len(prompts) > 1:
        # GroupQueryAttention (onnxruntime <= 1.31, and genai's mobile builds) takes several new tokens
        # after a cache only for batch 1; a batch is prefilled in one pass.
        prefill_chunk = width
    for start in range(0, width, prefill_chunk):
        logits = cache.step(ids[:, start:start + prefill_chunk], mask[:, start:start + prefill_chunk])
    done = np.zeros(len(prompts), dtype=bool)
    for n in range(max_new_tokens):
        tokens = next_tokens(logits[:, -1], sampling, rng)
        yield [None if d else int(t) for t, d in zip(tokens, done, strict=True)]
        done |= np.isin(tokens, list(eos))
        if done.all() or n == max_new_tokens - 1:
            return
        logits = cache.step(tokens[:, None])
