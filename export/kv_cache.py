"""KV cache precision, an export choice: `--kv-cache fp32|int8|int4`.

With int8 (or int4, two values a byte) GroupQueryAttention stores keys and values quantized, symmetric, with one
scale per (KV head, channel); the scales are constants of the graph (`model.layers.{i}.self_attn.k_cache_scale`,
`.v_cache_scale`, shape [1, Hkv, 1, D]), not state, so the state a runtime carries is just the int8 tensors.

How the scales are chosen (measured in quant/README.md, "KV cache precision"): the model runs once over
calibration text (the torch reference, streaming its weights one tensor at a time, so this costs one forward
pass and no more memory than the largest tensor) and records, per KV head and channel,
- values: the largest |v|;
- keys: the largest norm of each rotary pair (k_i, k_{i+D/2}) before rotary. Rotary turns that pair by a
  position-dependent angle, so neither channel can exceed the pair's norm at any position, including positions
  the calibration never reached; both channels of a pair share that bound.
The scale is that maximum times `margin`, over 127 (int8) or 7 (int4); values beyond it saturate. A channel's
bound is at least FLOOR x the largest of its head, so a channel the calibration left quiet is not zeroed.
Calibration text that the tokenizer cannot read (fewer than MIN_DISTINCT distinct tokens) would give such
quiet channels everywhere: the default text then falls back to random ids, an explicit one is an error.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

KV_CACHES = ("fp32", "int8", "int4")
BITS = {"fp32": None, "int8": 8, "int4": 4}
QMAX = {8: 127, 4: 7}
DEFAULT_MARGIN = 1.25
CALIBRATION_TOKENS = 1024
FLOOR = 0.05
MIN_DISTINCT = 64
RANDOM_CALIBRATION_TOKENS = 128


@dataclass(frozen=True)
class KvCache:
    name: str  # one of KV_CACHES
    bits: int | None
    scales: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # layer -> k, v [Hkv, D]
    margin: float = DEFAULT_MARGIN
    calibration: dict = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        """manifest.json's `kv_cache` entry."""
        if not self.bits:
            return {"dtype": "float32", "bits": 32}
        return {"dtype": "int8" if self.bits == 8 else "uint8 (two int4 a byte)", "bits": self.bits,
                "quant_type": "PER_CHANNEL", "symmetric": True,
                "scales": "graph constants model.layers.{i}.self_attn.{k,v}_cache_scale [1, Hkv, 1, D]",
                "scale_rule": "max over calibration of |v|, and of the rotary-pair norm of k before rotary, "
                              f"x margin {self.margin} / {QMAX[self.bits]}",
                "margin": self.margin, "calibration": self.calibration}


def check_name(name: str) -> None:
    if name not in KV_CACHES:
        raise ValueError(f"--kv-cache {name!r}: expected one of {KV_CACHES}")


def default_calibration_text() -> tuple[str, str]:
    """Python's own documentation topics (pydoc_data, in every CPython), without every 20th topic by sorted
    key: the demo model's held-out text (demo_model/train.py), so calibration never sees evaluation text."""
    from pydoc_data.topics import topics

    keys = [k for i, k in enumerate(sorted(topics)) if i % 20 != 0]
    return "\n\n".join(topics[k] for k in keys), "pydoc_data.topics without every 20th topic (held out)"


def calibration_ids(ckpt, text: str | None = None, tokens: int | None = None) -> tuple[list[int], str]:
    """Token ids to calibrate on, and where they come from: `text` (else default_calibration_text()) through the
    checkpoint's tokenizer; random ids for a checkpoint without one (random weights)."""
    tokenizer = ckpt.folder / "tokenizer.json"
    if tokenizer.is_file():
        from tokenizers import Tokenizer

        explicit, source = text is not None, "--kv-calibration text"
        if text is None:
            text, source = default_calibration_text()
        ids = Tokenizer.from_file(str(tokenizer)).encode(text).ids[:tokens or CALIBRATION_TOKENS]
        distinct = len(set(ids))
        if distinct >= min(MIN_DISTINCT, ckpt.config.vocab_size // 2):
            return ids, source
        if explicit:
            raise ValueError(f"--kv-calibration: the text gives {len(ids)} tokens, {distinct} distinct, through "
                             f"{tokenizer}; at least {MIN_DISTINCT} distinct tokens are needed")
        source = f"random token ids ({source} gave {distinct} distinct tokens through this tokenizer)"
    else:
        source = "random token ids (no tokenizer)"
    n = tokens or RANDOM_CALIBRATION_TOKENS
    return np.random.default_rng(0).integers(0, ckpt.config.vocab_size, n).tolist(), source


def kv_absmax(ckpt, ids: list[int]) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """layer -> (rotary-pair norm max of k before rotary, max |v|), each [Hkv, D], over one pass of `ids`."""
    import torch

    from .reference import StreamingReference, _TorchOps  # torch: needed for calibration only

    stats: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    class Recording(_TorchOps):
        def attention(self, q, k, v, attn):
            d, half = attn.head_dim, attn.head_dim // 2
            kk = k[0].double()  # [S, Hkv, D]
            pair = torch.sqrt(kk[..., :half] ** 2 + kk[..., half:] ** 2).amax(0)  # [Hkv, D/2]
            vv = v[0].reshape(-1, attn.num_kv_heads, d).double().abs().amax(0)
            stats[attn.layer] = (torch.cat([pair, pair], -1).numpy(), vv.numpy())
            return super().attention(q, k, v, attn)

        def logit_rows(self, x):
            return x[:, -1:]  # the statistics need no logits

    StreamingReference(ckpt).record(Recording, torch.tensor([ids], dtype=torch.int64))
    return stats


def kv_cache_for(name: str, ckpt, text: str | None = None, margin: float = DEFAULT_MARGIN,
                 tokens: int | None = None) -> KvCache:
    """The KvCache an export writes: fp32 as it is, int8/int4 with scales calibrated on `text`."""
    check_name(name)
    bits = BITS[name]
    if not bits:
        return KvCache(name, None)
    if not margin > 0:
        raise ValueError(f"--kv-margin {margin}: expected a positive number")
    ids, source = calibration_ids(ckpt, text, tokens)
    stats = kv_absmax(ckpt, ids) if ckpt.config.attention_layers else {}
    def scale(bound: np.ndarray) -> np.ndarray:  # [Hkv, D]
        bound = np.maximum(bound, FLOOR * bound.max(axis=1, keepdims=True))
        return (np.maximum(bound, 1e-6) * margin / QMAX[bits]).astype(np.float32)

    scales = {i: (scale(k), scale(v)) for i, (k, v) in stats.items()}
    return KvCache(name, bits, scales, margin, {"tokens": len(ids), "source": source})
