"""What quantization costs, measured: a bundle against a reference bundle of the same checkpoint (its fp32
export) on held-out text.

Mean KL(reference || bundle) over next-token distributions, top-1 agreement with the reference, and the
perplexity of both on the text; plus the bundle's size, its settings as exported (`Policy.summary()`) and how
much of it is zero padding. Both sides run the real onnxruntime kernels (int8 activations at accuracy_level 4
included), so this is what a phone would see. `lfm-export --eval-text` writes it into the bundle (quality.md);
`lfm-bench quality` measures many variants (device_bench/quality.py). Both cut the text the same way (WINDOW,
MAX_TOKENS), so the same text gives the same fp32 perplexity in both.
"""

from __future__ import annotations

import hashlib
import json
import textwrap
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx  # the exporter's: a bundle's graph header is read with it
from tokenizers import Tokenizer

from ..plots import figure
from ..quant.policy import Policy
from ..runtime.backends.python import Cache, LfmSession
from ..runtime.files import write_text
from .config import Lfm2Config
from .quant_ops import padding

__all__ = ["MAX_TOKENS", "WINDOW", "Quality", "bundle_row", "compare", "describe_text", "measure", "token_windows",
           "window_logits", "write_report"]

WINDOW = 128  # tokens per evaluation window, each run from an empty state
MAX_TOKENS = 8192  # the text's first tokens that are evaluated


@dataclass
class Quality:
    label: str
    policy: str
    bundle_mb: float
    kl: float
    top1: float
    ppl: float
    ppl_fp32: float
    tokens: int  # next-token predictions: each window's tokens after its first
    windows: int = 0
    settings: str = ""  # as exported: Policy.summary() of the policy the manifest records, the KV cache (llama.cpp:
    # its format)
    padding: dict[str, float] = field(default_factory=dict)  # part -> stored codes / weights (quant_ops.padding)


def token_windows(tokenizer_file: Path, text: str, window: int, max_tokens: int) -> list[list[int]]:
    """The text's token ids (at most `max_tokens`) cut into windows of `window` tokens."""
    ids = Tokenizer.from_file(str(tokenizer_file)).encode(text).ids[:max_tokens]
    return [ids[i:i + window] for i in range(0, len(ids) - 1, window) if len(ids[i:i + window]) > 1]


def window_logits(bundle: Path, windows: Sequence[Sequence[int]]) -> list[np.ndarray]:
    """Logits of every position of each window, each window from an empty state."""
    session = LfmSession(bundle, verify="none")  # the export's own files, measured before its manifest is written
    return [Cache(session, 1, len(w)).step(np.array([w]))[0] for w in windows]


def compare(reference: list[np.ndarray], candidate: list[np.ndarray], windows: Sequence[Sequence[int]]) -> dict:
    """KL(reference || candidate), top-1 agreement and both perplexities over every next-token prediction."""
    kl, agree, nll_ref, nll_cand, n = 0.0, 0, 0.0, 0.0, 0
    for ref, cand, ids in zip(reference, candidate, windows, strict=True):
        ref, cand = ref[:-1].astype(np.float64), cand[:-1].astype(np.float64)  # predict ids[1:]
        lp_ref = ref - np.logaddexp.reduce(ref, axis=-1, keepdims=True)
        lp_cand = cand - np.logaddexp.reduce(cand, axis=-1, keepdims=True)
        kl += float((np.exp(lp_ref) * (lp_ref - lp_cand)).sum())
        agree += int((ref.argmax(-1) == cand.argmax(-1)).sum())
        target = np.array(ids[1:])
        rows = np.arange(len(target))
        nll_ref -= float(lp_ref[rows, target].sum())
        nll_cand -= float(lp_cand[rows, target].sum())
        n += len(target)
    return {"kl": kl / n, "top1": agree / n, "ppl": float(np.exp(nll_cand / n)),
            "ppl_fp32": float(np.exp(nll_ref / n)), "tokens": n, "windows": len(windows)}


def bundle_mb(bundle: Path) -> float:
    """The graph and its weights, in MB (what a phone downloads and maps)."""
    return round(sum(p.stat().st_size for p in bundle.iterdir() if p.name.startswith("model.onnx")) / 1e6, 3)


def bundle_row(label: str, policy: Policy, bundle: Path, reference: list[np.ndarray],
               windows: Sequence[Sequence[int]]) -> Quality:
    """`bundle`, exported with `policy`, against the reference logits on `windows`: the measured figures, and its
    settings (the policy's, and the KV cache the graph records) and padding from that policy and its config.json."""
    config = Lfm2Config.from_file(bundle / "config.json")
    graph = onnx.load(bundle / "model.onnx", load_external_data=False)  # the header: the weights stay on disk
    kv_cache = {p.key: p.value for p in graph.metadata_props}.get("lfm_edge.kv_cache", "fp32")
    return Quality(label, policy.name, bundle_mb(bundle), **compare(reference, window_logits(bundle, windows), windows),
                   settings=f"{policy.summary()}; KV cache {kv_cache}", padding=padding(policy, config))


def measure(reference: Path, bundle: Path, text: str, label: str, policy: Policy, window: int = WINDOW,
            max_tokens: int = MAX_TOKENS) -> Quality:
    """`bundle` (exported with `policy`) against `reference` (an fp32 export of the same checkpoint) on `text`."""
    windows = token_windows(reference / "tokenizer.json", text, window, max_tokens)
    if not windows:
        raise ValueError("the evaluation text is too short: it needs at least two tokens")
    return bundle_row(label, policy, bundle, window_logits(reference, windows), windows)


def describe_text(name: str, text: str, window: int = WINDOW, max_tokens: int = MAX_TOKENS) -> str:
    """What a report says it measured on: the text's name and sha256, and how it was cut."""
    digest = hashlib.sha256(text.encode()).hexdigest()[:12]
    return f"{name} (sha256 {digest}...), at most its first {max_tokens} tokens, in windows of {window}"


def _padding(r: Quality) -> str:
    padded = {part: f for part, f in r.padding.items() if f > 1.0005}
    return ", ".join(f"{part} {f:.2f}x" for part, f in padded.items()) or ("none" if r.padding else "")


def write_report(results: Sequence[Quality], out: Path, title: str, text: str) -> list[Path]:
    """quality.json, quality.md and quality.png in `out` (each written atomically); `text` says what the results
    were measured on (describe_text)."""
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "quality.json", json.dumps([asdict(r) for r in results], indent=2))
    first = results[0]
    lines = [f"# Quantization quality: {title}", "",
             f"Held-out text: {text}, each window from an empty state: {first.tokens} next-token predictions in "
             f"{first.windows} windows. fp32 perplexity {first.ppl_fp32:.3f} on those predictions; every figure "
             "below is on the same ones. (A training script's held-out loss may cut the text another way: "
             "demo_model/train.py's also scores each window's last token against the next window's first.)", "",
             "| variant | as exported | model MB | padding | KL(fp32 ‖ q) | top-1 agreement | perplexity |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r.label} | {r.settings} | {r.bundle_mb:.2f} | {_padding(r)} | {r.kl:.5f} | {r.top1:.2%} | "
              f"{r.ppl:.3f} |" for r in results]
    lines += ["", "Model MB: model.onnx and its weights. Padding: stored codes over the weights they hold, where a "
              "block is wider than the rows (rows are zero-padded to whole blocks, and QMoE pads both of an "
              "expert's widths): a small model's narrow rows in big blocks make its bundle bigger than its bits "
              "say, which LFM2.5-8B-A1B's widths (2048, 1792, 7168: whole blocks of 256) never do. A policy "
              "whose head is rescored (\"top N rescored\") also stores an 8-bit copy of the vocabulary, of which "
              "a token reads N rows."]
    write_text(out / "quality.md", "\n".join(lines) + "\n")
    _plot(results, out / "quality.png", title)
    return [out / "quality.json", out / "quality.md", out / "quality.png"]


def _plot(results: Sequence[Quality], path: Path, title: str) -> None:
    """One row per variant across three bar panels (KL, top-1, size): labels never collide, every axis from 0."""
    names = [textwrap.fill(r.label, 28) for r in results]
    height = max(2.4, 1.5 + 0.36 * sum(1 + name.count("\n") for name in names))
    with figure(path, 1, 3, size=(11, height), title=title) as (_, axes):
        panels = ((axes[0], [r.kl for r in results], "KL(fp32 ‖ quantized), nats/token", "{:.4f}"),
                  (axes[1], [r.top1 * 100 for r in results], "top-1 agreement with fp32 (%)", "{:.1f}%"),
                  (axes[2], [r.bundle_mb for r in results], "model size (MB)", "{:.2f}"))
        for n, (ax, values, name, fmt) in enumerate(panels):
            ax.barh(range(len(results)), values, color=f"C{n}")
            ax.set_yticks(range(len(results)), names if n == 0 else [""] * len(results))
            ax.invert_yaxis()
            ax.set_title(name, fontsize=10)
            if n == 1:  # room for the labels right of a bar at 100%
                ax.set_xlim(0, 125)
                ax.set_xticks([0, 50, 100])
            else:
                ax.set_xlim(0, max(values) * 1.35 or 1)
            for i, v in enumerate(values):
                ax.annotate(fmt.format(v), (v, i), xytext=(3, 0), textcoords="offset points", va="center",
                            fontsize=8)
