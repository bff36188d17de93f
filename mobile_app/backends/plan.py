"""What every backend needs to know about a bundle before it touches a runtime: the config it reads, the
state the graph carries and the name of each tensor a step binds. Pure Python (json and numpy only), so
the Java and Objective-C backends use it on phones without onnxruntime's Python binding, and tests check it
against LfmSession here.

The contract (DESIGN.md, "The state contract"): inputs `input_ids [B,S]`, `attention_mask [B,P+S]`,
`past.{i}.conv [B,H,K-1]` on conv layers, `past_key_values.{i}.key/value [B,Hkv,P,D]` on attention layers;
outputs `logits [B,S,V]`, `present.{i}.conv`, `present.{i}.key/value`. With
`search.past_present_share_buffer` (GroupQueryAttention graphs) past and present KV are one
[B,Hkv,max_length,D] buffer that the kernel writes in place, so a backend passes the same tensor as input
and as pre-allocated output; without it (the portable op set) present grows by S rows each step and is fed
back as the next past.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lfm_edge.runtime.bundle import BundleError, StateSpec, read_json, verify_bundle  # noqa: F401 (re-exported)


@dataclass(frozen=True)
class BundleConfig:
    folder: Path
    manifest: dict
    model_file: Path
    decoder: dict
    share_buffer: bool
    context_length: int
    eos_token_ids: tuple[int, ...]
    pad_token_id: int
    vocab_size: int | None  # genai_config's model.vocab_size; the graph's logits shape wins where static


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
    """genai_config.json and manifest.json of `folder`; `verify` "size" checks every file the manifest lists
    is there with its size (what a torn download or a full disk leaves wrong), "none" skips it. The sha256
    check belongs to the download (the manifest's sha256), not to every load."""
    folder = Path(folder)
    if not folder.is_dir():
        raise BundleError(f"{folder}: not a bundle folder")
    if verify not in ("none", "size"):
        raise ValueError(f"verify {verify!r}: expected 'none' or 'size'")
    manifest = verify_bundle(folder, verify)
    genai = read_json(folder / "genai_config.json")
    model = genai.get("model", {})
    decoder = model.get("decoder", {})
    model_file = folder / decoder.get("filename", "model.onnx")
    if not model_file.is_file():
        raise BundleError(f"{model_file}: missing (genai_config.json names it as the model)")
    eos = model.get("eos_token_id", [])
    return BundleConfig(
        folder=folder, manifest=manifest, model_file=model_file, decoder=decoder,
        share_buffer=bool(genai.get("search", {}).get("past_present_share_buffer", False)),
        context_length=int(model.get("context_length", 4096)),
        eos_token_ids=tuple(eos if isinstance(eos, list) else [eos]),
        pad_token_id=int(model.get("pad_token_id", 0)),
        vocab_size=int(model["vocab_size"]) if "vocab_size" in model else None)


def _static(d: Any) -> int | None:
    """A dimension as the runtimes report it: int (Python), -1 (Java's TensorInfo.getShape), or a name/None."""
    return int(d) if isinstance(d, int) and d >= 0 else None


def state_spec(inputs: Iterable[tuple[str, Sequence[Any]]], decoder: dict) -> StateSpec:
    """State dims from the graph's (input name, shape) pairs, the way runtime.session._state_spec reads them;
    a symbolic KV head count or head size (the genai builder leaves the head size so) comes from
    genai_config.json's decoder section."""
    fallback = {1: decoder.get("num_key_value_heads"), 3: decoder.get("head_size")}
    conv, kv = {}, {}
    for name, shape in inputs:
        parts = name.split(".")
        if name.startswith("past.") and parts[-1] == "conv":
            h, k = _static(shape[1]), _static(shape[2])
            if h is None or k is None:
                raise BundleError(f"{name}: conv state dims must be static, the graph says {list(shape)}")
            conv[int(parts[1])] = (h, k)
        elif name.startswith("past_key_values.") and parts[-1] == "key":
            dims = []
            for axis in (1, 3):
                d = _static(shape[axis])
                if d is None:
                    if fallback[axis] is None:
                        raise BundleError(f"{name}: dimension {axis} is symbolic and genai_config.json gives no "
                                          f"{'num_key_value_heads' if axis == 1 else 'head_size'}")
                    d = int(fallback[axis])
                dims.append(d)
            kv[int(parts[1])] = (dims[0], dims[1])
    return StateSpec(conv, kv)


def state_from_config(decoder: dict) -> StateSpec:
    """State dims from genai_config.json alone, for a runtime whose API does not report input shapes
    (onnxruntime-objc's ORTSession gives names only): conv layers carry [hidden_size, conv_cache_size],
    attention layers [num_key_value_heads, head_size]. Our exporter writes all four fields and
    `layer_types`."""
    missing = [k for k in ("layer_types", "hidden_size", "conv_cache_size", "num_key_value_heads", "head_size")
               if k not in decoder]
    if missing:
        raise BundleError(f"genai_config.json: decoder lacks {', '.join(missing)}, needed without input shapes")
    conv, kv = {}, {}
    for i, kind in enumerate(decoder["layer_types"]):
        if kind == "conv":
            conv[i] = (int(decoder["hidden_size"]), int(decoder["conv_cache_size"]))
        elif kind in ("full_attention", "attention", "sliding_attention"):
            kv[i] = (int(decoder["num_key_value_heads"]), int(decoder["head_size"]))
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


def check_step(length: int, new: int, max_length: int) -> None:
    if length + new > max_length:
        raise ValueError(f"{length} + {new} tokens exceed this generation's max_length {max_length}")
