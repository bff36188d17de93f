"""`lfm-bench COMMAND ...`: one tool, a subcommand per workload (`lfm-bench COMMAND --help` for each).

    speed          load, prefill and decode against the memory roofline and a peer (bench.json/md/png)
    conversation   time to first token per turn of a scripted chat: state kept, re-prefilled, llama.cpp
    long-context   a long prompt, then decode deep in the context, against llama.cpp
    coldstart      loads in fresh processes, prepack cache off / mapped / llama.cpp, alternated
    frontier       decode speed against KL: our policies and llama.cpp's formats
    quality        quantization variants (and KV caches) against fp32 on held-out text
    serve          a scripted chat through lfm-serve's HTTP API (openai client), against the Python API and
                   llama-server
    sustained      minutes of decoding: speed per 10 s window beside temperatures, CPU frequencies and memory

`lfm-bench BUNDLE ...` (a folder first) is `lfm-bench speed BUNDLE ...`. The profiling studies run as
`python -m lfm_edge.device_bench.studies.NAME` (device_bench/README.md has the table).
"""

from __future__ import annotations

import importlib
import sys

from ..runtime.hugepages import reexec_with_hugepages

COMMANDS = {  # name -> the module whose main(argv) runs it
    "speed": "speed", "conversation": "conversation", "long-context": "long_context", "coldstart": "coldstart",
    "frontier": "frontier", "quality": "quality", "serve": "serve", "sustained": "sustained",
}


def main(argv: list[str] | None = None) -> int:
    if argv is None:  # run as a command: restart with huge pages for the weights (runtime/hugepages.py)
        reexec_with_hugepages()
    args = sys.argv[1:] if argv is None else list(argv)
    if not args or args[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if args else 2
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        if name.startswith("-"):
            print(f"lfm-bench: error: expected a command ({', '.join(COMMANDS)}) or a bundle folder, got {name!r}",
                  file=sys.stderr)
            return 2
        name, rest = "speed", args  # the bundle first: the speed workload, as lfm-bench always ran
    try:
        return importlib.import_module(f"{__package__}.{COMMANDS[name]}").main(rest)
    except SystemExit as e:  # argparse's usage errors and --help: a return code, as every command's main gives
        return e.code if isinstance(e.code, int) else 2


if __name__ == "__main__":
    sys.exit(main())
