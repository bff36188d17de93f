"""The LFM2 family's configuration, read from a checkpoint's config.json and checked before any heavy work.

Both Hugging Face model types map onto one dataclass: dense `lfm2` is the MoE layout with every layer
dense. Field names follow transformers; the aliases older configs use (`full_attn_idxs`, `block_ff_dim`,
flat `rope_theta`, `tie_embedding`) are normalised here so nothing downstream sees them.
"""

from __future__ import annotations

import json
import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SUPPORTED_MODEL_TYPES = ("lfm2", "lfm2_moe")


class ConfigError(ValueError):
    """A config.json that cannot describe an LFM2 model; the message names the file and field."""


@dataclass(frozen=True)
class Lfm2Config:
    model_type: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    layer_types: tuple[str, ...]
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    conv_L_cache: int
    conv_bias: bool
    norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    intermediate_size: int  # width of the dense feed-forward layers, after LFM2's adjustment rules
    num_dense_layers: int  # layers [0, num_dense_layers) are dense; the rest are MoE
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    use_expert_bias: bool = False
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    bos_token_id: int | None = None
    eos_token_id: tuple[int, ...] = ()
    pad_token_id: int | None = None
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def is_moe(self) -> bool:
        return self.model_type == "lfm2_moe"

    @property
    def attention_layers(self) -> list[int]:
        return [i for i, t in enumerate(self.layer_types) if t == "full_attention"]

    @property
    def conv_layers(self) -> list[int]:
        return [i for i, t in enumerate(self.layer_types) if t == "conv"]

    def is_moe_layer(self, layer: int) -> bool:
        return self.is_moe and layer >= self.num_dense_layers

    @classmethod
    def from_file(cls, path: str | Path) -> Lfm2Config:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: no config.json (a checkpoint folder needs one)") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConfigError(f"{path}: unreadable config ({e})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a JSON object, got {type(data).__name__}")
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config.json") -> Lfm2Config:
        r = _Reader(d, source)
        model_type = r.get("model_type", str)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"{source}: model_type {model_type!r} is not supported (expected one of {SUPPORTED_MODEL_TYPES})"
            )
        is_moe = model_type == "lfm2_moe"
        n_layers = r.positive("num_hidden_layers")
        hidden = r.positive("hidden_size")
        heads = r.positive("num_attention_heads")
        kv_heads = r.positive("num_key_value_heads", default=heads)
        if hidden % heads:
            raise ConfigError(f"{source}: hidden_size {hidden} is not divisible by num_attention_heads {heads}")
        if heads % kv_heads:
            raise ConfigError(
                f"{source}: num_attention_heads {heads} is not divisible by num_key_value_heads {kv_heads}"
            )
        head_dim = r.positive("head_dim", default=hidden // heads)
        if head_dim % 2:
            raise ConfigError(f"{source}: head_dim {head_dim} must be even for rotary embeddings")

        layer_types = _layer_types(r, n_layers)
        rope_theta = _rope_theta(r)

        num_dense = n_layers
        experts = per_tok = moe_width = 0
        if is_moe:
            num_dense = r.get("num_dense_layers", int, default=2)
            if not 0 <= num_dense <= n_layers:
                raise ConfigError(f"{source}: num_dense_layers {num_dense} is outside [0, {n_layers}]")
            experts = r.positive("num_experts")
            per_tok = r.positive("num_experts_per_tok")
            if per_tok > experts:
                raise ConfigError(
                    f"{source}: num_experts_per_tok {per_tok} is larger than num_experts {experts}"
                )
            moe_width = r.positive("moe_intermediate_size")

        eos = r.raw.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        return cls(
            model_type=model_type,
            vocab_size=r.positive("vocab_size"),
            hidden_size=hidden,
            num_hidden_layers=n_layers,
            layer_types=layer_types,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            conv_L_cache=r.positive("conv_L_cache", default=3),
            conv_bias=r.get("conv_bias", bool, default=False),
            norm_eps=float(r.get("norm_eps", (int, float), default=1e-5)),
            rope_theta=rope_theta,
            max_position_embeddings=r.positive("max_position_embeddings", default=128_000),
            tie_word_embeddings=r.get(
                "tie_word_embeddings", bool, default=r.get("tie_embedding", bool, default=True)
            ),
            intermediate_size=_dense_width(r, is_moe),
            num_dense_layers=num_dense,
            num_experts=experts,
            num_experts_per_tok=per_tok,
            moe_intermediate_size=moe_width,
            use_expert_bias=is_moe and r.get("use_expert_bias", bool, default=True),
            norm_topk_prob=r.get("norm_topk_prob", bool, default=True),
            routed_scaling_factor=float(r.get("routed_scaling_factor", (int, float), default=1.0)),
            bos_token_id=r.get("bos_token_id", int, default=None),
            eos_token_id=eos_ids,
            pad_token_id=r.get("pad_token_id", int, default=None),
            raw=dict(d),
        )


# Upper bounds on sizes (LFM2.5-8B-A1B: vocabulary 128,000, hidden 2048, 24 layers, 32 experts, 128K context)
LIMITS = {"vocab_size": 1 << 21, "hidden_size": 1 << 16, "num_hidden_layers": 1024, "num_attention_heads": 1024,
          "num_key_value_heads": 1024, "head_dim": 4096, "max_position_embeddings": 1 << 20, "conv_L_cache": 64,
          "intermediate_size": 1 << 18, "moe_intermediate_size": 1 << 18, "num_experts": 4096,
          "num_experts_per_tok": 4096, "block_ff_dim": 1 << 18}


class _Reader:
    """Typed access to config fields, with errors that name the file and the field."""

    def __init__(self, raw: dict[str, Any], source: str):
        self.raw, self.source = raw, source

    def get(self, key: str, types: type | tuple[type, ...], default: Any = ...) -> Any:
        if key not in self.raw or self.raw[key] is None:
            if default is ...:
                raise ConfigError(f"{self.source}: missing field {key!r}")
            return default
        value = self.raw[key]
        # bool is an int in Python; a size given as true/false is still wrong.
        if not isinstance(value, types) or (isinstance(value, bool) and types in (int, (int, float))):
            raise ConfigError(f"{self.source}: field {key!r} = {value!r}, expected {_type_name(types)}")
        return value

    def positive(self, key: str, default: Any = ...) -> int:
        """A positive integer, and at most LIMITS[key] (check_size)."""
        value = self.get(key, int, default)
        return value if value is None else check_size(self.source, key, value)


def check_size(source: str, key: str, value: Any, limit: str | None = None) -> int:
    """A positive integer, and at most LIMITS[limit or key]: a size past it is a broken or hostile file, refused
    before anything is allocated for it or divided by it. `key` is the field as the file names it (a GGUF's
    `lfm2moe.block_count` is held to "num_hidden_layers")."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ConfigError(f"{source}: field {key!r} = {value!r}, expected int")
    if value <= 0:
        raise ConfigError(f"{source}: field {key!r} = {value}, expected a positive integer")
    bound = LIMITS.get(limit or key, 1 << 24)
    if value > bound:
        raise ConfigError(f"{source}: field {key!r} = {value:,}, more than the {bound:,} any LFM2 geometry has")
    return int(value)


def _type_name(types: type | tuple[type, ...]) -> str:
    types = types if isinstance(types, tuple) else (types,)
    return " or ".join(t.__name__ for t in types)


def _layer_types(r: _Reader, n_layers: int) -> tuple[str, ...]:
    if r.raw.get("layer_types") is not None:
        types = r.get("layer_types", list)
        if len(types) != n_layers:
            raise ConfigError(
                f"{r.source}: layer_types has {len(types)} entries, expected num_hidden_layers = {n_layers}"
            )
        bad = [t for t in types if t not in ("conv", "full_attention")]
        if bad:
            raise ConfigError(f"{r.source}: layer_types has {bad[0]!r}, expected 'conv' or 'full_attention'")
        return tuple(types)
    if r.raw.get("full_attn_idxs") is not None:
        idxs = r.get("full_attn_idxs", list)
        bad = [i for i in idxs if not isinstance(i, int) or not 0 <= i < n_layers]
        if bad:
            raise ConfigError(f"{r.source}: full_attn_idxs has {bad[0]!r}, expected layer indices < {n_layers}")
        return tuple("full_attention" if i in idxs else "conv" for i in range(n_layers))
    raise ConfigError(f"{r.source}: needs 'layer_types' or 'full_attn_idxs' to know which layers attend")


def _rope_theta(r: _Reader) -> float:
    params = r.raw.get("rope_parameters")
    if isinstance(params, dict):
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type != "default":
            raise ConfigError(f"{r.source}: rope_parameters.rope_type {rope_type!r} is not supported")
        if "rope_theta" in params:
            return float(params["rope_theta"])
    return float(r.get("rope_theta", (int, float), default=1_000_000.0))


def _dense_width(r: _Reader, is_moe: bool) -> int:
    """The dense SwiGLU width. LFM2 (dense) shrinks `block_ff_dim` by 2/3, scales it and rounds it up to
    `block_multiple_of` when `block_auto_adjust_ff_dim`; LFM2-MoE uses `intermediate_size` as written."""
    # transformers lets an old-style `block_ff_dim` override `intermediate_size`.
    width = r.positive("block_ff_dim") if "block_ff_dim" in r.raw else r.positive("intermediate_size")
    if is_moe or not r.get("block_auto_adjust_ff_dim", bool, default=True):
        return width
    width = int(2 * width / 3)
    multiplier = r.get("block_ffn_dim_multiplier", (int, float), default=1.0)
    if multiplier is not None:
        multiple = r.positive("block_multiple_of", default=256)
        width = int(multiplier * width)
        width = multiple * ((width + multiple - 1) // multiple)
    return width
