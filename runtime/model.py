"""The API an app codes against: a loaded model that chats, streams typed events, and runs tools.

    model = LfmModel("build/bundle")
    for event in model.stream([{"role": "user", "content": "Hi"}]):
        ...                                  # TextDelta / ReasoningDelta / ToolCallEvent, then Done
    result = model.run_tools(messages, tools={"get_weather": get_weather})

One LfmModel serves any number of conversations, from any number of threads: each generation has its
own state buffers; the session and tokenizer are shared (both are safe to share).
"""

from __future__ import annotations

import re
import threading
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from .backend import Session
from .bundle import BundleError, bundle_identity, read_generation_config
from .constrain import AfterReasoning, Constraints, ReasoningControl, ToolChoice
from .constrain import response_format as to_format
from .conversation import Conversation
from .detokenize import IncrementalDecoder
from .encode import PieceEncoder
from .events import Done, Event, ReasoningDelta, TextDelta, ToolCallEvent, ToolRun
from .files import describe, read_text
from .generate import Generation
from .memory import release_free_heap
from .prefixcache import PrefixCache
from .pressure import TrimLevel
from .sampling import Sampling
from .schemas import function_schema, tool_schema
from .templates import ChatTemplate
from .toolcalls import StreamParser
from .tools import tool_loop

__all__ = ["LfmModel"]

MAX_TOKENIZER_BYTES = 256 << 20  # tokenizer.json of a 128K vocabulary is ~10 MB

THINK_START = "<think>"
_SENTINEL = ("\ue000", "\ue001")  # private-use characters marking where a typed special string was
_SENTINEL_RE = re.compile("\ue000(\\d+)\ue001")


def _check_text(messages: Sequence[Mapping[str, Any]]) -> None:
    """Messages are a list of {"role": str, ...} dicts, and their text is encodable (a str with lone surrogates,
    e.g. from mis-decoded bytes, is not)."""
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
        raise TypeError(f"messages: expected a list of {{'role': ..., 'content': ...}} dicts, got a "
                        f"{type(messages).__name__}; one user message is [{{'role': 'user', 'content': text}}]")
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
            raise TypeError(f"messages[{i}]: expected a dict with a 'role' string, got {message!r:.60}")
        content = message.get("content")
        if isinstance(content, bytes):
            raise ValueError(f"messages[{i}].content is bytes: decode it first (e.g. .decode('utf-8', "
                             "errors='replace'))")
        if isinstance(content, str):
            try:
                content.encode("utf-8")
            except UnicodeEncodeError as e:
                raise ValueError(f"messages[{i}].content is not valid text ({e.reason} at {e.start}); decode "
                                 "input with errors='replace'") from None


class LfmModel:
    """A loaded bundle: its session, tokenizer, chat template and sampling defaults, and what is kept between
    generations (the prefix cache, the constraint vocabulary)."""

    def __init__(self, bundle: str | Path, threads: int | str | None = None, providers: Any = "auto",
                 verify: str = "sampled", session: Session | None = None, prefix_cache_bytes: int = 64 << 20,
                 prefix_cache_dir: str | Path | None = None, prepack_cache: str = "off",
                 threads_cache: str | Path | None = None):
        """`session`: an already-loaded backend (runtime/backend.py's Session: LfmSession, or a phone
        backend from backends.open_session); by default the bundle is loaded with onnxruntime's Python binding
        (`threads` (a count, None or "auto": runtime/threads.py), `threads_cache`, `providers`, `verify`,
        `prepack_cache`: see backends/python.py LfmSession).
        `prefix_cache_bytes`: RAM for the state after shared conversation prefixes (0: none);
        `prefix_cache_dir`: also keep them in files there, across restarts (prefixcache.py)."""
        self.folder = Path(bundle)
        if session is None:
            from .backends.python import LfmSession  # onnxruntime's Python binding: imported where it is used

            session = LfmSession(bundle, threads=threads, providers=providers, verify=verify,
                                 prepack_cache=prepack_cache, threads_cache=threads_cache)
        self.session: Session = session
        path = self.folder / "tokenizer.json"
        try:
            text = read_text(path, MAX_TOKENIZER_BYTES)  # a FIFO or a device is refused before it is read
            self.tokenizer = Tokenizer.from_str(text)
        except OSError as e:
            raise BundleError(f"{path}: cannot read it ({describe(e)})") from None
        except UnicodeDecodeError:
            raise BundleError(f"{path}: not UTF-8 text") from None
        except Exception as e:  # tokenizers raises plain Exception
            raise BundleError(f"{path}: cannot load the tokenizer ({str(e)[:300]})") from None
        # A second tokenizer that reads special-token strings as plain text, for what users and tools wrote
        # (a separate instance: the flag is per tokenizer, and this one is shared across threads).
        self._literal = Tokenizer.from_str(text)
        self._literal.encode_special_tokens = True
        self._specials = sorted((t.content for t in self.tokenizer.get_added_tokens_decoder().values() if t.special),
                                key=len, reverse=True)
        self.template = ChatTemplate.from_folder(self.folder)
        self._encoder = PieceEncoder(self.tokenizer)  # a turn encodes only its new text (encode.py)
        self.template.max_chars = max(self.template.max_chars, session.context_length * 64)
        self.constraints = Constraints(self.tokenizer, text, session.vocab_size, session.eos_token_ids)
        self._identity: str | None = None
        self.prefix_cache = PrefixCache(prefix_cache_bytes, prefix_cache_dir,
                                        self.identity if prefix_cache_dir is not None else None)
        self.generation_config = read_generation_config(self.folder)
        self._conversations: weakref.WeakSet[Conversation] = weakref.WeakSet()  # trim_memory reaches them
        self._conversations_lock = threading.Lock()

    def default_sampling(self, **overrides: Any) -> Sampling:
        """The checkpoint's recommended sampling (generation_config.json), with overrides."""
        return Sampling.from_generation_config(self.generation_config, **overrides)

    def prompt_ids(self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Any] | None = None,
                   allow_special_tokens: bool = False, add_generation_prompt: bool = True,
                   **template_vars: Any) -> list[int]:
        """Token ids of the rendered conversation. Special-token strings inside user and tool messages and inside
        the tools' schemas stay text (a user typing "<|im_end|>", or a tool description holding it, must not end
        the turn) unless `allow_special_tokens`."""
        _check_text(messages)
        template_vars["add_generation_prompt"] = add_generation_prompt
        if allow_special_tokens:
            text = self.template.render(messages, tools=tools, **template_vars)
            return self._encoder.encode(text)
        literals: list[str] = []

        def shield(content: Any) -> Any:
            """`content` with every special-token string replaced by a marker of the literal (recursively)."""
            if isinstance(content, Mapping):
                return {shield(k): shield(v) for k, v in content.items()}
            if isinstance(content, list):
                return [shield(v) for v in content]
            if not isinstance(content, str):
                return content
            for special in self._specials:
                if special in content:
                    parts = content.split(special)
                    content = parts[0]
                    for part in parts[1:]:
                        literals.append(special)
                        content += f"{_SENTINEL[0]}{len(literals) - 1}{_SENTINEL[1]}" + part
            return content

        shielded = [dict(m, content=shield(m.get("content"))) if m.get("role") in ("user", "tool") else m
                    for m in messages]
        if tools:
            tools = [shield(tool_schema(t, i)) for i, t in enumerate(tools)]
        text = self.template.render(shielded, tools=tools, **template_vars)
        ids: list[int] = []
        for i, piece in enumerate(_SENTINEL_RE.split(text)):
            if i % 2:  # a literal the user typed
                ids += self._literal.encode(literals[int(piece)], add_special_tokens=False).ids
            elif piece:
                ids += self._encoder.encode(piece)
        return ids

    def stream(self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Any] | None = None, *,
               sampling: Sampling | None = None, max_new_tokens: int = 512, stop: Sequence[str] = (),
               cancel: threading.Event | None = None, overflow: str = "error", allow_special_tokens: bool = False,
               response_format: Any = None, reasoning_budget: int | None = None,
               constrain_tools: bool | None = None, tool_choice: str | Mapping[str, Any] | ToolChoice = "auto",
               **template_vars: Any) -> Iterator[Event]:
        """Typed events as the answer is generated; the last one is Done. Special-token strings typed into
        user or tool messages stay text unless `allow_special_tokens`; `overflow` as in Generation.
        `response_format` (a JSON schema, Pydantic model, dataclass, {"regex": ...} or {"lark": ...}) holds the
        answer to it and returns it as Done.parsed; tool calls are held to the offered tools' signatures
        (`constrain_tools`: None when llguidance is installed, True always, False never); `tool_choice`
        (a ToolChoice, or OpenAI's "auto" / "none" / "required" / {"type": "function", "function": {"name": N}})
        says whether and which tool is called, and whether more than one; `reasoning_budget`
        caps thinking tokens (0: answer at once); a reasoning trace that loops is ended. See constrain.py.
        Stateless: the whole conversation is prefilled (see `conversation()` for one that keeps its state)."""
        prompt = self.prompt_ids(messages, tools, allow_special_tokens, **template_vars)
        constraint = self.constraint(prompt, tools, response_format, reasoning_budget, constrain_tools, tool_choice)
        generation = Generation(self.session, [prompt], max_new_tokens, sampling or self.default_sampling(),
                                cancel=cancel, overflow=overflow, constraints=[constraint])
        yield from self.events(generation, prompt, stop, response_format)

    def in_reasoning(self, prompt: Sequence[int]) -> bool:
        """Whether the prompt leaves the model inside a reasoning block (LFM2.5's templates open it)."""
        return self.tokenizer.decode(list(prompt[-4:]), skip_special_tokens=False).rstrip().endswith(THINK_START)

    def constraint(self, prompt: Sequence[int], tools: Sequence[Any] | None, response_format: Any = None,
                   reasoning_budget: int | None = None, constrain_tools: bool | None = None,
                   tool_choice: str | Mapping[str, Any] | ToolChoice = "auto") -> Any:
        """What one generation over `prompt` is held to (runtime/constrain.py), or None."""
        schemas = [tool_schema(t, i) for i, t in enumerate(tools)] if tools else None
        return self.constraints.build(self.in_reasoning(prompt), schemas, response_format, reasoning_budget,
                                      constrain_tools, tool_choice=tool_choice)

    def events(self, generation: Generation, prompt: Sequence[int], stop: Sequence[str] = (),
               response_format: Any = None, replay: Sequence[int] = ()) -> Iterator[Event]:
        """Run `generation` over `prompt`, as typed events; the last one is Done. `replay`: tokens of the answer
        generated before (an answer continued after an interruption): they count in Done, without events."""
        parser = StreamParser(start_in_reasoning=self.in_reasoning(prompt))
        decoder = IncrementalDecoder(self.tokenizer)
        text, reasoning, calls, tokens = [], [], [], []
        eos = set(self.session.eos_token_ids)
        stopped_by_string = False

        def add(token: int) -> Iterator[Event]:
            tokens.append(token)
            if token in eos:
                return
            delta = decoder.add(token)
            for event in parser.feed(delta) if delta else ():
                yield from self._record(event, text, reasoning, calls)

        for token in replay:
            for _ in add(token):
                pass
        if stop and any(s in "".join(text) for s in stop):  # the replayed answer had already stopped
            stopped_by_string = True
            generation.cancel.set()
        for (token,) in generation:
            if token is None or stopped_by_string:
                continue
            yield from add(token)
            if stop and any(s in "".join(text) for s in stop):
                stopped_by_string = True
                generation.cancel.set()
        if stopped_by_string:
            generation.stats.stopped = "stop"
        for event in parser.close():
            yield from self._record(event, text, reasoning, calls)
        answer = "".join(text)
        for s in stop:
            answer = answer.split(s)[0] if s in answer else answer
        done = Done(answer, "".join(reasoning).strip(), calls, decoder.text, generation.stats, tokens)
        self._report(generation, done, response_format)
        yield done

    @staticmethod
    def _report(generation: Generation, done: Done, response_format: Any) -> None:
        """Reasoning numbers in the stats; the parsed answer when it completed its response_format."""
        constraint = (generation.constraints or [None])[0]
        if constraint is None:
            return
        control = constraint.find(ReasoningControl)
        if control is not None:
            done.stats.thinking_tokens, done.stats.reasoning_forced = control.thinking_tokens, control.forced
        gate = constraint.find(AfterReasoning)
        if gate is not None:
            done.stats.constraint_satisfied = gate.inner.satisfied
            done.parsed = to_format(response_format).parse(done.text) if gate.inner.satisfied else None

    @staticmethod
    def _record(event, text: list, reasoning: list, calls: list) -> Iterator[Event]:
        if isinstance(event, TextDelta):
            text.append(event.text)
        elif isinstance(event, ReasoningDelta):
            reasoning.append(event.text)
        elif isinstance(event, ToolCallEvent) and not event.error:
            calls.extend(event.calls)
        yield event

    def chat(self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Any] | None = None,
             **kwargs: Any) -> Done:
        """The whole answer at once."""
        *_, done = self.stream(messages, tools, **kwargs)
        return done

    def run_tools(self, messages: Sequence[Mapping[str, Any]], tools: Mapping[str, Callable[..., Any]],
                  schemas: Sequence[Any] | None = None, max_rounds: int = 4,
                  on_event: Callable[[Event], None] | None = None, **kwargs: Any) -> ToolRun:
        """The tool loop (tools.py) over a stateless history: the model calls, the app's function runs, its
        result goes back as a tool message, and generation continues until the model answers without calling
        (or max_rounds is reached). An unknown tool, one that raises or returns what JSON cannot hold goes back to
        the model as an error message. A round that ends cancelled (the `cancel` event) ends the loop: its calls
        are not run. `on_event` sees every streamed event and a ToolResult for every call run."""
        schemas = list(schemas) if schemas is not None else [function_schema(f) for f in tools.values()]
        history = [dict(m) for m in messages]

        def answer(_round: int) -> Iterator[Event]:
            for event in self.stream(history, schemas or None, **kwargs):
                yield event
            history.append({"role": "assistant", "content": event.raw})

        return tool_loop(answer, history, tools, max_rounds, on_event)

    def conversation(self, system: str | None = None,
                     tools: Mapping[str, Callable[..., Any]] | Sequence[Any] | None = None,
                     **options: Any) -> Conversation:
        """A conversation that keeps its state between turns (runtime/conversation.py)."""
        return Conversation(self, system, tools, **options)

    def load_conversation(self, path: str | Path, tools: Mapping[str, Callable[..., Any]] | None = None,
                          **options: Any) -> Conversation:
        """A conversation saved with Conversation.save, continued exactly where it stopped (Conversation.load):
        refused with StateFileError when the file is damaged, edited, from another bundle or from a newer
        lfm-edge."""
        return Conversation.load(self, path, tools, **options)

    def track(self, conversation: Conversation) -> None:
        """Remember a live conversation over this model (weakly: a conversation the app dropped is not kept)."""
        with self._conversations_lock:
            self._conversations.add(conversation)

    @property
    def conversations(self) -> list[Conversation]:
        """The conversations over this model that are still alive."""
        with self._conversations_lock:
            return list(self._conversations)

    def trim_memory(self, level: TrimLevel | int | str = TrimLevel.COMPLETE) -> int:
        """Release what only saves time, as far as `level` says (runtime/pressure.py): the prefix cache's RAM
        tier, then every live conversation's snapshots, then their grown-but-unused KV rows. A conversation
        that is generating is skipped (its turn uses what it holds; trim again when it ends). Answers never
        change, later turns may re-prefill. Returns the bytes released. Safe from any thread."""
        level = TrimLevel.of(level)
        freed = self.prefix_cache.trim()
        for conversation in self.conversations:
            freed += conversation._trim(level)
        if freed:
            release_free_heap()  # freed buffers of a few MB otherwise stay in the C heap
        return freed

    @property
    def identity(self) -> str:
        """The bundle's fingerprint (bundle.bundle_identity), computed once."""
        if self._identity is None:
            self._identity = bundle_identity(self.session.folder)
        return self._identity
