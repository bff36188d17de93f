"""Random-weight checkpoints of the real model geometries, generated tensor by tensor as the exporter asks.

Benchmarks need full-size models without downloads, and writing a 17 GB checkpoint first would measure
the disk, not the exporter: `lfm-export --random-weights lfm2.5-8b-a1b` streams them instead.
`NAME:LAYERS` keeps the widths and cuts the depth (the first LAYERS layers of the real layout).
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np

from .config import Lfm2Config

_ATTENTION = (2, 6, 10, 14, 18, 21)
_COMMON = dict(
    model_type="lfm2_moe", hidden_size=2048, intermediate_size=7168, moe_intermediate_size=1792,
    num_hidden_layers=24, num_attention_heads=32, num_key_value_heads=8, num_experts=32, num_experts_per_tok=4,
    num_dense_layers=2, conv_L_cache=3, conv_bias=False, norm_eps=1e-5, tie_word_embeddings=True,
    use_expert_bias=True, norm_topk_prob=True, routed_scaling_factor=1.0, max_position_embeddings=128000,
    layer_types=["full_attention" if i in _ATTENTION else "conv" for i in range(24)],
)
PRESETS: dict[str, dict] = {
    "lfm2.5-8b-a1b": dict(_COMMON, vocab_size=128000, bos_token_id=124894, eos_token_id=124900, pad_token_id=124893,
                          rope_parameters={"rope_type": "default", "rope_theta": 5_000_000.0}),
    "lfm2-8b-a1b": dict(_COMMON, vocab_size=65536, bos_token_id=1, eos_token_id=7, pad_token_id=0,
                        rope_theta=1_000_000.0),
    # the dense 1.2 B-parameter LFM2 (the published LFM2-1.2B's config.json: block_ff_dim 12288 -> 8192 by LFM2's
    # width rules): the mid-size model export memory is measured on (device_bench/RESULTS.md)
    "lfm2-1.2b": dict(model_type="lfm2", vocab_size=65536, hidden_size=2048, intermediate_size=12288,
                      block_ff_dim=12288, block_auto_adjust_ff_dim=True, block_ffn_dim_multiplier=1.0,
                      block_multiple_of=256, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                      conv_L_cache=3, conv_bias=False, norm_eps=1e-5, tie_word_embeddings=True,
                      max_position_embeddings=128000, rope_theta=1_000_000.0, bos_token_id=1, eos_token_id=7,
                      pad_token_id=0,
                      layer_types=["full_attention" if i in (2, 5, 8, 10, 12, 14) else "conv" for i in range(16)]),
}


def preset(spec: str) -> dict:
    """config.json contents for `NAME` or `NAME:LAYERS`."""
    name, _, layers = spec.partition(":")
    if name not in PRESETS:
        raise ValueError(f"--random-weights {spec!r}: expected one of {sorted(PRESETS)} (optionally :LAYERS)")
    cfg = dict(PRESETS[name])
    if layers:
        if not layers.isdigit() or not 1 <= int(layers) <= cfg["num_hidden_layers"]:
            raise ValueError(f"--random-weights {spec!r}: LAYERS must be 1..{cfg['num_hidden_layers']}")
        n = int(layers)
        cfg.update(num_hidden_layers=n, layer_types=cfg["layer_types"][:n])
        if "num_dense_layers" in cfg:
            cfg["num_dense_layers"] = min(cfg["num_dense_layers"], n)
    return cfg


class RandomCheckpoint:
    """The Checkpoint interface over deterministic random tensors (seeded by name): N(0, 0.02) weights,
    norms near 1, a small expert bias."""

    def __init__(self, spec: str):
        self.spec = spec
        self.raw_config = preset(spec)
        self.config = Lfm2Config.from_dict(self.raw_config, source=f"--random-weights {spec}")
        self.folder = Path(f"random-weights:{spec}")
        self._cursor: tuple[tuple[str, tuple[int, ...]], int, np.random.Generator] | None = None  # `rows`' next row

    def __contains__(self, name: str) -> bool:
        return True

    def files(self) -> dict[str, bytes]:
        return {}  # no tokenizer; the exporter writes config.json from raw_config

    def check(self, name: str, shape: tuple[int, ...]) -> None:
        return None

    def tensor(self, name: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
        if shape is None:
            raise ValueError(f"random weights need a shape for {name!r}")
        return self._scaled(name, self._rng(name).standard_normal(shape, dtype=np.float32))

    def rows(self, name: str, start: int, stop: int, shape: tuple[int, ...] | None = None) -> np.ndarray:
        """Rows start..stop of `tensor(name, shape)`, the same values. The generator draws the rows in order, so
        it is kept between calls: reading a table's rows in order, some skipped or not (the vocabulary, quantized
        by rows; the rows a calibration pass looks up), costs what one `tensor` call does; going back draws the
        rows before `start` again."""
        if shape is None:
            raise ValueError(f"random weights need a shape for {name!r}")
        if not 0 <= start <= stop <= shape[0]:
            raise ValueError(f"random weights: rows {start}:{stop} of {name!r}, which has {shape[0]}")
        at = self._cursor
        if at is None or at[0] != (name, tuple(shape)) or at[1] > start:
            at = ((name, tuple(shape)), 0, self._rng(name))
        for skip in range(at[1], start, 4096):  # drawn and dropped: the generator's stream is sequential
            at[2].standard_normal((min(4096, start - skip), *shape[1:]), dtype=np.float32)
        values = at[2].standard_normal((stop - start, *shape[1:]), dtype=np.float32)
        self._cursor = (at[0], stop, at[2])
        return self._scaled(name, values)

    def _rng(self, name: str) -> np.random.Generator:
        return np.random.default_rng(zlib.crc32(f"{self.spec}/{name}".encode()))

    @staticmethod
    def _scaled(name: str, values: np.ndarray) -> np.ndarray:
        # in place: the same float32 products and sums as `1.0 + 0.02 * values`, without a second copy (the
        # LFM2.5-8B-A1B vocabulary is 1 GB)
        values *= np.float32(0.01 if name.endswith("expert_bias") else 0.02)
        if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
            values += np.float32(1.0)
        return values
