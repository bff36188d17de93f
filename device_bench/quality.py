"""`lfm-bench quality [CHECKPOINT]` (also `lfm-quant-report`): quantization variants against fp32 on held-out
text, as a table and a plot; `--llama-cpp` adds llama.cpp's own quantizations of the same checkpoint;
`--kv-cache int8 int4 --depths 1024 4096` compares KV cache precisions against the fp32 cache at depth instead.

Per variant: mean KL(fp32 || quantized) over next-token distributions, top-1 agreement with fp32, and
perplexity of both on the text; plus the bundle size, its settings as exported and its padding (export/quality.py
measures one bundle, the same way: `lfm-export --eval-text` on the same text gives the same fp32 perplexity).
Both sides run the real onnxruntime kernels (int8 activations at accuracy_level 4 included), so this is what a
phone would see.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..export.checkpoint import Checkpoint
from ..export.cli import demo_model_path
from ..export.exporter import export
from ..export.quality import (
    MAX_TOKENS,
    WINDOW,
    Quality,
    bundle_row,
    compare,
    describe_text,
    token_windows,
    window_logits,
    write_report,
)
from ..quant.policy import Policy, get_policy
from ..runtime.backends.python import Cache, LfmSession
from ..runtime.files import write_text
from .peers.gguf_writer import write_gguf
from .peers.llama_cpp import LLAMA_FORMATS, quantize
from .peers.llama_cpp import window_logits as llama_logits


@dataclass(frozen=True)
class Variant:
    label: str
    policy: Policy


def default_variants() -> list[Variant]:
    """Policies, block sizes 32/64/128 and RTN against the MSE search, as the issue asks to compare."""
    int4 = get_policy("int4")
    out = [Variant(f"int4 rtn b{b}", int4.with_overrides(block_size=b, method="rtn")) for b in (32, 64, 128)]
    out += [Variant("int4 rtn-asym b32", int4.with_overrides(block_size=32, method="rtn-asym"))]
    out += [Variant(f"int4 mse b{b}", int4.with_overrides(block_size=b, method="mse")) for b in (32, 64, 128)]
    out += [Variant("int4", int4),  # the phones' default; the report's "as exported" column has its settings
            Variant("int4-hq", get_policy("int4-hq")),
            Variant("int8", get_policy("int8"))]
    return out


def _fp32_reference(checkpoint: str | Path, text: str, window: int, max_tokens: int,
                    work: Path) -> tuple[list[list[int]], list[np.ndarray]]:
    """The evaluation windows and the fp32 export's logits on them (the export lives in `work`)."""
    fp32 = export(checkpoint, work / "fp32").bundle
    windows = token_windows(fp32 / "tokenizer.json", text, window, max_tokens)
    if not windows:
        raise ValueError("the evaluation text is too short: it needs at least two tokens")
    return windows, window_logits(fp32, windows)


def llama_cpp_formats(spec: str) -> list[tuple[str, bool]]:
    """"Q4_0,Q4_0-pure,Q4_K_M" -> [(format, pure)], checked against peers/llama_cpp.py LLAMA_FORMATS."""
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
    f32 = write_gguf(Checkpoint(checkpoint), work / "f32.gguf", f16=False)
    rows = []
    for fmt, pure in formats:
        label = f"llama.cpp {fmt}{' pure' if pure else ''}"
        progress(f"{label} of the same checkpoint")
        gguf = quantize(f32, work / f"{fmt.lower()}{'_pure' if pure else ''}.gguf", fmt, pure=pure)
        rows.append(Quality(label, "llama.cpp", round(gguf.stat().st_size / 1e6, 3),
                            **compare(reference, llama_logits(gguf, windows), windows),
                            settings=f"llama-quantize {fmt}{' --pure' if pure else ''} of an f32 GGUF"))
        gguf.unlink()
    return rows


def evaluate(checkpoint: str | Path, text: str, variants: Sequence[Variant], window: int = WINDOW,
             max_tokens: int = MAX_TOKENS, progress: Callable[[str], None] = print,
             llama_cpp: Sequence[tuple[str, bool]] = ()) -> list[Quality]:
    """Each variant, then each llama.cpp (format, pure) in `llama_cpp`, against the fp32 export."""
    work = Path(tempfile.mkdtemp(prefix="lfm-quality-"))
    try:
        progress("exporting fp32 reference")
        windows, reference = _fp32_reference(checkpoint, text, window, max_tokens, work)
        results = []
        for v in variants:
            progress(f"{v.label}: export and evaluate")
            bundle = export(checkpoint, work / "variant", quant=v.policy).bundle
            results.append(bundle_row(v.label, v.policy, bundle, reference, windows))
            shutil.rmtree(bundle)
        if llama_cpp:
            results += _llama_cpp_rows(checkpoint, windows, reference, work, llama_cpp, progress)
        return results
    finally:
        shutil.rmtree(work, ignore_errors=True)


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lfm-bench quality", description=__doc__)
    parser.add_argument("checkpoint", nargs="?", help="checkpoint folder (default: the bundled demo model)")
    parser.add_argument("--text", help="held-out text file (default: the demo model's heldout.txt)")
    parser.add_argument("--out", default="build/quality", help="report folder")
    parser.add_argument("--window", type=int, default=WINDOW, help="tokens per evaluation window")
    parser.add_argument("--max-tokens", type=int, default=MAX_TOKENS, help="evaluate at most the text's first N tokens")
    parser.add_argument("--llama-cpp", nargs="?", const="Q4_0,Q4_0-pure", default=None, metavar="FORMATS",
                        help="also llama.cpp's own quantizations of the same checkpoint, comma-separated "
                        "llama-quantize names, -pure for one type everywhere (default Q4_0,Q4_0-pure; e.g. "
                        "Q4_0,Q4_K_M,Q3_K_M,Q2_K; needs the [llama] extra)")
    parser.add_argument("--policies", help="comma-separated policy names to measure instead of the default variants "
                        "(e.g. int4,int3-experts,int2-experts)")
    parser.add_argument("--kv-cache", nargs="+", choices=("int8", "int4"), default=None,
                        help="measure these KV cache precisions against the fp32 cache (at --depths) instead")
    parser.add_argument("--kv-margins", type=float, nargs="+", default=[1.25], help="with --kv-cache")
    parser.add_argument("--depths", type=int, nargs="+", default=[1024, 4096, 16384], help="with --kv-cache")
    parser.add_argument("--decode", type=int, default=256, help="with --kv-cache: greedy tokens after each prompt")
    parser.add_argument("--weights", default="fp32", help="with --kv-cache: the weights' quantization policy")
    parser.add_argument("--reference-weights", default=None,
                        help="with --kv-cache: compare against this policy's export with the fp32 cache (default: "
                             "--weights), e.g. fp32 to see a quantized cache next to the weights' own cost")
    args = parser.parse_args(argv)

    checkpoint = Path(args.checkpoint) if args.checkpoint else demo_model_path()
    text_file = Path(args.text) if args.text else checkpoint / "heldout.txt"
    if not text_file.is_file():
        print(f"lfm-bench quality: error: --text {text_file}: no such file", file=sys.stderr)
        return 2
    formats: list[tuple[str, bool]] = []
    if args.llama_cpp:
        try:
            formats = llama_cpp_formats(args.llama_cpp)
        except ValueError as e:
            print(f"lfm-bench quality: error: {e}", file=sys.stderr)
            return 2
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            print("lfm-bench quality: error: --llama-cpp needs llama-cpp-python (pip install 'lfm-edge[llama]')",
                  file=sys.stderr)
            return 2
    if args.kv_cache:
        variants = [(f"{kv} margin {m}", kv, m) for kv in args.kv_cache for m in args.kv_margins]
        try:
            kv_results = evaluate_kv_cache(checkpoint, text_file.read_text(), variants, args.depths, args.weights,
                                           args.decode, args.reference_weights,
                                           progress=lambda msg: print(f"  {msg}", file=sys.stderr, flush=True))
        except ValueError as e:
            print(f"lfm-bench quality: error: {e}", file=sys.stderr)
            return 2
        table = kv_quality_table(kv_results)
        Path(args.out).mkdir(parents=True, exist_ok=True)
        write_text(Path(args.out) / "kv_cache.md", table)
        print(table)
        print(f"Wrote {Path(args.out) / 'kv_cache.md'}")
        return 0
    try:
        variants = default_variants() if not args.policies else \
            [Variant(name, get_policy(name)) for name in args.policies.split(",") if name]
        results = evaluate(checkpoint, text_file.read_text(), variants, args.window, args.max_tokens,
                           progress=lambda msg: print(f"  {msg}", file=sys.stderr, flush=True),
                           llama_cpp=formats)
    except ValueError as e:
        print(f"lfm-bench quality: error: {e}", file=sys.stderr)
        return 2
    text = describe_text(text_file.name, text_file.read_text(), args.window, args.max_tokens)
    files = write_report(results, Path(args.out), f"{checkpoint.name} on {text_file.name}", text)
    print(Path(files[1]).read_text())
    print("Wrote " + ", ".join(str(f) for f in files))
    return 0


if __name__ == "__main__":
    sys.exit(main())
