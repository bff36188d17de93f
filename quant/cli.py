"""`lfm-quant-report [CHECKPOINT] --text FILE`: quantization variants against fp32, as a table and a plot.
`--kv-cache int8 int4 --depths 1024 4096`: KV cache precisions against the fp32 cache at depth instead."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .policy import get_policy
from .quality import Variant, default_variants, evaluate, write_report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lfm-quant-report", description=__doc__)
    parser.add_argument("checkpoint", nargs="?", help="checkpoint folder (default: the bundled demo model)")
    parser.add_argument("--text", help="held-out text file (default: the demo model's heldout.txt)")
    parser.add_argument("--out", default="build/quality", help="report folder")
    parser.add_argument("--window", type=int, default=128, help="tokens per evaluation window")
    parser.add_argument("--max-tokens", type=int, default=8192)
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

    from ..export.cli import demo_model_path

    checkpoint = Path(args.checkpoint) if args.checkpoint else demo_model_path()
    text_file = Path(args.text) if args.text else checkpoint / "heldout.txt"
    if not text_file.is_file():
        print(f"lfm-quant-report: error: --text {text_file}: no such file", file=sys.stderr)
        return 2
    formats: list[tuple[str, bool]] = []
    if args.llama_cpp:
        from .quality import llama_cpp_formats

        try:
            formats = llama_cpp_formats(args.llama_cpp)
        except ValueError as e:
            print(f"lfm-quant-report: error: {e}", file=sys.stderr)
            return 2
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            print("lfm-quant-report: error: --llama-cpp needs llama-cpp-python (pip install 'lfm-edge[llama]')",
                  file=sys.stderr)
            return 2
    if args.kv_cache:
        from .quality import evaluate_kv_cache, kv_quality_table

        variants = [(f"{kv} margin {m}", kv, m) for kv in args.kv_cache for m in args.kv_margins]
        try:
            kv_results = evaluate_kv_cache(checkpoint, text_file.read_text(), variants, args.depths, args.weights,
                                           args.decode, args.reference_weights,
                                           progress=lambda msg: print(f"  {msg}", file=sys.stderr, flush=True))
        except ValueError as e:
            print(f"lfm-quant-report: error: {e}", file=sys.stderr)
            return 2
        table = kv_quality_table(kv_results)
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "kv_cache.md").write_text(table)
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
        print(f"lfm-quant-report: error: {e}", file=sys.stderr)
        return 2
    files = write_report(results, Path(args.out), f"{checkpoint.name} on {text_file.name}")
    print(Path(files[1]).read_text())
    print("Wrote " + ", ".join(str(f) for f in files))
    return 0


if __name__ == "__main__":
    sys.exit(main())
