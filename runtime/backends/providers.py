"""Choosing execution providers, and saying why.

An accelerator provider (XNNPACK, NNAPI, CoreML, QNN) helps only if it runs the heavy nodes; for these
graphs (MatMulNBits, GroupQueryAttention, QMoE, ...) today none does, and a partial partition adds copies
between providers. So `auto` asks onnxruntime which provider each node actually ran on (a one-token
profiled run) and keeps an accelerator only when it claims every heavy node; otherwise the CPU.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

ACCELERATORS = ("QNNExecutionProvider", "CoreMLExecutionProvider", "NnapiExecutionProvider",
                "XnnpackExecutionProvider")
HEAVY_OPS = {"MatMul", "MatMulNBits", "Gemm", "GroupQueryAttention", "MoE", "QMoE", "GatherBlockQuantized"}

ProviderList = list[str | tuple[str, dict]]


@dataclass
class ProviderChoice:
    providers: ProviderList
    reason: str
    claimed: dict[str, dict[str, int]] = field(default_factory=dict)  # provider -> op type -> nodes it ran


def choose(model_file: Path, requested: str | ProviderList = "auto", options: ort.SessionOptions | None = None,
           available: list[str] | None = None) -> ProviderChoice:
    """`requested` is "auto", "cpu", or an explicit onnxruntime providers list (names or (name, options))."""
    available = ort.get_available_providers() if available is None else available
    if requested == "cpu":
        return ProviderChoice(["CPUExecutionProvider"], "CPU requested")
    if requested != "auto":
        names = [p if isinstance(p, str) else p[0] for p in requested]
        missing = [n for n in names if n not in available]
        if missing:
            raise ValueError(f"providers: {missing} not available in this onnxruntime (available: {available})")
        return ProviderChoice(list(requested), f"requested explicitly: {names}")
    candidates = [p for p in ACCELERATORS if p in available]
    if not candidates:
        return ProviderChoice(["CPUExecutionProvider"],
                              f"CPU: no accelerator provider installed (available: {available})")
    claimed, reasons = {}, []
    for provider in candidates:
        by_provider = nodes_by_provider(model_file, [provider, "CPUExecutionProvider"], options)
        claimed[provider] = by_provider.get(provider, {})
        cpu_heavy = {op: n for op, n in by_provider.get("CPUExecutionProvider", {}).items() if op in HEAVY_OPS}
        if not cpu_heavy:
            return ProviderChoice([provider, "CPUExecutionProvider"],
                                  f"{provider} runs every heavy node", claimed)
        reasons.append(f"{provider} leaves {sum(cpu_heavy.values())} heavy nodes to the CPU "
                       f"({', '.join(sorted(cpu_heavy))})")
    return ProviderChoice(["CPUExecutionProvider"], "CPU: " + "; ".join(reasons), claimed)


def nodes_by_provider(model_file: Path, providers: ProviderList, options: ort.SessionOptions | None = None
                      ) -> dict[str, dict[str, int]]:
    """Which provider ran each node, by op type, from onnxruntime's own profile of a one-token run."""
    opts = options or ort.SessionOptions()
    with tempfile.TemporaryDirectory() as tmp:
        opts.enable_profiling = True
        opts.profile_file_prefix = os.path.join(tmp, "placement")
        session = ort.InferenceSession(str(model_file), opts, providers=providers)
        session.run(None, _one_token_feeds(session))
        events = json.loads(Path(session.end_profiling()).read_text())
    opts.enable_profiling = False
    counts: dict[str, Counter] = {}
    seen = set()
    for e in events:
        args = e.get("args", {})
        if e.get("cat") == "Node" and "provider" in args and e["name"] not in seen:
            seen.add(e["name"])
            counts.setdefault(args["provider"], Counter())[args.get("op_name", "?")] += 1
    return {p: dict(c) for p, c in counts.items()}


def _one_token_feeds(session: ort.InferenceSession) -> dict[str, np.ndarray]:
    feeds = {}
    for value in session.get_inputs():
        shape = [d if isinstance(d, int) else 1 for d in value.shape]
        if value.name == "attention_mask":
            feeds[value.name] = np.ones((1, 1), np.int64)
        elif value.name == "input_ids":
            feeds[value.name] = np.zeros((1, 1), np.int64)
        else:
            if value.name.startswith("past_key_values"):
                shape[2] = 0 if "max" not in str(value.shape[2]) else 1
            feeds[value.name] = np.zeros(shape, np.float32)
    return feeds
