"""The generation loop, in two pieces: `prefill` feeds the prompt in chunks and returns the last logits;
`decode` samples a token, feeds it back, and repeats. A `Generation` runs both over any backend's Session."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .backend import Cache, Session
from .kernels import prefill_bytes_per_pair
from .memory import peak_rss_mb
from .sampling import Sampling, next_tokens

PREFILL_BUDGET = 256 << 20  # bytes a prefill chunk may hold in transient attention tensors (Generation)


@dataclass
class GenerationStats:
    prompt_tokens: int = 0  # per row, padding excluded, summed over the batch
    reused_tokens: int = 0  # prompt tokens whose state was already there (a conversation's kept state)
    state_tokens: int = 0  # tokens in the state when the generation ended
    generated_tokens: int = 0
    time_to_first_token: float = 0.0  # seconds from the call to the first sampled token
    prefill_tokens_per_second: float = 0.0
    decode_tokens_per_second: float = 0.0  # steps after the first token, per row
    peak_rss_mb: float = 0.0
    provider: str = ""
    stopped: str = ""  # "eos", "length", "cancelled" or "stop" (set by a caller's stop condition)
    thinking_tokens: int = 0  # reasoning tokens, when the caller controls reasoning (reasoning_budget)
    reasoning_forced: str = ""  # "budget" or "repetition": why </think> was forced, if it was
    constraint_satisfied: bool | None = None  # with a response_format: whether the answer completed its grammar
    mask_seconds: list[float] = field(default_factory=list, repr=False)  # per constrained step
    timings: dict[str, float] = field(default_factory=dict, repr=False)

    @property
    def prefilled_tokens(self) -> int:
        """Prompt tokens computed by this generation."""
        return self.prompt_tokens - self.reused_tokens


class Generation:
    """An iterable generation: each step yields every row's new token (None once a row has finished).
    `stats` is complete when iteration ends; `cancel` (a threading.Event) stops it from another thread.
    `overflow` is the caller's policy when prompt + max_new_tokens exceed the context: "error" (default)
    refuses before running; "truncate" drops the oldest prompt tokens until they fit.

    `cache` continues a state that already holds the first `cache.length` tokens of the (single) prompt: only
    the rest is prefilled, and the cache keeps every token fed to it (the last sampled token is not fed);
    with `max_new_tokens=0` it only prefills.
    Prefill chunks end at multiples of `prefill_chunk` and at each position in `cuts`; `on_prefill(cache)`
    runs after each chunk (a conversation snapshots its conv state there); `on_decode(cache)` after each token is
    sampled, before it is yielded and fed (new_tokens holds it; a conversation checkpoints there).
    `constraints`: per row, an object with mask() and advance(token) (runtime/constrain.py), or None.

    `prefill_budget` bounds what a prefill chunk costs in memory deep in a long context: graphs with attention
    build their causal + padding bias as [B, 1, chunk, depth] tensors, about 32 bytes per (position, depth)
    pair measured on the contrib graph (a 16K-deep 6-layer LFM2.5 prefill peaked 257 MB above the loaded
    model with 512-token chunks, 22 MB with 64); a session with the unfused attention kernel also holds 4
    bytes per query head and pair (kernels.py). Chunks halve as the depth grows (down to 16 tokens) so that
    chunk x depth x those bytes stays within the budget."""

    def __init__(self, model: Session, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                 sampling: Sampling | None = None, eos_token_ids: Sequence[int] | None = None,
                 prefill_chunk: int = 512, cancel: threading.Event | None = None, overflow: str = "error",
                 cache: Cache | None = None, cuts: Iterable[int] = (),
                 on_prefill: Callable[[Cache], None] | None = None, constraints: Sequence[Any] | None = None,
                 prefill_budget: int = PREFILL_BUDGET, on_decode: Callable[[Cache], None] | None = None):
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("prompts: expected at least one prompt, each with at least one token")
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens {max_new_tokens}: expected >= 0")
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk {prefill_chunk}: expected >= 1")
        if overflow not in ("error", "truncate"):
            raise ValueError(f"overflow {overflow!r}: expected 'error' or 'truncate'")
        if cache is not None and (len(prompts) != 1 or overflow != "error" or cache.length >= len(prompts[0])):
            raise ValueError("a cache continues one prompt that extends its state by at least one token "
                             f"(overflow='error'); got {len(prompts)} prompts, the state holds {cache.length}")
        if max_new_tokens >= model.context_length:
            raise ValueError(f"max_new_tokens {max_new_tokens} leaves no room in the context length "
                             f"{model.context_length}")
        width = max(len(p) for p in prompts)
        if width + max_new_tokens > model.context_length:
            if overflow == "error":
                raise ValueError(f"prompt ({width} tokens) + max_new_tokens ({max_new_tokens}) exceed the model's "
                                 f"context length {model.context_length} (overflow='truncate' keeps the newest)")
            keep = model.context_length - max_new_tokens
            prompts = [list(p)[-keep:] for p in prompts]
        vocab = model.vocab_size
        bad = [t for p in prompts for t in p if not 0 <= int(t) < vocab]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary [0, {vocab})")
        self.model, self.prompts, self.max_new_tokens = model, prompts, max_new_tokens
        self.sampling = sampling or Sampling()
        self.eos = set(model.eos_token_ids if eos_token_ids is None else eos_token_ids)
        self.prefill_chunk = prefill_chunk
        self.cancel = cancel or threading.Event()
        self.cache, self.cuts, self.on_prefill, self.on_decode = cache, sorted(set(cuts)), on_prefill, on_decode
        self.prefill_budget = prefill_budget
        self.new_tokens: list[list[int]] = [[] for _ in prompts]  # each row's sampled tokens, as they come
        if constraints is not None and len(constraints) != len(prompts):
            raise ValueError(f"constraints: {len(constraints)} for {len(prompts)} prompts")
        self.constraints = list(constraints) if constraints is not None and any(constraints) else None
        self.stats = GenerationStats(prompt_tokens=sum(len(p) for p in prompts),
                                     reused_tokens=cache.length if cache is not None else 0,
                                     provider=model.provider)

    def __iter__(self) -> Iterator[list[int | None]]:
        start = time.perf_counter()
        stats = self.stats
        cache = self.cache
        if cache is None:
            cache = self.model.new_cache(len(self.prompts), max(len(p) for p in self.prompts) + self.max_new_tokens)
        else:
            cache.reserve(max(len(p) for p in self.prompts) + self.max_new_tokens)
        try:
            if self.max_new_tokens == 0 and self.cache is None:
                stats.stopped = "length"
                return
            logits = self.prefill(cache)
            prefill_end = time.perf_counter()
            stats.prefill_tokens_per_second = stats.prefilled_tokens / max(prefill_end - start, 1e-9)
            if logits is None:  # cancelled, or a cache's prefill only (a conversation preparing its next turn)
                stats.stopped = stats.stopped or "length"
                return
            yield from self.decode(cache, logits, start)
        finally:
            stats.stopped = stats.stopped or "stop"
            stats.state_tokens = cache.length
            stats.peak_rss_mb = peak_rss_mb()
            stats.timings["total"] = time.perf_counter() - start

    def _inputs(self) -> tuple[np.ndarray, np.ndarray]:
        """The prompts left-padded into one [B, width] batch, and its mask (0 on padding)."""
        width = max(len(p) for p in self.prompts)
        ids = np.full((len(self.prompts), width), self.model.pad_token_id, dtype=np.int64)
        mask = np.zeros_like(ids)
        for r, p in enumerate(self.prompts):
            ids[r, width - len(p):] = p
            mask[r, width - len(p):] = 1
        return ids, mask

    def prefill(self, cache: Cache) -> np.ndarray | None:
        """Feed the prompts past what `cache` holds, in chunks (prefill_ranges); the last row's logits [B, 1, V],
        or None when cancelled or when no token is to be generated."""
        ids, mask = self._inputs()
        batch, width = ids.shape
        chunk = self.prefill_chunk
        if self.model.share_buffer and batch > 1:
            # GroupQueryAttention (onnxruntime <= 1.31, and genai's mobile builds) takes several new tokens
            # after a cache only for batch 1; a batch is prefilled in one pass.
            chunk = width
        per_pair = prefill_bytes_per_pair(self.model.attention_kernel, self.model.num_heads, batch) \
            if self.model.state.kv else 0
        logits = None
        for s, e in prefill_ranges(cache.length, width, chunk, self.cuts, per_pair, self.prefill_budget):
            if self.cancel.is_set():
                self.stats.stopped = "cancelled"
                return None
            logits = cache.step(ids[:, s:e], mask[:, s:e], last=1)  # only the last row is sampled
            if self.on_prefill:
                self.on_prefill(cache)
        return logits if self.max_new_tokens else None

    def decode(self, cache: Cache, logits: np.ndarray, start: float) -> Iterator[list[int | None]]:
        """Sample, yield, feed back, until every row ends (EOS), max_new_tokens, or `cancel`."""
        stats = self.stats
        rng = np.random.default_rng(self.sampling.seed)
        ids, mask = self._inputs()
        history = np.where(mask == 1, ids, -1)  # context for the repetition penalty
        done = np.zeros(len(self.prompts), dtype=bool)
        for n in range(self.max_new_tokens):
            allowed = None
            if self.constraints:
                mask_start = time.perf_counter()
                allowed = [c.mask() if c is not None and not d else None
                           for c, d in zip(self.constraints, done, strict=True)]
                if any(a is not None for a in allowed):
                    stats.mask_seconds.append(time.perf_counter() - mask_start)
            tokens = next_tokens(logits[:, -1], self.sampling, rng, history, allowed)
            for c, t, d in zip(self.constraints or (), tokens, done, strict=False):
                if c is not None and not d:
                    c.advance(int(t))
            if n == 0:
                stats.time_to_first_token = time.perf_counter() - start
                decode_start = time.perf_counter()
            stats.generated_tokens += int((~done).sum())
            for row, (t, d) in enumerate(zip(tokens, done, strict=True)):
                if not d:
                    self.new_tokens[row].append(int(t))
            if self.on_decode:
                self.on_decode(cache)
            yield [None if d else int(t) for t, d in zip(tokens, done, strict=True)]
            done |= np.isin(tokens, list(self.eos))
            if done.all():
                stats.stopped = "eos"
                return
            if self.cancel.is_set():
                stats.stopped = "cancelled"
                return
            if n == self.max_new_tokens - 1:
                stats.stopped = "length"
                return
            if self.sampling.repetition_penalty != 1.0:
                history = np.concatenate([history, tokens[:, None]], axis=1)
            logits = cache.step(tokens[:, None], last=1)
            stats.decode_tokens_per_second = (n + 1) / max(time.perf_counter() - decode_start, 1e-9)


def prefill_ranges(start: int, end: int, size: int, cuts: Sequence[int], bytes_per_pair: int = 0,
            budget: int = 0) -> Iterator[tuple[int, int]]:
    """[s, e) prefill ranges from start to end: at most `size` long, ending at multiples of the chunk length
    (so a continued prefill cuts where a fresh one would) and at every cut inside the range. With
    `bytes_per_pair`, a chunk ending at depth T costs bytes_per_pair x chunk x T: the chunk length halves
    until that fits `budget` (down to 16)."""
    cuts = sorted(c for c in cuts if start < c < end)
    s = start
    while s < end:
        length = size
        while bytes_per_pair and length > 16 and bytes_per_pair * length * (s + length) > budget:
            length //= 2
        e = min(end, (s // length + 1) * length, *(c for c in cuts if c > s))
        yield s, e
        s = e


def generate(model: Session, prompts: Sequence[Sequence[int]], max_new_tokens: int,
             sampling: Sampling | None = None, eos_token_ids: Sequence[int] | None = None,
             prefill_chunk: int = 512) -> list[list[int]]:
    """New tokens for each prompt (a batch is left-padded); a row stops at its first EOS, kept in its output."""
    rows: list[list[int]] = [[] for _ in prompts]
    for step in Generation(model, prompts, max_new_tokens, sampling, eos_token_ids, prefill_chunk):
        for row, token in zip(rows, step, strict=True):
            if token is not None:
                row.append(token)
    return rows


def stream(model: Session, prompts: Sequence[Sequence[int]], max_new_tokens: int,
           sampling: Sampling | None = None, eos_token_ids: Sequence[int] | None = None,
           prefill_chunk: int = 512) -> Iterator[list[int | None]]:
    """Yields one list per step: each row's new token, or None once that row has finished."""
    return iter(Generation(model, prompts, max_new_tokens, sampling, eos_token_ids, prefill_chunk))
