"""`lfm-serve BUNDLE`: the OpenAI-compatible chat-completions API over a bundle, on loopback by default.

    lfm-serve build/demo_model-int4-contrib --port 8000 [--api-key KEY]
    # then any OpenAI client: base_url="http://127.0.0.1:8000/v1", model = the bundle folder's name

Kept conversation states make a resent history prefill only what is new (runtime/serve/states.py).
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
from pathlib import Path

from ..bundle import BundleError
from ..hugepages import reexec_with_hugepages
from ..model import LfmModel
from ..threads import CLI_HELP as THREADS_HELP
from ..threads import announce, threads_arg
from . import warn_in_one_line

try:
    import uvicorn

    from ..serve import ServeOptions, create_app
except ImportError as e:  # the [serve] extra is not installed
    uvicorn = None
    MISSING = str(e)


def main(argv: list[str] | None = None) -> int:
    if argv is None:  # run as a command: restart with huge pages for the weights (runtime/hugepages.py)
        reexec_with_hugepages()
        warn_in_one_line("lfm-serve")  # a command's warnings in its own one-line form
    parser = argparse.ArgumentParser(prog="lfm-serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", help="bundle folder written by lfm-export")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` on every request")
    parser.add_argument("--threads", type=threads_arg, default="auto", help=THREADS_HELP)
    parser.add_argument("--model-id", default=None, help="the model's name in the API (default: the folder's name)")
    parser.add_argument("--state-mb", type=float, default=256, help="memory for kept conversation states (LRU)")
    parser.add_argument("--queue", type=int, default=8, help="requests that may wait for the generation slot")
    parser.add_argument("--prepack-cache", choices=["off", "use", "auto"], default="off")
    args = parser.parse_args(argv)
    if uvicorn is None:
        print(f"lfm-serve: error: the server needs the [serve] extra: pip install 'lfm-edge[serve]' ({MISSING})",
              file=sys.stderr)
        return 2
    if not Path(args.bundle).is_dir():
        print(f"lfm-serve: error: {args.bundle}: no such folder", file=sys.stderr)
        return 2
    try:
        model = LfmModel(args.bundle, threads=args.threads, prepack_cache=args.prepack_cache)
    except (BundleError, ValueError, OSError) as e:
        print(f"lfm-serve: error: {e}", file=sys.stderr)
        return 2
    if not _loopback(args.host):
        print(f"lfm-serve: warning: listening on {args.host}: other machines can reach this model"
              + ("" if args.api_key else " with no API key (--api-key)"), file=sys.stderr)
    options = ServeOptions(model_id=args.model_id or Path(os.path.abspath(args.bundle)).name, api_key=args.api_key,
                           state_bytes=int(args.state_mb * (1 << 20)), queue=args.queue)
    print(f"lfm-serve: {options.model_id} at http://{args.host}:{args.port}/v1 "
          f"({model.session.provider_choice.providers[0]}; {model.session.prepack.message()})", file=sys.stderr)
    announce("lfm-serve", model.session.thread_choice)
    uvicorn.run(create_app(model, options), host=args.host, port=args.port, log_level="warning", http="h11",
                loop="asyncio", timeout_keep_alive=5)
    return 0


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


if __name__ == "__main__":
    sys.exit(main())
