"""Bytes a decoded token reads: the roofline's input, computed once from the graph the exporter wrote and
recorded in manifest.json (`bytes_per_token`), where every other part of the project reads it
(runtime/bundle.py `token_bytes`).

Each initializer counts at its stored size, read once per token; routed experts count at top_k / num_experts
of their size; the embedding table counts once, as the LM head that reads all of it (the lookup reads a row);
a rescored head's finer copy counts its top rows; GroupQueryAttention's rotary tables count nothing (a row per
token).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx  # the exporter's: the graph is read with it (headers only, external data stays on disk)
from onnx import helper

from ..runtime.bundle import TokenBytes

__all__ = ["bytes_per_token", "stored_bytes"]


def bytes_per_token(bundle: Path, rescore_top: int = 0) -> TokenBytes:
    """From `bundle`'s model.onnx and config.json; `rescore_top`: rows per token the LM head rescores from its
    finer copy (the policy's Rescore.top, 0 without one)."""
    bundle = Path(bundle)
    model = onnx.load(bundle / "model.onnx", load_external_data=False)
    config = json.loads((bundle / "config.json").read_text()) if (bundle / "config.json").is_file() else {}
    experts, top_k = config.get("num_experts", 0), config.get("num_experts_per_tok", 0)
    rescored_rows = 1 + rescore_top  # its top rows and the lookup's row
    by_kind: dict[str, float] = {}
    stored = 0
    for init in model.graph.initializer:
        size = stored_bytes(init)
        stored += size
        name = init.name
        if name.startswith("rotary."):  # GQA's cos/sin tables (export/onnx_ops.py): one row read per token
            kind, read = "", 0
        elif ".experts." in name and experts:
            kind, read = "experts (routed)", size * top_k / experts
        elif name.startswith(("model.embed_tokens", "lm_head")) and ".rescore." in name:
            kind, read = "embedding / LM head", size * rescored_rows / max(1, config.get("vocab_size", 1))
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


def stored_bytes(init: onnx.TensorProto) -> int:
    """An initializer's size as stored (its external data's length, else its element count x size)."""
    for entry in init.external_data:
        if entry.key == "length":
            return int(entry.value)
    count = int(np.prod(init.dims)) if init.dims else 1
    return count * np.dtype(helper.tensor_dtype_to_np_dtype(init.data_type)).itemsize
