"""Choosing the next token from logits: greedy, or seeded sampling with temperature, top-k, top-p, min-p,
and a repetition penalty, with the semantics of transformers' logits processors."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0 means greedy
    top_k: int = 0  # 0 means no limit
    top_p: float = 1.0
    min_p: float = 0.0  # keep tokens with probability >= min_p * the best one's
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the context
    seed: int | None = None

    def __post_init__(self):
        checks = [
            (self.temperature >= 0, "temperature", "expected >= 0 (0 is greedy)"),
            (self.top_k >= 0, "top_k", "expected >= 0 (0 is no limit)"),
            (0 < self.top_p <= 1, "top_p", "expected 0 < top_p <= 1"),
            (0 <= self.min_p < 1, "min_p", "expected 0 <= min_p < 1"),
            (self.repetition_penalty > 0, "repetition_penalty", "expected > 0 (1 is none)"),
        ]
        for ok, name, expected in checks:
            if not ok or (isinstance(getattr(self, name), float) and not np.isfinite(getattr(self, name))):
                raise ValueError(f"{name} {getattr(self, name)!r}: {expected}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @classmethod
    def from_generation_config(cls, config: dict[str, Any], **overrides: Any) -> Sampling:
        """Defaults from a checkpoint's generation_config.json (do_sample false means greedy)."""
        known = {f.name for f in fields(cls)}
        values = {k: config[k] for k in known if config.get(k) is not None}
        if not config.get("do_sample", False):
            values["temperature"] = 0.0
        values.update({k: v for k, v in overrides.items() if v is not None})
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown sampling parameter(s): {sorted(unknown)}")
        return cls(**values)


def next_tokens(logits: np.ndarray, sampling: Sampling, rng: np.random.Generator,
                history: np.ndarray | None = None, allowed: Sequence[np.ndarray | None] | None = None) -> np.ndarray:
    """logits [B, V] -> token ids [B]; `history` [B, T] (the context so far) feeds the repetition penalty;
    `allowed` (per row: a bool mask over the vocabulary, or None) is applied first, greedy and sampled alike
    (runtime/constrain.py)."""
    logits = logits.astype(np.float64)
    for row, mask in zip(logits, allowed or (), strict=False):
        if mask is not None:
            row[:len(mask)][~mask] = -np.inf
            row[len(mask):] = -np.inf
    if sampling.repetition_penalty != 1.0 and history is not None and history.size:
        for row, seen in zip(logits, history, strict=True):
            ids = np.unique(seen[seen >= 0])
            picked = row[ids]
            row[ids] = np.where(picked > 0, picked / sampling.repetition_penalty, picked * sampling.repetition_penalty)
    if sampling.greedy:
        return logits.argmax(-1)
    logits = logits / sampling.temperature
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
    if sampling.min_p > 0:
        probs = np.where(probs < sampling.min_p * probs.max(-1, keepdims=True), 0.0, probs)
    probs /= probs.sum(-1, keepdims=True)
    return np.array([rng.choice(len(p), p=p) for p in probs])
