"""`lfm-chat BUNDLE`: chat in the terminal, streaming; `-p "..."` answers one prompt and exits.

The chat is one Conversation (runtime/conversation.py): each turn prefills only what is new, and the numbers
after each answer say how many tokens were reused and how many prefilled. `--session FILE` continues a saved
conversation and saves it after every turn.

Commands in the interactive chat: /reset starts a fresh conversation, /tools lists the demo tools (the model
may call them; calls and results are shown), /stats shows the last generation's numbers, /save FILE and
/load FILE keep a conversation for later, /quit leaves.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ..bundle import BundleError
from ..conversation import Conversation
from ..demo_tools import DEMO_TOOLS
from ..events import Done, ReasoningDelta, TextDelta, ToolCallEvent, ToolResult
from ..hugepages import reexec_with_hugepages
from ..model import LfmModel
from ..statefile import StateFileError


def main(argv: list[str] | None = None) -> int:
    if argv is None:  # run as a command: restart with huge pages for the weights (runtime/hugepages.py)
        reexec_with_hugepages()
    parser = argparse.ArgumentParser(prog="lfm-chat", description=__doc__)
    parser.add_argument("bundle", help="bundle folder written by lfm-export")
    parser.add_argument("-p", "--prompt", help="answer this one prompt and exit")
    parser.add_argument("-s", "--system", help="system prompt")
    parser.add_argument("-n", "--max-new-tokens", type=int, default=512)
    parser.add_argument("--temperature", type=float, default=None, help="default: the checkpoint's")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--prepack-cache", choices=["off", "use", "auto"], default="off",
                        help="map the repacked weights from BUNDLE/prepacked/ instead of holding a copy in memory; "
                             "'auto' writes it at this load if missing (~2x the weights on disk; runtime/README.md)")
    parser.add_argument("--no-tools", action="store_true", help="do not offer the demo tools")
    parser.add_argument("--session", help="a saved conversation to continue (if the file exists), saved after "
                                          "every turn")
    parser.add_argument("--json-schema", help="a JSON schema file: every answer is a JSON document of it "
                                              "(constrained decoding), printed as one line of JSON")
    parser.add_argument("--reasoning-budget", type=int, default=None, help="thinking tokens allowed per answer "
                        "(0: answer without thinking); default: no limit")
    args = parser.parse_args(argv)
    tools = {} if args.no_tools else DEMO_TOOLS
    schema = None
    if args.json_schema:
        try:
            schema = json.loads(Path(args.json_schema).read_text())
        except (OSError, ValueError) as e:
            print(f"lfm-chat: error: {args.json_schema}: not a readable JSON schema ({e})", file=sys.stderr)
            return 2
    try:
        model = LfmModel(args.bundle, threads=args.threads, prepack_cache=args.prepack_cache)
        sampling = model.default_sampling(temperature=args.temperature, seed=args.seed)
        if args.session and Path(args.session).is_file():
            conversation = model.load_conversation(args.session, tools)
            print(f"lfm-chat: continuing {args.session} ({conversation.turns} turns, {len(conversation.tokens)} "
                  "tokens of state)", file=sys.stderr)
        else:
            conversation = model.conversation(args.system, tools)
    except (BundleError, StateFileError, ValueError, OSError) as e:
        print(f"lfm-chat: error: {e}", file=sys.stderr)
        return 2
    print(f"lfm-chat: {args.bundle} on {model.session.provider_choice.providers[0]} "
          f"({model.session.provider_choice.reason}); {model.session.prepack.message()}", file=sys.stderr)
    last: Done | None = None
    while True:
        if args.prompt is not None:
            line = args.prompt
        else:
            try:
                line = input("you> ").strip()
            except EOFError:
                return 0
        if line in ("/quit", "/exit"):
            return 0
        if line == "/reset":
            conversation.reset()
            print("(conversation cleared)")
            continue
        if line.startswith(("/save ", "/load ")):
            conversation = _save_or_load(model, conversation, line, tools)
            continue
        if line == "/tools":
            for name, fn in tools.items():
                print(f"  {name}: {(fn.__doc__ or '').strip().splitlines()[0]}")
            continue
        if line == "/stats":
            print(json.dumps(last.stats.__dict__ if last else {}, default=str, indent=2))
            continue
        if not line:
            continue
        try:
            last = _turn(conversation, line, sampling, args.max_new_tokens, response_format=schema,
                         reasoning_budget=args.reasoning_budget)
        except ValueError as e:  # e.g. the context is full, or the schema does not compile
            print(f"lfm-chat: {e}", file=sys.stderr)
            if args.prompt is not None:
                return 2
            continue
        if args.session:
            conversation.save(args.session)
        if args.prompt is not None:
            return 0


def _save_or_load(model: LfmModel, conversation: Conversation, line: str, tools: dict) -> Conversation:
    command, path = line.split(maxsplit=1)
    try:
        if command == "/save":
            size = conversation.save(path)
            print(f"(saved {conversation.turns} turns, {size / 1e6:.1f} MB, to {path})")
            return conversation
        loaded = model.load_conversation(path, tools)
        print(f"(loaded {loaded.turns} turns, {len(loaded.tokens)} tokens of state, from {path})")
        return loaded
    except (StateFileError, ValueError, OSError) as e:
        print(f"lfm-chat: {e}", file=sys.stderr)
        return conversation


def _turn(conversation: Conversation, line: str, sampling, max_new_tokens: int, **held: Any) -> Done:
    def show(event) -> None:
        if isinstance(event, ReasoningDelta):
            print(f"\033[2m{event.text}\033[0m", end="", flush=True)
        elif isinstance(event, TextDelta):
            print(event.text, end="", flush=True)
        elif isinstance(event, ToolCallEvent):
            print(f"\n[tool call: {event.error or ', '.join(c.name for c in event.calls)}]", flush=True)
        elif isinstance(event, ToolResult):
            print(f"[{event.call.name} -> {event.content}]", flush=True)

    first = len(conversation.stats)
    run = conversation.run_tools(line, on_event=show, sampling=sampling, max_new_tokens=max_new_tokens, **held)
    rounds = conversation.stats[first:]
    stats = run.answer.stats
    if held.get("response_format") is not None:
        print()
        print(json.dumps(run.answer.parsed) if stats.constraint_satisfied else
              "(the answer did not complete its schema within --max-new-tokens)")
    if stats.reasoning_forced:
        print(f"\n\033[2m(thinking ended after {stats.thinking_tokens} tokens: {stats.reasoning_forced})\033[0m",
              file=sys.stderr)
    print(f"\n\033[2m({stats.generated_tokens} tokens, {stats.decode_tokens_per_second:.1f} tok/s, "
          f"first token {rounds[0].time_to_first_token * 1000:.0f} ms; state {stats.state_tokens} tokens, "
          f"{sum(r.reused_tokens for r in rounds)} reused, {sum(r.prefilled_tokens for r in rounds)} prefilled)"
          "\033[0m", file=sys.stderr)
    return run.answer


if __name__ == "__main__":
    sys.exit(main())
