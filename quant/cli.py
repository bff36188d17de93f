"""`lfm-quant-report [CHECKPOINT] --text FILE`: quantization variants against fp32, as a table and a plot."""

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
    parser.add_argument("--llama-cpp", action="store_true",
                        help="also llama.cpp's Q4_0 of the same checkpoint (needs the [llama] extra)")
    parser.add_argument("--policies", help="comma-separated policy names to measure instead of the default variants "
                        "(e.g. int4,int3-experts,int2-experts)")
    args = parser.parse_args(argv)

    from ..export.cli import demo_model_path

    checkpoint = Path(args.checkpoint) if args.checkpoint else demo_model_path()
    text_file = Path(args.text) if args.text else checkpoint / "heldout.txt"
    if not text_file.is_file():
        print(f"lfm-quant-report: error: --text {text_file}: no such file", file=sys.stderr)
        return 2
    if args.llama_cpp:
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            print("lfm-quant-report: error: --llama-cpp needs llama-cpp-python (pip install 'lfm-edge[llama]')",
                  file=sys.stderr)
            return 2
    try:
        variants = default_variants() if not args.policies else \
            [Variant(name, get_policy(name)) for name in args.policies.split(",") if name]
        results = evaluate(checkpoint, text_file.read_text(), variants, args.window, args.max_tokens,
                           progress=lambda msg: print(f"  {msg}", file=sys.stderr, flush=True),
                           llama_cpp=args.llama_cpp)
    except ValueError as e:
        print(f"lfm-quant-report: error: {e}", file=sys.stderr)
        return 2
    files = write_report(results, Path(args.out), f"{checkpoint.name} on {text_file.name}")
    print(Path(files[1]).read_text())
    print("Wrote " + ", ".join(str(f) for f in files))
    return 0


if __name__ == "__main__":
    sys.exit(main())
