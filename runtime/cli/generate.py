"""`lfm-generate BUNDLE -p TEXT`: continue a plain-text prompt (no chat template: for chat, `lfm-chat`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tokenizers import Tokenizer

from ..backends.python import LfmSession
from ..bundle import BundleError
from ..detokenize import IncrementalDecoder
from ..files import describe, read_text
from ..generate import stream
from ..hugepages import reexec_with_hugepages
from ..sampling import Sampling
from ..threads import CLI_HELP as THREADS_HELP
from ..threads import announce, threads_arg
from . import warn_in_one_line


def main(argv: list[str] | None = None) -> int:
    if argv is None:  # run as a command: restart with huge pages for the weights (runtime/hugepages.py)
        reexec_with_hugepages()
        warn_in_one_line("lfm-generate")  # a command's warnings in its own one-line form
    parser = argparse.ArgumentParser(prog="lfm-generate", description=__doc__)
    parser.add_argument("bundle", help="bundle folder written by lfm-export")
    parser.add_argument("-p", "--prompt", required=True)
    parser.add_argument("-n", "--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--threads", type=threads_arg, default="auto", help=THREADS_HELP)
    args = parser.parse_args(argv)

    if not Path(args.bundle).is_dir():
        return _fail(f"{args.bundle}: no such folder" if not Path(args.bundle).exists() else
                     f"{args.bundle}: not a folder (a bundle is the folder lfm-export writes)")
    try:
        sampling = Sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
        model = LfmSession(args.bundle, threads=args.threads)
        tokenizer = Tokenizer.from_str(read_text(Path(args.bundle) / "tokenizer.json", 256 << 20))
        prompt = tokenizer.encode(args.prompt).ids
        steps = stream(model, [prompt], args.max_new_tokens, sampling)  # checks the numbers before it runs
    except (BundleError, ValueError) as e:
        return _fail(str(e))
    except OSError as e:
        return _fail(f"{Path(args.bundle) / 'tokenizer.json'}: cannot read it ({describe(e)})")
    except Exception as e:  # tokenizers raises plain Exception
        return _fail(f"{Path(args.bundle) / 'tokenizer.json'}: cannot load the tokenizer ({str(e)[:300]})")
    announce("lfm-generate", model.thread_choice)
    decoder = IncrementalDecoder(tokenizer, skip_special_tokens=True)
    print(args.prompt, end="", flush=True)
    try:
        for step in steps:
            if step[0] is None:
                break
            print(decoder.add(step[0]), end="", flush=True)
    except KeyboardInterrupt:  # Ctrl-C: what was written stays on the screen
        print()
        return 130
    print()
    return 0


def _fail(message: str) -> int:
    print(f"lfm-generate: error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
