"""What every backend needs to know about a bundle before it touches a runtime: the config it reads, the
state the graph carries and the name of each tensor a step binds. Pure Python (json and numpy only), so
the Java and Objective-C backends use it on phones without onnxruntime's Python binding, and tests check it
against LfmSession here.

The contract (docs/design.md, "The state contract"): inputs `input_ids [B,S]`, `attention_mask [B,P+S]`,
`past.{i}.conv [B,H,K-1]` on conv layers, `past_key_values.{i}.key/value [B,Hkv,P,D]` on attention layers;
outputs `logits [B,S,V]`, `present.{i}.conv`, `present.{i}.key/value`. With
`search.past_present_share_buffer` (GroupQueryAttention graphs) past and present KV are one
[B,Hkv,max_length,D] buffer that the kernel writes in place, so a backend passes the same tensor as input
and as pre-allocated output; without it (the portable op set) present grows by S rows each step and is fed
back as the next past.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import bundle
from ..bundle import BundleConfig, BundleError, StateSpec


@dataclass(frozen=True)
class StepNames:
    """Input and output names of one step, in a fixed order (conv layers, then attention layers)."""

    conv: tuple[tuple[int, str, str], ...]  # (layer, past name, present name)
    kv: tuple[tuple[int, str, str, str, str], ...]  # (layer, past key, past value, present key, present value)
    logits: str = "logits"

    @property
    def inputs(self) -> list[str]:
        return ["input_ids", "attention_mask", *(p for _, p, _ in self.conv),
                *(n for _, k, v, _, _ in self.kv for n in (k, v))]

    @property
    def outputs(self) -> list[str]:
        return [self.logits, *(q for _, _, q in self.conv), *(n for _, _, _, k, v in self.kv for n in (k, v))]


def read_bundle(folder: str | Path, verify: str = "size") -> BundleConfig:
    """runtime.bundle.read_bundle, limited to the checks a phone makes at every load: "size" (every file the
    manifest lists is there with its size: what a torn download or a full disk leaves wrong) or "none". The
    sha256 check belongs to the download (the manifest's sha256), not to every load."""
    if verify not in ("none", "size"):
        raise ValueError(f"verify {verify!r}: expected 'none' or 'size'")
    return bundle.read_bundle(folder, verify)


KV_BITS = {32: (np.float32, 1), 8: (np.int8, 1), 4: (np.uint8, 2)}  # bits -> element type, values per element


def kv_cache_type(cfg: BundleConfig, backend: str, supported: tuple[int, ...] = (32, 8, 4)) -> tuple[type, int]:
    """The KV cache's element type and packing (values per element along head_size) from manifest.json's
    `kv_cache` (written by `lfm-export --kv-cache`; no entry: float32). genai_config.json cannot say it:
    onnxruntime-genai 0.18 rejects unknown fields and reads the element type from the graph, and the
    Objective-C API reports no input types, so the manifest is the record every backend reads."""
    kv = cfg.manifest.get("kv_cache") or {}
    bits = kv.get("bits", 32)
    if bits not in KV_BITS or bits not in supported:
        raise BundleError(f"{cfg.folder / 'manifest.json'}: kv_cache.bits is {bits!r} (dtype {kv.get('dtype')!r}): "
                          f"the {backend} backend supports {', '.join(f'{b}-bit' for b in supported)} KV caches; "
                          "export with --kv-cache fp32 or int8")
    return KV_BITS[bits]


def state_from_config(decoder: dict, kv_pack: int = 1) -> StateSpec:
    """State dims from genai_config.json alone, for a runtime whose API does not report input shapes
    (onnxruntime-objc's ORTSession gives names only): conv layers carry [hidden_size, conv_cache_size],
    attention layers [num_key_value_heads, head_size / kv_pack] (an int4 cache packs two values a byte).
    Our exporter writes all four fields and `layer_types`."""
    missing = [k for k in ("layer_types", "hidden_size", "conv_cache_size", "num_key_value_heads", "head_size")
               if k not in decoder]
    if missing:
        raise BundleError(f"genai_config.json: decoder lacks {', '.join(missing)}, needed without input shapes")
    conv, kv = {}, {}
    for i, kind in enumerate(decoder["layer_types"]):
        if kind == "conv":
            conv[i] = (int(decoder["hidden_size"]), int(decoder["conv_cache_size"]))
        elif kind in ("full_attention", "attention", "sliding_attention"):
            kv[i] = (int(decoder["num_key_value_heads"]), int(decoder["head_size"]) // kv_pack)
        else:
            raise BundleError(f"genai_config.json: layer {i} has unknown type {kind!r}")
    return StateSpec(conv, kv)


def step_names(state: StateSpec, decoder: dict | None = None) -> StepNames:
    """Tensor names of a step, from genai_config.json's name templates where given (the same defaults as
    our exporter and onnxruntime-genai)."""
    ins = (decoder or {}).get("inputs", {})
    outs = (decoder or {}).get("outputs", {})
    pc, qc = ins.get("past_conv_names", "past.%d.conv"), outs.get("present_conv_names", "present.%d.conv")
    pk = ins.get("past_key_names", "past_key_values.%d.key")
    pv = ins.get("past_value_names", "past_key_values.%d.value")
    qk, qv = outs.get("present_key_names", "present.%d.key"), outs.get("present_value_names", "present.%d.value")
    return StepNames(
        conv=tuple((i, pc % i, qc % i) for i in sorted(state.conv)),
        kv=tuple((i, pk % i, pv % i, qk % i, qv % i) for i in sorted(state.kv)),
        logits=outs.get("logits", "logits"))


def initial_shapes(state: StateSpec, batch: int, max_length: int, share_buffer: bool) -> dict[str, tuple[int, ...]]:
    """Shape of each state buffer a generation starts with: conv [B,H,K-1] zeros; KV [B,Hkv,max_length,D]
    zeros when shared, else [B,Hkv,0,D] (empty past)."""
    names = step_names(state)
    shapes: dict[str, tuple[int, ...]] = {}
    for i, past, _ in names.conv:
        shapes[past] = (batch, *state.conv[i])
    capacity = max_length if share_buffer else 0
    for i, k, v, _, _ in names.kv:
        heads, dim = state.kv[i]
        shapes[k] = shapes[v] = (batch, heads, capacity, dim)
    return shapes
