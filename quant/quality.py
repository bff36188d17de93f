"""What quantization costs, measured: each variant against the fp32 export on held-out text.

Per variant: mean KL(fp32 || quantized) over next-token distributions, top-1 agreement with fp32, and
perplexity of both on the text; plus the bundle size. Both sides run the real onnxruntime kernels
(including int8 activations at accuracy_level 4), so this is what a phone would see.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .policy import Policy, get_policy


@dataclass(frozen=True)
class Variant:
    label: str
    policy: Policy


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


def default_variants() -> list[Variant]:
    """Policies, block sizes 32/64/128 and RTN against the MSE search, as the issue asks to compare."""
    int4 = get_policy("int4")
    out = [Variant(f"int4 rtn b{b}", int4.with_overrides(block_size=b, method="rtn")) for b in (32, 64, 128)]
    out += [Variant("int4 rtn-asym b32", int4.with_overrides(block_size=32, method="rtn-asym"))]
    out += [Variant(f"int4 mse b{b}", int4.with_overrides(block_size=b, method="mse")) for b in (32, 64, 128)]
    out += [Variant("int4 (default: mse, b128, vocabulary b32)", int4),
            Variant("int4-hq", get_policy("int4-hq")),
            Variant("int8", get_policy("int8"))]
    return out


def token_windows(tokenizer_file: Path, text: str, window: int, max_tokens: int) -> list[list[int]]:
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(tokenizer_file)).encode(text).ids[:max_tokens]
    return [ids[i:i + window] for i in range(0, len(ids) - 1, window) if len(ids[i:i + window]) > 1]


def window_logits(bundle: Path, windows: Sequence[Sequence[int]]) -> list[np.ndarray]:
    from ..runtime.backends.python import Cache, LfmSession

    session = LfmSession(bundle)
    return [Cache(session, 1, len(w)).step(np.array([w]))[0] for w in windows]


def compare(reference: list[np.ndarray], candidate: list[np.ndarray], windows: Sequence[Sequence[int]]) -> dict:
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


def _fp32_reference(checkpoint: str | Path, text: str, window: int, max_tokens: int,
                    work: Path) -> tuple[list[list[int]], list[np.ndarray]]:
    """The evaluation windows and the fp32 export's logits on them (the export lives in `work`)."""
    from ..export.exporter import export

    fp32 = export(checkpoint, work / "fp32").bundle
    windows = token_windows(fp32 / "tokenizer.json", text, window, max_tokens)
    if not windows:
        raise ValueError("the evaluation text is too short: it needs at least two tokens")
    return windows, window_logits(fp32, windows)


def _measure(label: str, policy: str, bundle: Path, windows: list[list[int]], reference: list[np.ndarray]) -> Quality:
    size = sum(p.stat().st_size for p in bundle.iterdir() if p.name.startswith("model.onnx")) / 1e6
    return Quality(label, policy, round(size, 3), **compare(reference, window_logits(bundle, windows), windows))


def measure_bundle(checkpoint: str | Path, bundle: Path, text: str, label: str, window: int = 128,
                   max_tokens: int = 4096) -> Quality:
    """One finished bundle against an fp32 export of its checkpoint (made in a temporary folder)."""
    work = Path(tempfile.mkdtemp(prefix="lfm-quality-"))
    try:
        windows, reference = _fp32_reference(checkpoint, text, window, max_tokens, work)
        return _measure(label, label, bundle, windows, reference)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def llama_cpp_formats(spec: str) -> list[tuple[str, bool]]:
    """"Q4_0,Q4_0-pure,Q4_K_M" -> [(format, pure)], checked against llama_cpp_peer.LLAMA_FORMATS."""
    from ..device_bench.llama_cpp_peer import LLAMA_FORMATS

    out = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        fmt, pure = (item[:-5], True) if item.endswith("-pure") else (item, False)
        if fmt not in LLAMA_FORMATS:
            raise ValueError(f"--llama-cpp {item!r}: expected a llama.cpp format ({', '.join(LLAMA_FORMATS)}), "
                             "optionally with -pure")
        out.append((fmt, pure))
    return out


def _llama_cpp_rows(checkpoint: str | Path, windows: list[list[int]], reference: list[np.ndarray],
                    work: Path, formats: Sequence[tuple[str, bool]], progress: Callable[[str], None]) -> list[Quality]:
    """llama.cpp's own quantizations of the same checkpoint (llama-quantize's mixes, or `pure`: one type for
    every tensor), measured on the same windows: the quality a llama.cpp user gets at each size."""
    from ..device_bench.gguf_writer import write_gguf
    from ..device_bench.llama_cpp_peer import quantize, window_logits
    from ..export.checkpoint import Checkpoint

    f32 = write_gguf(Checkpoint(checkpoint), work / "f32.gguf", f16=False)
    rows = []
    for fmt, pure in formats:
        label = f"llama.cpp {fmt}{' pure' if pure else ''}"
        progress(f"{label} of the same checkpoint")
        gguf = quantize(f32, work / f"{fmt.lower()}{'_pure' if pure else ''}.gguf", fmt, pure=pure)
        rows.append(Quality(label, "llama.cpp", round(gguf.stat().st_size / 1e6, 3),
                            **compare(reference, window_logits(gguf, windows), windows)))
        gguf.unlink()
    return rows


def evaluate(checkpoint: str | Path, text: str, variants: Sequence[Variant], window: int = 128,
             max_tokens: int = 4096, progress: Callable[[str], None] = print,
             llama_cpp: Sequence[tuple[str, bool]] = ()) -> list[Quality]:
    """Each variant, then each llama.cpp (format, pure) in `llama_cpp`, against the fp32 export."""
    from ..export.exporter import export

    work = Path(tempfile.mkdtemp(prefix="lfm-quality-"))
    try:
        progress("exporting fp32 reference")
        windows, reference = _fp32_reference(checkpoint, text, window, max_tokens, work)
        results = []
        for v in variants:
            progress(f"{v.label}: export and evaluate")
            bundle = export(checkpoint, work / "variant", quant=v.policy).bundle
            results.append(_measure(v.label, v.policy.name, bundle, windows, reference))
            shutil.rmtree(bundle)
        if llama_cpp:
            results += _llama_cpp_rows(checkpoint, windows, reference, work, llama_cpp, progress)
        return results
    finally:
        shutil.rmtree(work, ignore_errors=True)


def write_report(results: Sequence[Quality], out: Path, title: str) -> list[Path]:
    """quality.json, quality.md and quality.png in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "quality.json").write_text(json.dumps([asdict(r) for r in results], indent=2))
    lines = [f"# Quantization quality: {title}", "",
             f"{results[0].tokens} held-out tokens; fp32 perplexity {results[0].ppl_fp32:.3f}.", "",
             "| variant | model MB | KL(fp32 ‖ q) | top-1 agreement | perplexity |", "|---|---|---|---|---|"]
    lines += [f"| {r.label} | {r.bundle_mb:.2f} | {r.kl:.5f} | {r.top1:.2%} | {r.ppl:.3f} |" for r in results]
    (out / "quality.md").write_text("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for r in results:
        left.scatter(r.bundle_mb, r.kl, s=40)
        left.annotate(r.label, (r.bundle_mb, r.kl), fontsize=8, xytext=(4, 3), textcoords="offset points")
    left.set(xlabel="model size (MB)", ylabel="KL(fp32 ‖ quantized), nats/token", title="cost vs size")
    left.set_yscale("log")
    right.barh([r.label for r in results], [r.top1 * 100 for r in results], color="tab:blue")
    right.set(xlabel="top-1 agreement with fp32 (%)", xlim=(min(r.top1 for r in results) * 100 - 2, 100),
              title="same next token as fp32")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out / "quality.png", dpi=110)
    plt.close(fig)
    return [out / "quality.json", out / "quality.md", out / "quality.png"]


# ---- KV cache precision: the same bundle's graph with an int8/int4 cache against the fp32 cache at depth ------

@dataclass
class KvQuality:
    label: str
    depth: int
    prompt_kl: float  # mean KL(fp32 cache || quantized cache) over the last `prompt_rows` prompt positions
    forced_kl: float  # ... over the decoded positions, both fed the fp32 cache's greedy tokens
    forced_top1: float  # same next token as the fp32 cache there
    free_equal: float  # free-running greedy: share of positions with the fp32 cache's token
    free_prefix: int  # tokens decoded before the first difference
    decoded: int


def kv_eval_ids(tokenizer_file: Path, heldout: str) -> list[int]:
    """Held-out text first, then CPython's documentation topics in reverse sorted order (kv_cache.py calibrates
    on the first tokens in sorted order, so depths up to ~100K tokens never meet calibration text)."""
    from pydoc_data.topics import topics

    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_file))
    rest = [topics[k] for i, k in enumerate(sorted(topics)) if i % 20 != 0][::-1]
    return tok.encode(heldout).ids + tok.encode("\n\n".join(rest)).ids


def _kl_top1(ref: np.ndarray, cand: np.ndarray) -> tuple[float, int]:
    ref, cand = ref.astype(np.float64), cand.astype(np.float64)
    lp_ref = ref - np.logaddexp.reduce(ref, axis=-1, keepdims=True)
    lp_cand = cand - np.logaddexp.reduce(cand, axis=-1, keepdims=True)
    return float((np.exp(lp_ref) * (lp_ref - lp_cand)).sum()), int((ref.argmax(-1) == cand.argmax(-1)).sum())


def _prefill(session, prompt: list[int], capacity: int, rows: int, chunk: int = 512):
    from ..runtime.backends.python import Cache

    cache = Cache(session, 1, capacity)
    ids = np.array([prompt])
    for s in range(0, len(prompt), chunk):
        final = s + chunk >= len(prompt)
        logits = cache.step(ids[:, s:s + chunk], last=min(rows, ids[:, s:s + chunk].shape[1]) if final else 1)
    return cache, logits[0]


def _decode(cache, first: int, n: int, forced: list[int] | None = None) -> tuple[list[int], list[np.ndarray]]:
    tokens, rows, token = [], [], first
    for i in range(n):
        tokens.append(token)
        row = cache.step(np.array([[token]]))[0, -1]
        rows.append(row)
        token = forced[i + 1] if forced is not None and i + 1 < len(forced) else int(row.argmax())
    return tokens, rows


def kv_cache_quality(reference: Path, candidates: dict[str, Path], ids: Sequence[int], depths: Sequence[int],
                     decode: int = 256, prompt_rows: int = 256,
                     progress: Callable[[str], None] = print) -> list[KvQuality]:
    """Each candidate bundle (same weights, another KV cache) against `reference` (fp32 cache): a prompt of
    `depth` tokens of `ids`, prefilled in 512-token chunks, then `decode` greedy tokens."""
    from ..runtime.backends.python import LfmSession

    ref_session = LfmSession(reference)
    sessions = {label: LfmSession(b) for label, b in candidates.items()}
    out = []
    for depth in depths:
        if depth > len(ids):
            raise ValueError(f"depth {depth}: the evaluation text has only {len(ids)} tokens")
        prompt, capacity = list(ids[:depth]), depth + decode + 1
        progress(f"depth {depth}: fp32 cache")
        cache, ref_prompt = _prefill(ref_session, prompt, capacity, prompt_rows)
        ref_tokens, ref_rows = _decode(cache, int(ref_prompt[-1].argmax()), decode)
        for label, session in sessions.items():
            progress(f"depth {depth}: {label}")
            cache, cand_prompt = _prefill(session, prompt, capacity, prompt_rows)
            prompt_kl, _ = _kl_top1(ref_prompt, cand_prompt)
            free, _ = _decode(cache, int(cand_prompt[-1].argmax()), decode)
            cache, _ = _prefill(session, prompt, capacity, 1)
            _, forced_rows = _decode(cache, ref_tokens[0], decode, forced=ref_tokens)
            kl, agree = _kl_top1(np.array(ref_rows), np.array(forced_rows))
            equal = [a == b for a, b in zip(ref_tokens, free, strict=True)]
            prefix = equal.index(False) if False in equal else len(equal)
            out.append(KvQuality(label, depth, prompt_kl / len(ref_prompt), kl / decode, agree / decode,
                                 sum(equal) / decode, prefix, decode))
    return out


def evaluate_kv_cache(checkpoint: str | Path, heldout: str, variants: Sequence[tuple[str, str, float]],
                      depths: Sequence[int], quant: str = "fp32", decode: int = 256, reference_quant: str | None = None,
                      progress: Callable[[str], None] = print) -> list[KvQuality]:
    """(label, kv_cache, margin) variants of one checkpoint's export (weights `quant`) against its fp32 cache, or,
    with `reference_quant` (e.g. "fp32" for int4 weights), against that export, the fp32 cache with `quant`
    weights then measured too."""
    from ..export.exporter import export

    work = Path(tempfile.mkdtemp(prefix="lfm-kv-quality-"))
    try:
        reference_quant = reference_quant or quant
        progress(f"exporting {reference_quant} weights with the fp32 cache")
        reference = export(checkpoint, work / "reference", quant=reference_quant).bundle
        candidates = {}
        if reference_quant != quant:
            variants = [(f"{quant} weights, fp32 cache", "fp32", 1.0), *variants]
        for label, kv, margin in variants:
            progress(f"exporting {label}")
            candidates[label] = export(checkpoint, work / f"variant{len(candidates)}", quant=quant, kv_cache=kv,
                                       kv_margin=margin).bundle
        ids = kv_eval_ids(reference / "tokenizer.json", heldout)
        return kv_cache_quality(reference, candidates, ids, depths, decode=decode, progress=progress)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def kv_quality_table(results: Sequence[KvQuality]) -> str:
    lines = ["| KV cache | depth | KL prompt | KL decode (forced) | top-1 decode (forced) | free greedy equal | "
             "first difference |", "|---|---|---|---|---|---|---|"]
    def kl(x: float) -> str:
        return f"{x:.5f}" if x >= 1e-4 else f"{x:.1e}"

    lines += [f"| {r.label} | {r.depth} | {kl(r.prompt_kl)} | {kl(r.forced_kl)} | {r.forced_top1:.1%} | "
              f"{r.free_equal:.1%} | {r.free_prefix if r.free_prefix < r.decoded else 'none'} |" for r in results]
    return "\n".join(lines) + "\n"
