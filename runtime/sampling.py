"""Choosing the next token from logits: greedy, or seeded sampling with temperature, top-k and top-p."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0 means greedy
    top_k: int = 0  # 0 means no limit
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature {self.temperature}: expected >= 0 (0 is greedy)")
        if self.top_k < 0:
            raise ValueError(f"top_k {self.top_k}: expected >= 0 (0 is no limit)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p {self.top_p}: expected 0 < top_p <= 1")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def next_tokens(logits: np.ndarray, sampling: Sampling, rng: np.random.Generator) -> np.ndarray:
    """logits [B, V] -> token ids [B]."""
    if sampling.greedy:
        return logits.argmax(-1)
    logits = logits.astype(np.float64) / sampling.temperature
    if sampling.top_k:
        kth = np.sort(logits, axis=-1)[:, -min(sampling.top_k, logits.shape[-1])][:, None]
        logits = np.where(logits < kth, -np.inf, logits)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    if sampling.top_p < 1:
        order = np.argsort(-probs, axis=-1)
        sorted_probs = np.take_along_axis(probs, order, -1)
        # keep the smallest prefix whose mass reaches top_p (always at least the best token)
        drop = np.cumsum(sorted_probs, -1) - sorted_probs >= sampling.top_p
        np.put_along_axis(probs, order, np.where(drop, 0.0, sorted_probs), -1)
        probs /= probs.sum(-1, keepdims=True)
    return np.array([rng.choice(len(p), p=p) for p in probs])
