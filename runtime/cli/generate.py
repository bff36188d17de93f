"""`lfm-generate BUNDLE -p TEXT`: continue a plain-text prompt (no chat template: for chat, `lfm-chat`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..backends.python import LfmSession
from ..bundle import BundleError
from ..detokenize import IncrementalDecoder
from ..generate import stream
from ..hugepages import reexec_with_hugepages
from ..sampling import Sampling


def main(argv: list[str] | None = None) -> int:
    if argv is None:  # run as a command: restart with huge pages for the weights (runtime/hugepages.py)
        reexec_with_hugepages()
    parser = argparse.ArgumentParser(prog="lfm-generate", description=__doc__)
    parser.add_argument("bundle", help="bundle folder written by lfm-export")
    parser.add_argument("-p", "--prompt", required=True)
    parser.add_argument("-n", "--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)

    from tokenizers import Tokenizer

    try:
        sampling = Sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
        model = LfmSession(args.bundle, threads=args.threads)
        tokenizer = Tokenizer.from_file(str(Path(args.bundle) / "tokenizer.json"))
    except (BundleError, ValueError, OSError, Exception) as e:  # tokenizers raises plain Exception
        print(f"lfm-generate: error: {e}", file=sys.stderr)
        return 2
    prompt = tokenizer.encode(args.prompt).ids
    decoder = IncrementalDecoder(tokenizer, skip_special_tokens=True)
    print(args.prompt, end="", flush=True)
    for step in stream(model, [prompt], args.max_new_tokens, sampling):
        if step[0] is None:
            break
        print(decoder.add(step[0]), end="", flush=True)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
