"""The physical limit of decoding: every active weight is read once per token, so
    tokens/s <= read bandwidth / bytes read per token.

Bytes per token come from the bundle itself (each initializer's stored size; routed experts count at
top_k / num_experts of their size; the embedding table counts once, as the LM head that reads all of it).
`lfm-export` records them in manifest.json, so a phone build without the onnx package reads them there;
other bundles (onnxruntime-genai's builder) are parsed with onnx.
Bandwidth is measured here, or taken from a phone SoC table.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

TARGET_TOKENS_PER_SECOND = 30.0

# Peak LPDDR bandwidth (GB/s) of phone SoCs; `achievable` is the share the best CPU decoders reach
# (about 55% on phones; docs/design.md, "Speed").
PHONE_SOCS: dict[str, float] = {
    "Snapdragon 8 Gen 2 (LPDDR5X-8400)": 67.0,
    "Snapdragon 8 Gen 3 (LPDDR5X-9600)": 76.8,
    "Snapdragon 8 Elite (LPDDR5X-10667)": 84.8,
    "Dimensity 9300 (LPDDR5T-9600)": 76.8,
    "Apple A17 Pro (LPDDR5-6400)": 51.2,
    "Apple A18 Pro (LPDDR5X-7500)": 60.0,
    "Tensor G4 (LPDDR5X-8533)": 68.3,
    "Snapdragon 7 Gen 3 (LPDDR5-6400)": 51.2,
}
PHONE_ACHIEVABLE = 0.55


@dataclass
class TokenBytes:
    total: float  # bytes read per decoded token
    by_kind: dict[str, float]
    stored: int  # bytes of all weights in the bundle


MANIFEST_KEY = "bytes_per_token"  # manifest.json's entry: TokenBytes as a dict


def bytes_per_token(bundle: Path) -> TokenBytes:
    """From manifest.json when the exporter recorded it (no onnx needed), else from the graph (needs onnx)."""
    bundle = Path(bundle)
    return recorded_bytes_per_token(bundle) or graph_bytes_per_token(bundle)


def recorded_bytes_per_token(bundle: Path) -> TokenBytes | None:
    """What the exporter recorded in manifest.json; None when there is none, or when the graph file is no
    longer the one the manifest describes (a different size)."""
    try:
        manifest = json.loads((Path(bundle) / "manifest.json").read_text())
        entry = manifest[MANIFEST_KEY]
        model = manifest.get("model", "model.onnx")
        listed = manifest.get("files", {}).get(model, {}).get("bytes")
        if listed is not None and (Path(bundle) / model).stat().st_size != listed:
            return None
        return TokenBytes(entry["total"], dict(entry["by_kind"]), entry["stored"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def manifest_entry(tokens: TokenBytes) -> dict:
    """What the exporter writes under MANIFEST_KEY; `recorded_bytes_per_token` reads it back unchanged."""
    return asdict(tokens)


def graph_bytes_per_token(bundle: Path) -> TokenBytes:
    """Parsed from model.onnx's initializers (headers only: external data is not loaded)."""
    import onnx

    bundle = Path(bundle)

    model = onnx.load(bundle / "model.onnx", load_external_data=False)
    config = json.loads((bundle / "config.json").read_text()) if (bundle / "config.json").is_file() else {}
    experts, top_k = config.get("num_experts", 0), config.get("num_experts_per_tok", 0)
    by_kind: dict[str, float] = {}
    stored = 0
    for init in model.graph.initializer:
        size = _stored_bytes(init)
        stored += size
        name = init.name
        if name.startswith("rotary."):  # GQA's cos/sin tables (export/onnx_ops.py): one row read per token
            kind, read = "", 0
        elif ".experts." in name and experts:
            kind, read = "experts (routed)", size * top_k / experts
        elif name.startswith(("model.embed_tokens", "lm_head")):
            kind, read = ("embedding / LM head", size) if not name.endswith(("scales3", "zp3")) else ("", 0)
        elif "self_attn" in name:
            kind, read = "attention", size
        elif ".conv." in name:
            kind, read = "conv", size
        elif "feed_forward" in name:
            kind, read = "dense FFN / router", size
        else:
            kind, read = "other", size
        if kind:
            by_kind[kind] = by_kind.get(kind, 0.0) + read
    return TokenBytes(sum(by_kind.values()), by_kind, stored)


def _stored_bytes(init) -> int:
    for entry in init.external_data:
        if entry.key == "length":
            return int(entry.value)
    from onnx import helper

    count = int(np.prod(init.dims)) if init.dims else 1
    return count * np.dtype(helper.tensor_dtype_to_np_dtype(init.data_type)).itemsize


def read_bandwidth(gib: float = 1.0, repeats: int = 5) -> float:
    """Read bandwidth in GB/s: the best of several passes of a memory-bound dot product over `gib` GiB."""
    a = np.ones(int(gib * (1 << 30)) // 4, dtype=np.float32)
    a @ a  # noqa: B018 - touch every page first
    best = 0.0
    for _ in range(repeats):
        t = time.perf_counter()
        a @ a  # noqa: B018
        best = max(best, a.nbytes / (time.perf_counter() - t) / 1e9)
    return best


def ceiling(bandwidth_gbs: float, token_bytes: float) -> float:
    return bandwidth_gbs * 1e9 / token_bytes


def phone_predictions(token_bytes: float, fraction: float | None = None) -> list[dict]:
    """Predicted decode tok/s per SoC at `fraction` of peak bandwidth (default: what phones reach)."""
    share = PHONE_ACHIEVABLE if fraction is None else fraction
    rows = []
    for soc, bandwidth in PHONE_SOCS.items():
        tps = ceiling(bandwidth, token_bytes) * share
        rows.append({"soc": soc, "bandwidth_gbs": bandwidth, "ceiling_tps": round(ceiling(bandwidth, token_bytes), 1),
                     "predicted_tps": round(tps, 1), "meets_target": tps >= TARGET_TOKENS_PER_SECOND})
    return rows
