"""A conversation that keeps its state: each turn prefills only what is new.

    chat = model.conversation(system="You are brief.", tools={"get_weather": get_weather})
    for event in chat.send("Weather in Paris?"):
        ...                                     # the same typed events as LfmModel.stream
    chat.run_tools("And in Rome?")              # the tool loop, on the same state
    chat.save("chat.safetensors")               # later, in another process:
    chat = model.load_conversation("chat.safetensors", tools={"get_weather": get_weather})

Every turn renders the whole conversation with the checkpoint's chat template, exactly as a stateless call
would, and compares its token ids with those already in the state. The KV rows roll back by length; the conv
state rolls back to a snapshot (runtime/README.md, "State that outlives a generation"). So an edited history,
a rewind, or a template that drops earlier reasoning (LFM2.5) costs a short re-prefill, never a wrong answer.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import journal, persist
from .backend import capacity_for, kv_row_bytes
from .constrain import ToolChoice
from .events import Done, Event, ToolRun
from .generate import Generation, GenerationStats
from .memory import release_free_heap
from .prefixcache import PrefixEntry
from .pressure import TrimLevel
from .sampling import Sampling
from .schemas import function_schema, tool_schema
from .statefile import StateFileError
from .tools import tool_loop

if TYPE_CHECKING:
    from .model import LfmModel

CONTEXT_POLICIES = ("error", "drop_oldest")


class ConversationBusy(RuntimeError):
    """A second send on a conversation while its generation runs."""


class ContextFull(ValueError):
    """The conversation and the answer it asks for do not fit in the model's context."""


@dataclass
class Snapshot:
    """The conv state after `length` tokens (KV rows need none: they roll back by length)."""

    length: int
    conv: dict[int, np.ndarray]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.conv.values())


class Snapshots:
    """A ring of snapshots ordered by length, bounded in count and bytes (the oldest go first)."""

    def __init__(self, max_count: int = 32, max_bytes: int = 16 << 20):
        if max_count < 0 or max_bytes < 0:
            raise ValueError(f"snapshot limits must be >= 0, got max_count={max_count}, max_bytes={max_bytes}")
        self.max_count, self.max_bytes = max_count, max_bytes
        self.items: list[Snapshot] = []

    def add(self, snapshot: Snapshot) -> None:
        self.items = [s for s in self.items if s.length != snapshot.length] + [snapshot]
        self.items.sort(key=lambda s: s.length)
        while self.items and (len(self.items) > self.max_count or self.nbytes > self.max_bytes):
            self.items.pop(0)

    def newest_at_or_before(self, length: int) -> Snapshot | None:
        return next((s for s in reversed(self.items) if s.length <= length), None)

    def drop_after(self, length: int) -> None:
        self.items = [s for s in self.items if s.length <= length]

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.items)


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading token ids `a` and `b` share."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _distinct_texts(tokenizer: Any) -> tuple[str, str] | None:
    """Two short texts whose first tokens differ (a word-level vocabulary may map both of "a", "b" to its
    unknown token): rendered as the next message, they share exactly what every next turn starts with."""
    words = ("a", "b", "1", "2", "?", "The", "I", "x", "Hello", "Yes", "no")
    own = (tokenizer.decode([i]).strip() for i in range(100, min(400, tokenizer.get_vocab_size())))
    firsts: dict[int, str] = {}
    for text in (*words, *own):  # then single tokens of the vocabulary itself, decoded
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        if ids and ids[0] not in firsts:
            firsts[ids[0]] = text
            if len(firsts) == 2:
                return tuple(firsts.values())  # type: ignore[return-value]
    return None


def _tools(tools: Mapping[str, Callable[..., Any]] | Sequence[Any] | None) -> tuple[dict, list]:
    """(functions by name, JSON schemas) from a mapping of functions or a list of schemas / functions."""
    if tools is None:
        return {}, []
    if isinstance(tools, Mapping):
        return dict(tools), [function_schema(f) for f in tools.values()]
    return {}, [tool_schema(t, i) for i, t in enumerate(tools)]


class Conversation:
    """Messages and the model state that matches them. One generation at a time (a second `send` while one
    runs raises ConversationBusy); any number of conversations share one LfmModel, from any threads.

    `snapshot_every`: a conv snapshot every so many tokens of a long prefill (beside the ones at each prompt's
    end and each answer's end); `max_snapshots`/`snapshot_bytes` bound the ring. `context_policy`: "error"
    (ContextFull when the conversation and max_new_tokens exceed the context) or "drop_oldest" (the oldest
    turns after the system message are dropped from `messages` until it fits). `prefill_chunk` as in Generation.
    `reserve`: KV rows allocated up front (no copy when the conversation grows within them); by default the
    buffers start at the first turn's need and double. `prepare_next`: when an answer ends (without tool
    calls), prefill what every next user turn starts with (the answer as the template renders it once a
    message follows, e.g. without its reasoning, and the next turn's header), so the next turn, or a restore of
    a saved conversation, prefills only the new message; `prepared` holds that prefill's numbers."""

    def __init__(self, model: LfmModel, system: str | None = None,
                 tools: Mapping[str, Callable[..., Any]] | Sequence[Any] | None = None, *,
                 snapshot_every: int = 512, max_snapshots: int = 32, snapshot_bytes: int = 16 << 20,
                 context_policy: str = "error", prefill_chunk: int = 512, reserve: int = 0,
                 prepare_next: bool = True, template_vars: Mapping[str, Any] | None = None):
        if snapshot_every < 1:
            raise ValueError(f"snapshot_every {snapshot_every}: expected >= 1")
        if context_policy not in CONTEXT_POLICIES:
            raise ValueError(f"context_policy {context_policy!r}: expected one of {CONTEXT_POLICIES}")
        self.model = model
        self.functions, self.schemas = _tools(tools)
        self.messages: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
        self.snapshot_every, self.context_policy, self.prefill_chunk = snapshot_every, context_policy, prefill_chunk
        if not 0 <= reserve <= model.session.context_length:
            raise ValueError(f"reserve {reserve}: expected 0..{model.session.context_length} (the context length)")
        self.reserve = reserve
        self.template_vars = dict(template_vars or {})
        # The templates' strftime_now (LFM2.5: "Today's date") reads this moment, not the clock: a conversation
        # continued the next day renders as it did, instead of diverging at its first tokens.
        self.started = time.time()
        self.snapshots = Snapshots(max_snapshots, snapshot_bytes)
        self.stats: list[GenerationStats] = []  # one per generation, in order
        self.prepare_next = prepare_next
        self.prepared: GenerationStats | None = None  # the last preparation of a next turn
        self._cache: Any = None
        self._tokens: list[int] = []  # the token ids whose state the cache holds
        self._lock = threading.Lock()
        self._saves = threading.Lock()  # saves queue behind each other
        self.partial: dict[str, Any] | None = None  # an answer cut short, loaded from a file (continue_answer)
        self._journal: journal.Autosave | None = None  # autosave's checkpoints
        self._found: tuple | None = None  # the journal this conversation was loaded from (load)
        model.track(self)  # LfmModel.trim_memory reaches this conversation

    # --- what the app calls --------------------------------------------------------------------------------

    @property
    def tokens(self) -> list[int]:
        """Token ids in the state (a copy)."""
        return list(self._tokens)

    @property
    def turns(self) -> int:
        return sum(1 for m in self.messages if m.get("role") == "user")

    def send(self, content: str | Mapping[str, Any] | None = None, *, sampling: Sampling | None = None,
             max_new_tokens: int = 512, stop: Sequence[str] = (), cancel: threading.Event | None = None,
             allow_special_tokens: bool = False, response_format: Any = None, reasoning_budget: int | None = None,
             constrain_tools: bool | None = None,
             tool_choice: str | Mapping[str, Any] | ToolChoice = "auto") -> Iterator[Event]:
        """Add a user message (a str) or any message (a dict; None adds nothing), then stream the answer as
        LfmModel.stream does (response_format, reasoning_budget, constrain_tools, tool_choice as there); the
        answer joins `messages`. Runs when iterated."""
        with self._busy():
            self.partial = None  # a partial answer left as it is stays a message (marked "partial")
            if content is not None:
                self.messages.append({"role": "user", "content": content} if isinstance(content, str)
                                     else dict(content))
            done = yield from self._answer(sampling, max_new_tokens, stop, cancel, allow_special_tokens,
                                           (response_format, reasoning_budget, constrain_tools, tool_choice))
            self._answered(done, allow_special_tokens)

    def continue_answer(self, *, sampling: Sampling | None = None, cancel: threading.Event | None = None,
                        response_format: Any = None, constrain_tools: bool | None = None,
                        tool_choice: str | Mapping[str, Any] | ToolChoice = "auto") -> Iterator[Event]:
        """Continue the answer an interrupted process left (`partial`, loaded from an autosaved file): the events
        of what follows, as `send` streams them, then a Done for the whole answer, which replaces the partial
        message. Greedy, the answer is token for token the one the interrupted process would have given; a
        sampled one continues with a fresh random state. `response_format`, `constrain_tools` and `tool_choice`
        are not saved: pass them again if the answer had them."""
        with self._busy():
            partial = self.partial
            if partial is None or self._cache is None or not self.messages or not self.messages[-1].get("partial"):
                raise ValueError("no partial answer to continue (continue_answer follows a load of a conversation "
                                 "whose answer was cut short: see `partial`)")
            p = partial["prompt_length"]
            prompt, before = self._tokens[:p], self._tokens[p:] + [partial["pending"]]
            constraint = self.model.constraint(prompt, self.schemas or None, response_format,
                                               partial["reasoning_budget"], constrain_tools, tool_choice)
            for token in before if constraint is not None else ():  # the constraint's state after those tokens
                constraint.mask()
                constraint.advance(token)
            self.messages.pop()
            self.partial = None
            generation = Generation(self.model.session, [prompt + before], partial["max_new_tokens"] - len(before),
                                    sampling or self.model.default_sampling(), prefill_chunk=self.prefill_chunk,
                                    cancel=cancel, cache=self._cache, constraints=[constraint])
            done = yield from self._generate(generation, prompt, before, partial["stop"], response_format,
                                             partial["reasoning_budget"], partial["allow_special_tokens"])
            self._answered(done, partial["allow_special_tokens"])

    def autosave(self, path: str | Path | None, every_tokens: int = 32, every_seconds: float = 2.0) -> None:
        """Keep `path` up to date while answers are generated, so that a process killed at any moment loses
        at most the last interval: the conversation's state is appended to a journal beside the file
        (journal.py) when an answer starts, every `every_tokens` tokens or `every_seconds` seconds of it, and
        when it ends; the file itself is rewritten (atomically) only when the state rolled back before it or the
        journal outgrew it. `load` applies the journal; an answer cut short is then the last message, marked
        `"partial": True`, and `continue_answer` finishes it. None turns autosave off."""
        with self._busy():
            self._journal = None if path is None else journal.Autosave(Path(path), every_tokens, every_seconds)
            if self._journal is not None and self._found is not None and self._found[0] == Path(path).resolve():
                try:
                    self._journal.adopt(*self._found[1:])  # no rewrite of the file: records follow the last one
                except (OSError, StateFileError) as e:
                    self._journal.error = str(e)  # the first checkpoint rewrites the file
            self._found = None

    @property
    def autosave_error(self) -> str:
        """Why the last checkpoint could not be written ("" when it was, or autosave is off); the next answer
        tries again."""
        return self._journal.error if self._journal is not None else ""

    def say(self, content: str | Mapping[str, Any] | None = None, **kwargs: Any) -> Done:
        """`send`, returning the Done at once."""
        *_, done = self.send(content, **kwargs)
        return done

    def run_tools(self, content: str | Mapping[str, Any] | None = None,
                  tools: Mapping[str, Callable[..., Any]] | None = None, max_rounds: int = 4,
                  on_event: Callable[[Event], None] | None = None, **kwargs: Any) -> ToolRun:
        """The tool loop (tools.py) on this conversation's state: each round prefills only the tool results and
        what follows. `tools` defaults to the functions the conversation was made with; `on_event` sees every
        event, a ToolResult for each call run."""
        functions = dict(tools) if tools is not None else self.functions
        return tool_loop(lambda n: self.send(content if n == 0 else None, **kwargs), self.messages, functions,
                         max_rounds, on_event)

    def rewind(self, to_turn: int) -> None:
        """Keep the turns before user turn `to_turn` (0: none, only the system message). The state rolls back
        at the next send."""
        users = [i for i, m in enumerate(self.messages) if m.get("role") == "user"]
        if not 0 <= to_turn <= len(users):
            raise ValueError(f"rewind({to_turn}): this conversation has turns 0..{len(users)}")
        with self._busy():
            if to_turn < len(users):
                del self.messages[users[to_turn]:]
                self.partial = None  # (a partial answer is the last message)

    def reset(self) -> None:
        """Forget every turn (the system message stays) and free the state."""
        with self._busy():
            self.messages = [m for m in self.messages[:1] if m.get("role") == "system"]
            self.partial = None
            self._drop_state()

    def save(self, path: str | Path) -> int:
        """Write messages, token ids, the KV rows in use and the conv snapshots to `path` (safetensors, atomic:
        the previous file or the new one, never half of either). Returns the file's size in bytes. Raises
        ConversationBusy while a turn generates; concurrent saves wait for each other."""
        with self._busy(saving=True):
            size = self._write(Path(path), self.tokens, self.partial)
            writer = self._journal
            if writer is not None and Path(path).resolve() == writer.base.resolve():
                writer.follow(size, self.tokens)  # the journal follows the new file
            return size

    def _write(self, path: Path, tokens: list[int], answer: dict[str, Any] | None) -> int:
        """Save the state, which holds `tokens`, to `path` (the caller holds the conversation)."""
        cache = self._cache
        saved = persist.Saved(self.messages, self.schemas, self.template_vars, tokens, self.started,
                              self.settings, [s.length for s in self.snapshots.items], answer=answer)
        if cache is None:
            return persist.save(path, saved, self.model.identity, {}, {}, [])
        return persist.save(path, saved, self.model.identity, cache.kv_rows(), cache.conv_state(),
                            [s.conv for s in self.snapshots.items])

    @classmethod
    def load(cls, model: LfmModel, path: str | Path, tools: Mapping[str, Callable[..., Any]] | None = None,
             **options: Any) -> Conversation:
        """A conversation saved with `save`, continued exactly where it stopped (LfmModel.load_conversation).
        StateFileError names the file and what is wrong when it is damaged, edited, from another bundle or
        from a newer lfm-edge; `options` override the saved settings."""
        path, session = Path(path), model.session
        eos = session.eos_token_ids
        saved = persist.load(path, model.identity, session.state, session.vocab_size, session.context_length, eos)
        try:
            conv = cls(model, None, tools if tools is not None else saved.tools,
                       template_vars=saved.template_vars, **(saved.settings | options))
        except ValueError as e:  # a setting out of range
            raise StateFileError(f"{path}: settings: {e}") from None
        conv.messages, conv.schemas = saved.messages, saved.tools  # as saved: the rendering must be the same
        conv.started, conv.partial = saved.started, saved.answer
        if not saved.length and not journal.path_for(path).exists():
            return conv
        need = min(session.context_length, max(1 << max(saved.length, 1).bit_length(), conv.reserve))
        cache = session.new_cache(1, need)
        if saved.length:
            kv, state, snapshots = persist.state_arrays(path, saved, session.state, cache.conv_dtype, cache.kv_dtype)
        else:
            kv, state, snapshots = cache.kv_rows(), cache.conv_state(), []
        for at, snapshot in zip(saved.snapshot_lengths, snapshots, strict=True):
            conv.snapshots.add(Snapshot(at, snapshot))
        found = journal.read(journal.path_for(path), saved.checksum, saved.length, session.state, cache.conv_dtype,
                             cache.kv_dtype, session.vocab_size, session.context_length, eos)
        records = found.records
        now = journal.replay(saved.tokens, kv, state, records)
        if found.end:  # autosave to this file continues this journal
            conv._found = (path.resolve(), found, saved.checksum, saved.length, list(now.tokens))
        for at, snapshot in now.snapshots:
            conv.snapshots.drop_after(at)
            conv.snapshots.add(Snapshot(at, snapshot))
        if records:
            conv.messages, conv.partial = list(now.messages or conv.messages), now.answer
        if conv.partial is not None and not (conv.messages and conv.messages[-1].get("partial")):
            answer = now.tokens[conv.partial["prompt_length"]:] + [conv.partial["pending"]]
            conv.messages.append({"role": "assistant", "content": model.tokenizer.decode(answer,
                                  skip_special_tokens=False), "partial": True})
        if not now.tokens:
            return conv
        cache.set_kv_rows(now.kv, len(now.tokens))
        cache.set_conv_state(now.conv)
        conv._cache, conv._tokens = cache, now.tokens
        return conv

    @property
    def settings(self) -> dict[str, Any]:
        """The keyword arguments that made this conversation (what a saved file restores)."""
        return {"snapshot_every": self.snapshot_every, "max_snapshots": self.snapshots.max_count,
                "snapshot_bytes": self.snapshots.max_bytes, "context_policy": self.context_policy,
                "prefill_chunk": self.prefill_chunk, "reserve": self.reserve, "prepare_next": self.prepare_next}

    @property
    def memory_bytes(self) -> int:
        """Memory the state holds as allocated: the KV buffers (their whole capacity on a shared-buffer graph),
        the conv buffers and the snapshots."""
        cache = self._cache
        if cache is None:
            return self.snapshots.nbytes
        rows = cache.capacity if self.model.session.share_buffer else cache.length
        kv = kv_row_bytes(self.model.session.state.kv, cache.batch, cache.kv_dtype) * rows
        conv = sum(2 * cache.batch * h * k * np.dtype(cache.conv_dtype[i]).itemsize
                   for i, (h, k) in self.model.session.state.conv.items())
        return kv + conv + self.snapshots.nbytes

    def trim_memory(self, level: TrimLevel | int | str = TrimLevel.COMPLETE) -> int:
        """Release what this conversation holds only to save time (runtime/pressure.py): from BACKGROUND on,
        its snapshots (the live state stays: appending to it costs nothing, an edit of the history re-prefills
        from the start or the prefix cache), at COMPLETE also the KV rows its buffers hold beyond those in use
        (the next turn grows them again). The model's prefix cache is LfmModel.trim_memory's. Skipped (0) while
        the conversation generates or saves. Returns the bytes released."""
        freed = self._trim(TrimLevel.of(level))
        if freed:
            release_free_heap()
        return freed

    def _trim(self, level: TrimLevel) -> int:
        if not self._lock.acquire(blocking=False):
            return 0
        try:
            freed = 0
            if level >= TrimLevel.BACKGROUND:
                freed += self.snapshots.nbytes
                self.snapshots.items.clear()
            if level >= TrimLevel.COMPLETE and self._cache is not None:
                freed += self._cache.shrink()
            return freed
        finally:
            self._lock.release()

    @property
    def trimmable_bytes(self) -> int:
        """What `trim_memory(COMPLETE)` would release now: the snapshots and the unused KV rows."""
        cache = self._cache
        unused = 0
        if cache is not None and self.model.session.share_buffer:
            unused = (cache.capacity - cache.length) * kv_row_bytes(self.model.session.state.kv, cache.batch,
                                                                    cache.kv_dtype)
        return self.snapshots.nbytes + unused

    @property
    def state_bytes(self) -> int:
        """Memory the state holds: KV rows in use and snapshots."""
        if self._cache is None:
            return 0
        cache = self._cache
        kv = sum(2 * cache.batch * heads * cache.length * dim * np.dtype(cache.kv_dtype[i]).itemsize
                 for i, (heads, dim) in self.model.session.state.kv.items())
        return kv + self.snapshots.nbytes

    def template_context(self) -> dict[str, Any]:
        """The template variables every turn renders with: `template_vars` and the moment it started (`now`)."""
        from datetime import datetime

        return {"now": datetime.fromtimestamp(self.started), **self.template_vars}

    # --- how a turn runs -----------------------------------------------------------------------------------

    @contextmanager
    def _busy(self, saving: bool = False) -> Iterator[None]:
        """Hold the conversation: ConversationBusy while a turn generates; a save waits for another save."""
        with self._saves if saving else nullcontext():
            if not self._lock.acquire(blocking=False):
                raise ConversationBusy("this conversation is generating: one send at a time (wait for its Done, "
                                       "or set its cancel event)")
            try:
                yield
            finally:
                self._lock.release()

    def _render(self, max_new_tokens: int, allow_special_tokens: bool) -> list[int]:
        limit = self.model.session.context_length
        if max_new_tokens >= limit:
            raise ValueError(f"max_new_tokens {max_new_tokens} leaves no room in the context length {limit}")
        while True:
            prompt = self.model.prompt_ids(self.messages, self.schemas or None, allow_special_tokens,
                                           **self.template_context())
            if len(prompt) + max_new_tokens <= limit:
                return prompt
            first = next((i for i, m in enumerate(self.messages) if m.get("role") != "system"), None)
            nxt = next((i for i, m in enumerate(self.messages) if first is not None and i > first
                        and m.get("role") == "user"), None)
            if self.context_policy == "error" or nxt is None:
                raise ContextFull(f"the conversation ({len(prompt)} tokens) + max_new_tokens ({max_new_tokens}) "
                                  f"exceed the context length {limit}" + (
                                      "; context_policy='drop_oldest' drops the oldest turns"
                                      if self.context_policy == "error" else "; nothing older is left to drop"))
            del self.messages[first:nxt]

    def _answer(self, sampling, max_new_tokens, stop, cancel, allow_special_tokens, held) -> Iterator[Event]:
        model = self.model
        prompt = self._render(max_new_tokens, allow_special_tokens)
        response_format, reasoning_budget, constrain_tools, tool_choice = held
        constraint = model.constraint(prompt, self.schemas or None, response_format, reasoning_budget,
                                      constrain_tools, tool_choice)
        keeps = model.prefix_cache is not None and (model.prefix_cache.max_bytes or model.prefix_cache.folder)
        prefix = self._shared_prefix(prompt, allow_special_tokens) if keeps else 0
        self._restore(prompt, max_new_tokens)
        wanted = self._snapshot_points(len(prompt)) | ({prefix} if prefix else set())
        snapshot = self._snapshotter(wanted)

        def on_prefill(cache: Any) -> None:
            snapshot(cache)
            n = cache.length
            if n == prefix and model.prefix_cache is not None and prompt[:n] not in model.prefix_cache:
                model.prefix_cache.store(PrefixEntry(tuple(prompt[:n]), cache.kv_rows(), cache.conv_state()))

        generation = Generation(model.session, [prompt], max_new_tokens, sampling or model.default_sampling(),
                                prefill_chunk=self.prefill_chunk, cancel=cancel, cache=self._cache, cuts=wanted,
                                on_prefill=on_prefill, constraints=[constraint])
        self._tokens = list(prompt[:self._cache.length])
        if self._journal is not None:  # the new message is in the file before anything runs
            self._journal.checkpoint(self, self._tokens, None, start=True)
        return (yield from self._generate(generation, prompt, [], stop, response_format, reasoning_budget,
                                          allow_special_tokens))

    def _generate(self, generation: Generation, prompt: list[int], before: list[int], stop: Sequence[str],
                  response_format: Any, reasoning_budget: int | None, allow_special_tokens: bool) -> Iterator[Event]:
        """Run `generation` (its prompt: `prompt` and the answer's tokens `before` it) over the state; the state
        follows what was fed, and autosave checkpoints the answer as it grows."""
        if self._journal is not None:
            generation.on_decode = self._journal.checkpointer(self, generation, prompt, before, stop,
                                                              reasoning_budget, allow_special_tokens)
        done = None
        try:
            for event in self.model.events(generation, prompt, stop, response_format, before):
                done = event
                yield event
        except GeneratorExit:  # the caller stopped listening: the state stays what was fed
            raise
        except BaseException:
            self._drop_state()  # a step that failed may have left the buffers half-written
            raise
        finally:
            if self._cache is not None:
                fed = list(generation.prompts[0]) + generation.new_tokens[0]
                self._tokens = fed[:self._cache.length]
                self.snapshots.add(Snapshot(self._cache.length, self._cache.conv_state()))
                self.stats.append(generation.stats)
        return done

    def _answered(self, done: Done, allow_special_tokens: bool) -> None:
        """An answer ended: it joins the messages, the next turn is prepared, the file follows."""
        self.messages.append({"role": "assistant", "content": done.raw})
        if self.prepare_next and not done.tool_calls and done.stats.stopped != "cancelled":
            self._prepare(allow_special_tokens)  # after Done reached the caller: off the next turn's path
        if self._journal is not None:
            self._journal.checkpoint(self, self._tokens, None, start=True)

    def _prepare(self, allow_special_tokens: bool) -> None:
        """Bring the state to the tokens every next user turn starts with: rendered with two different user
        messages, the conversation shares them up to where the message begins."""
        probes = _distinct_texts(self.model.tokenizer)
        if probes is None:
            return
        try:
            a, b = (self.model.prompt_ids([*self.messages, {"role": "user", "content": text}], self.schemas or None,
                                          allow_special_tokens, **self.template_context()) for text in probes)
        except ValueError:
            return  # a template that refuses a user turn here: the next turn pays, as it would anyway
        stable = common_prefix(a, b)
        target = a[:stable]
        if self._cache is None or not target or stable >= self.model.session.context_length or \
                target[:self._cache.length] == self._tokens and len(target) == self._cache.length:
            return
        self._restore(target, 0)
        wanted = self._snapshot_points(len(target))
        generation = Generation(self.model.session, [target], 0, prefill_chunk=self.prefill_chunk, cache=self._cache,
                                cuts=wanted, on_prefill=self._snapshotter(wanted))
        try:
            for _ in generation:
                pass
        except BaseException:
            self._drop_state()
            raise
        self._tokens = list(target[:self._cache.length])
        self.prepared = generation.stats

    def _shared_prefix(self, prompt: list[int], allow_special_tokens: bool) -> int:
        """Tokens of the leading system message and tool schemas, when the prompt starts with them and
        more follows: the part many conversations share, kept in the model's prefix cache."""
        head = [m for m in self.messages[:1] if m.get("role") == "system"]
        if not head and not self.schemas:
            return 0
        # rendered before an empty user turn (a template may not render tools without a message): the tokens
        # any conversation with this system prompt and these tools starts with
        ids = self.model.prompt_ids([*head, {"role": "user", "content": ""}], self.schemas or None,
                                    allow_special_tokens, add_generation_prompt=False, **self.template_context())
        n = common_prefix(ids, prompt)
        return n if n < len(prompt) else 0

    def _restore(self, prompt: list[int], max_new_tokens: int) -> None:
        """Bring the state to the longest usable prefix of `prompt`: kept rows, a snapshot, or the prefix cache."""
        session = self.model.session
        if self._cache is None:
            need = capacity_for(len(prompt) + max_new_tokens, 0, session.context_length)
            self._cache = session.new_cache(1, max(need, self.reserve))
        cache = self._cache
        # at least one token is fed: its logits start the answer
        limit = min(common_prefix(self._tokens, prompt), len(prompt) - 1)
        self.snapshots.drop_after(limit)
        snapshot = self.snapshots.newest_at_or_before(limit)
        keep = snapshot.length if snapshot else 0
        if keep < cache.length <= limit:  # the live state is a snapshot at its own length
            keep = cache.length
        prefixes = self.model.prefix_cache
        entry = prefixes.lookup(prompt, len(prompt) - 1, keep) if prefixes is not None else None
        if entry is not None and not entry.fits(cache, session.state):
            prefixes.discard(entry.tokens)  # an entry edited to pass its checksum: a miss, and forgotten
            entry = None
        if entry is not None:
            cache.set_kv_rows(entry.kv, len(entry.tokens))
            cache.set_conv_state(entry.conv)
            self.snapshots.drop_after(min(limit, len(entry.tokens)))
            self.snapshots.add(Snapshot(len(entry.tokens), {i: a.copy() for i, a in entry.conv.items()}))
        elif keep != cache.length:
            cache.truncate(keep)
            cache.set_conv_state(snapshot.conv if snapshot else
                                 {i: np.zeros_like(a) for i, a in cache.conv_state().items()})
        self._tokens = list(prompt[:cache.length])

    def _snapshot_points(self, length: int) -> set[int]:
        """Where a prefill up to `length` snapshots its conv state: every snapshot_every tokens, and its end."""
        return set(range(self.snapshot_every, length, self.snapshot_every)) | {length}

    def _snapshotter(self, points: set[int]) -> Callable[[Any], None]:
        """An on_prefill hook that snapshots the conv state when the prefill passes one of `points`."""
        def on_prefill(cache: Any) -> None:
            if cache.length in points:
                self.snapshots.add(Snapshot(cache.length, cache.conv_state()))
        return on_prefill

    def _drop_state(self) -> None:
        self._cache, self._tokens = None, []
        self.snapshots.items.clear()
