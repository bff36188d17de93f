"""`lfm-chat BUNDLE`: chat in the terminal, streaming; `-p "..."` answers one prompt and exits.

The chat is one Conversation (runtime/conversation.py): each turn prefills only what is new, and the numbers
after each answer say how many tokens were reused and how many prefilled. `--session FILE` continues a saved
conversation and saves it after every turn. Ctrl-C during an answer stops it (what was written stays in the
conversation); Ctrl-C or Ctrl-D at the prompt leaves, saving the session. A pasted block of lines is one turn
(the terminal's bracketed paste), and so is a line ending in a backslash with the lines after it.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..bundle import BundleError
from ..conversation import Conversation
from ..demo_tools import DEMO_TOOLS
from ..events import Done, ReasoningDelta, TextDelta, ToolCallEvent, ToolResult
from ..files import describe, read_text
from ..hugepages import reexec_with_hugepages
from ..model import LfmModel
from ..statefile import StateFileError
from ..threads import CLI_HELP as THREADS_HELP
from ..threads import announce, threads_arg
from . import warn_in_one_line

COMMANDS = {"/help": "this list", "/reset": "start a fresh conversation (the system prompt stays)",
            "/tools": "the tools the model may call", "/stats": "the last answer's numbers",
            "/save FILE": "save the conversation (state included) to FILE",
            "/load FILE": "continue the conversation saved in FILE", "/quit": "leave (also Ctrl-D, Ctrl-C)"}
PASTE_START, PASTE_END = "\x1b[200~", "\x1b[201~"  # what a terminal in bracketed-paste mode wraps a paste in


def main(argv: list[str] | None = None) -> int:
    if argv is None:  # run as a command: restart with huge pages for the weights (runtime/hugepages.py)
        reexec_with_hugepages()
        warn_in_one_line("lfm-chat")  # a command's warnings in its own one-line form
    parser = argparse.ArgumentParser(prog="lfm-chat", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", help="bundle folder written by lfm-export")
    parser.add_argument("-p", "--prompt", help="answer this one prompt and exit")
    parser.add_argument("-s", "--system", help="system prompt")
    parser.add_argument("-n", "--max-new-tokens", type=int, default=512)
    parser.add_argument("--temperature", type=float, default=None, help="default: the checkpoint's")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--threads", type=threads_arg, default="auto", help=THREADS_HELP)
    parser.add_argument("--prepack-cache", choices=["off", "use", "auto"], default="off",
                        help="map the repacked weights from BUNDLE/prepacked/ instead of holding a copy in memory; "
                             "'auto' writes it at this load if missing (~2x the weights on disk; runtime/README.md)")
    parser.add_argument("--verify", choices=["size", "sampled", "sha256"], default="sampled",
                        help="how the bundle's files are checked against its manifest at load (sha256: every byte)")
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
            schema = json.loads(read_text(args.json_schema, 16 << 20))
        except (OSError, ValueError) as e:
            reason = describe(e) if isinstance(e, OSError) else str(e)
            return _fail(f"--json-schema {args.json_schema}: not a readable JSON schema ({reason})")
    if not Path(args.bundle).is_dir():
        return _fail(f"{args.bundle}: no such folder" if not Path(args.bundle).exists() else
                     f"{args.bundle}: not a folder (a bundle is the folder lfm-export writes)")
    try:
        model = LfmModel(args.bundle, threads=args.threads, prepack_cache=args.prepack_cache, verify=args.verify)
        sampling = model.default_sampling(temperature=args.temperature, seed=args.seed)
        if args.session and Path(args.session).exists():
            conversation = model.load_conversation(args.session, tools)
            print(f"lfm-chat: continuing {args.session} ({_turns(conversation.turns)}, {len(conversation.tokens)} "
                  "tokens of state)", file=sys.stderr)
        else:
            conversation = model.conversation(args.system, tools)
    except (BundleError, StateFileError, ValueError, OSError) as e:
        return _fail(str(e))
    if not (Path(args.bundle) / "manifest.json").is_file():
        print(f"lfm-chat: warning: {args.bundle} has no manifest.json, so its files cannot be verified",
              file=sys.stderr)
    print(f"lfm-chat: {args.bundle} on {model.session.provider_choice.providers[0]} "
          f"({model.session.provider_choice.reason}); {model.session.prepack.message()}", file=sys.stderr)
    announce("lfm-chat", model.session.thread_choice)
    chat = _Chat(model, conversation, tools, sampling, args, schema)
    if args.prompt is not None:
        return chat.turn(args.prompt, one_shot=True)
    return chat.interactive()


class _Chat:
    """The interactive loop's state: the conversation (replaced by /load and /reset), the last answer."""

    def __init__(self, model: LfmModel, conversation: Conversation, tools: dict, sampling: Any, args: Any,
                 schema: Any = None):
        self.model, self.conversation, self.tools, self.sampling, self.args = model, conversation, tools, sampling, args
        self.schema = schema
        self.last: Done | None = None
        self.color = sys.stderr.isatty()

    def interactive(self) -> int:
        paste = sys.stdin.isatty() and sys.stdout.isatty()
        if paste:
            print("\x1b[?2004h", end="", flush=True)  # bracketed paste: a pasted block arrives as one
        try:
            while True:
                try:
                    line = _read_turn()
                except (EOFError, KeyboardInterrupt):  # Ctrl-D or Ctrl-C at the prompt: leave, saving the session
                    print(file=sys.stderr)
                    self.save_session()
                    return 0
                if line is None:
                    continue
                if line.startswith("/") and "\n" not in line:
                    if self.command(line):
                        return 0
                    continue
                self.turn(line)
        finally:
            if paste:
                print("\x1b[?2004l", end="", flush=True)

    def command(self, line: str) -> bool:
        """Run a /command; True when it asks to leave. Nothing typed as a command reaches the model."""
        name, _, rest = line.partition(" ")
        rest = rest.strip()
        if name in ("/quit", "/exit"):
            self.save_session()
            return True
        if name == "/help":
            for usage, what in COMMANDS.items():
                print(f"  {usage:<12} {what}")
        elif name == "/reset":
            self.conversation.reset()
            print("(conversation cleared)")
        elif name == "/tools":
            for tool, fn in self.tools.items():
                print(f"  {tool}: {(fn.__doc__ or '').strip().splitlines()[0]}")
            if not self.tools:
                print("  (no tools: --no-tools)")
        elif name == "/stats":
            print(json.dumps(_stats(self.last), default=str, indent=2) if self.last else "(no answer yet)")
        elif name in ("/save", "/load"):
            if not rest:
                print(f"lfm-chat: {name} needs a file: {name} FILE", file=sys.stderr)
            elif name == "/save":
                self.save(rest)
            else:
                self.load(rest)
        else:
            print(f"lfm-chat: unknown command {name} (/help lists them)", file=sys.stderr)
        return False

    def save(self, path: str) -> bool:
        try:
            size = self.conversation.save(path)
        except (OSError, ValueError) as e:
            reason = describe(e) if isinstance(e, OSError) else str(e)
            print(f"lfm-chat: could not save to {path} ({reason}); the conversation is as it was", file=sys.stderr)
            return False
        print(f"(saved {_turns(self.conversation.turns)}, {size / 1e6:.1f} MB, to {path})")
        return True

    def load(self, path: str) -> None:
        try:
            loaded = self.model.load_conversation(path, self.tools)
        except (StateFileError, ValueError, OSError) as e:
            print(f"lfm-chat: {e}; the open conversation is kept", file=sys.stderr)
            return
        self.conversation = loaded
        print(f"(loaded {_turns(loaded.turns)}, {len(loaded.tokens)} tokens of state, from {path})")

    def save_session(self) -> None:
        if self.args.session and self.conversation.turns:
            self.save_quietly(self.args.session)

    def save_quietly(self, path: str) -> bool:
        try:
            self.conversation.save(path)
            return True
        except (OSError, ValueError) as e:
            reason = describe(e) if isinstance(e, OSError) else str(e)
            print(f"lfm-chat: could not save the session to {path} ({reason}); the conversation is as it was",
                  file=sys.stderr)
            return False

    def turn(self, line: str, one_shot: bool = False) -> int:
        held = {"response_format": self.schema, "reasoning_budget": self.args.reasoning_budget}
        cancel = threading.Event()
        try:
            with _sigint_sets(cancel):
                answer = self._run(line, cancel, **held)
        except ValueError as e:  # the context is full, the schema does not compile, the template refuses
            print(f"lfm-chat: {e}", file=sys.stderr)
            return 2 if one_shot else 0
        self.last = answer
        if self.args.session:
            self.save_quietly(self.args.session)
        return 0

    def _run(self, line: str, cancel: threading.Event, **held: Any) -> Done:
        quiet_text = held.get("response_format") is not None  # the JSON is printed once, at the end

        def show(event: Any) -> None:
            if isinstance(event, ReasoningDelta):
                print(self._dim(event.text), end="", flush=True, file=sys.stderr if quiet_text else sys.stdout)
            elif isinstance(event, TextDelta) and not quiet_text:
                print(event.text, end="", flush=True)
            elif isinstance(event, ToolCallEvent):
                print(f"\n[tool call: {event.error or ', '.join(c.name for c in event.calls)}]", flush=True,
                      file=sys.stderr if quiet_text else sys.stdout)
            elif isinstance(event, ToolResult):
                print(f"[{event.call.name} -> {event.content}]", flush=True,
                      file=sys.stderr if quiet_text else sys.stdout)

        conversation = self.conversation
        first = len(conversation.stats)
        run = conversation.run_tools(line, on_event=show, sampling=self.sampling,
                                     max_new_tokens=self.args.max_new_tokens, cancel=cancel, **held)
        rounds = conversation.stats[first:]
        stats = run.answer.stats
        if quiet_text:
            print(json.dumps(run.answer.parsed) if stats.constraint_satisfied else
                  "(the answer did not complete its schema within --max-new-tokens)")
        else:
            print()
        if stats.stopped == "cancelled":
            print(self._dim("(stopped; what was written stays in the conversation)"), file=sys.stderr)
        if stats.reasoning_forced:
            print(self._dim(f"(thinking ended after {stats.thinking_tokens} tokens: {stats.reasoning_forced})"),
                  file=sys.stderr)
        print(self._dim(f"({stats.generated_tokens} tokens, {stats.decode_tokens_per_second:.1f} tok/s, first token "
                        f"{rounds[0].time_to_first_token * 1000:.0f} ms; state {stats.state_tokens} tokens, "
                        f"{sum(r.reused_tokens for r in rounds)} reused, "
                        f"{sum(r.prefilled_tokens for r in rounds)} prefilled)"), file=sys.stderr)
        return run.answer

    def _dim(self, text: str) -> str:
        return f"\033[2m{text}\033[0m" if self.color else text


def _read_turn() -> str | None:
    """One turn from the prompt: a line; a bracketed paste (several lines); or lines joined while each ends in a
    backslash. None for an empty line."""
    line = input("you> ")
    if line.startswith(PASTE_START):
        parts = [line[len(PASTE_START):]]
        while PASTE_END not in parts[-1]:
            parts.append(input())
        parts[-1] = parts[-1].split(PASTE_END)[0]
        text = "\n".join(parts)
    else:
        parts = [line]
        while parts[-1].endswith("\\"):
            parts[-1] = parts[-1][:-1]
            parts.append(input("...> "))
        text = "\n".join(parts)
    text = text.strip()
    return text or None


@contextmanager
def _sigint_sets(cancel: threading.Event) -> Iterator[None]:
    """While an answer is generated, Ctrl-C sets `cancel` (the generation stops at its next token, and what it
    wrote stays) instead of raising KeyboardInterrupt somewhere inside a step."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, lambda *_: cancel.set())
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _stats(done: Done) -> dict:
    stats = dict(done.stats.__dict__)
    stats["prefilled_tokens"] = done.stats.prefilled_tokens
    stats.pop("mask_seconds", None)
    return stats


def _turns(n: int) -> str:
    return f"{n} turn" if n == 1 else f"{n} turns"


def _fail(message: str) -> int:
    print(f"lfm-chat: error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
