"""What quantization costs, measured: a bundle against a reference bundle of the same checkpoint (its fp32
export) on held-out text.

Mean KL(reference || bundle) over next-token distributions, top-1 agreement with the reference, and the
perplexity of both on the text; plus the bundle's size. Both sides run the real onnxruntime kernels (int8
activations at accuracy_level 4 included), so this is what a phone would see. `lfm-export --eval-text`
writes it into the bundle (quality.md); `lfm-bench quality` measures many variants (device_bench/quality.py).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from ..plots import figure
from ..runtime.backends.python import Cache, LfmSession
from ..runtime.files import write_text

__all__ = ["Quality", "compare", "measure", "token_windows", "window_logits", "write_report"]


@dataclass
class Quality:
    label: str
    policy: str
    bundle_mb: float
    kl: float
    top1: float
    ppl: float
    ppl_fp32: float
    tokens: int


def token_windows(tokenizer_file: Path, text: str, window: int, max_tokens: int) -> list[list[int]]:
    """The text's token ids (at most `max_tokens`) cut into windows of `window` tokens."""
    ids = Tokenizer.from_file(str(tokenizer_file)).encode(text).ids[:max_tokens]
    return [ids[i:i + window] for i in range(0, len(ids) - 1, window) if len(ids[i:i + window]) > 1]


def window_logits(bundle: Path, windows: Sequence[Sequence[int]]) -> list[np.ndarray]:
    """Logits of every position of each window, each window from an empty state."""
    session = LfmSession(bundle)
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
            "ppl_fp32": float(np.exp(nll_ref / n)), "tokens": n}


def bundle_mb(bundle: Path) -> float:
    """The graph and its weights, in MB (what a phone downloads and maps)."""
    return round(sum(p.stat().st_size for p in bundle.iterdir() if p.name.startswith("model.onnx")) / 1e6, 3)


def measure(reference: Path, bundle: Path, text: str, label: str, policy: str = "", window: int = 128,
            max_tokens: int = 4096) -> Quality:
    """`bundle` against `reference` (an fp32 export of the same checkpoint) on `text`."""
    windows = token_windows(reference / "tokenizer.json", text, window, max_tokens)
    if not windows:
        raise ValueError("the evaluation text is too short: it needs at least two tokens")
    return Quality(label, policy or label, bundle_mb(bundle),
                   **compare(window_logits(reference, windows), window_logits(bundle, windows), windows))


def write_report(results: Sequence[Quality], out: Path, title: str) -> list[Path]:
    """quality.json, quality.md and quality.png in `out` (each written atomically)."""
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "quality.json", json.dumps([asdict(r) for r in results], indent=2))
    lines = [f"# Quantization quality: {title}", "",
             f"{results[0].tokens} held-out tokens; fp32 perplexity {results[0].ppl_fp32:.3f}.", "",
             "| variant | model MB | KL(fp32 ‖ q) | top-1 agreement | perplexity |", "|---|---|---|---|---|"]
    lines += [f"| {r.label} | {r.bundle_mb:.2f} | {r.kl:.5f} | {r.top1:.2%} | {r.ppl:.3f} |" for r in results]
    write_text(out / "quality.md", "\n".join(lines) + "\n")
    height = max(3.5, 1.2 + 0.32 * len(results))
    with figure(out / "quality.png", 1, 2, size=(12, height), title=title) as (_, (left, right)):
        for n, r in enumerate(results):  # numbered points, named in the legend: labels never overlap
            left.scatter(r.bundle_mb, r.kl, s=40, label=f"{n + 1}. {r.label}")
            left.annotate(str(n + 1), (r.bundle_mb, r.kl), fontsize=8, xytext=(4, 3), textcoords="offset points")
        left.set(xlabel="model size (MB)", ylabel="KL(fp32 ‖ quantized), nats/token", title="cost against size")
        left.set_yscale("log")
        left.legend(fontsize=7, loc="best")
        right.barh([f"{n + 1}. {r.label}" for n, r in enumerate(results)], [r.top1 * 100 for r in results],
                   color="tab:blue")
        right.invert_yaxis()
        right.set(xlabel="top-1 agreement with fp32 (%)", xlim=(0, 100), title="same next token as fp32")
        for n, r in enumerate(results):
            right.annotate(f"{r.top1:.1%}", (r.top1 * 100, n), xytext=(-4, 0), textcoords="offset points",
                           ha="right", va="center", color="white", fontsize=8)
    return [out / "quality.json", out / "quality.md", out / "quality.png"]
