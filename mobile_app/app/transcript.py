"""One chat turn as a state machine, without any widget: idle -> generating (-> cancelling) -> idle.

The model runs on a worker thread (the tool loop on a `Conversation`, so tool calls loop back to the model and each
turn prefills only what is new); every event it streams is handed to `post`, which the app points at Kivy's
clock so that the transcript is only ever changed on the UI thread. Tests pass a poster that queues, and
drain the queue themselves. `save`/`restore` keep the conversation across app restarts (Android kills apps
in the background): the transcript is rebuilt from the saved messages.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lfm_edge.runtime import (
    Conversation,
    Done,
    LfmModel,
    ReasoningDelta,
    TextDelta,
    ToolCall,
    ToolCallEvent,
    ToolResult,
    ToolRun,
)
from lfm_edge.runtime.schemas import function_schema
from lfm_edge.runtime.statefile import StateFileError
from lfm_edge.runtime.toolcalls import StreamParser
from lfm_edge.runtime.tools import tool_loop

from .tools import DEMO_TOOLS

Post = Callable[[Callable[[], None]], None]


@dataclass
class Bubble:
    """A message in the transcript: the user's, the model's (with its reasoning kept apart), or an error."""

    role: str  # "user", "assistant" or "error"
    text: str = ""
    reasoning: str = ""
    show_reasoning: bool = False  # reasoning is collapsed until the user opens it
    footer: str = ""  # tokens, speed, why it stopped


@dataclass
class ToolCard:
    """A tool call the model made, and what the tool answered (None while it runs)."""

    name: str
    arguments: dict[str, Any] = field(default_factory=dict)
    result: Any = None
    error: str = ""  # a call the parser could not read

    @property
    def call_text(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.arguments.items())
        return f"{self.name}({args})"

    @property
    def result_text(self) -> str:
        if self.error:
            return self.error
        if self.result is None:
            return "running..."
        return self.result if isinstance(self.result, str) else json.dumps(self.result)


Item = Bubble | ToolCard

IDLE, GENERATING, CANCELLING = "idle", "generating", "cancelling"
# The chat's thinking setting, in the order the Think button cycles: no limit, then budgets in tokens (0: off).
# On a phone a long reasoning trace is seconds of battery before the answer starts.
THINKING = (None, 256, 64, 0)


class ChatController:
    def __init__(self, post: Post, tools: Mapping[str, Callable[..., Any]] | None = None,
                 max_new_tokens: int = 256, system: str | None = None):
        self.post = post
        self.tools = dict(DEMO_TOOLS if tools is None else tools)
        self.schemas = [function_schema(f) for f in self.tools.values()]
        self.max_new_tokens = max_new_tokens
        self.system = system
        self.reasoning_budget: int | None = None  # one of THINKING
        self.model: LfmModel | None = None
        self.autosave: Path | None = None  # where the conversation checkpoints while it answers (the app's file)
        self.loading = ""  # what the app says while a model loads in the background ("" when none does)
        self.conversation: Conversation | None = None  # the messages and the state that matches them
        self.items: list[Item] = []
        self.state = IDLE
        self.tokens = 0  # generated in the current turn, for the status line
        self.listeners: list[Callable[[int | None], None]] = []  # index of the changed item; None: everything
        self._cancel = threading.Event()
        self._thread: threading.Thread | None = None
        self._current: int | None = None  # the assistant bubble of the round being streamed

    # --- called on the UI thread -----------------------------------------------------------------------------

    def set_model(self, model: LfmModel | None) -> None:
        """A new model starts a new conversation (the old one's tokens mean nothing to it)."""
        if self.state != IDLE:
            raise RuntimeError("a chat turn is running: cancel it before switching models")
        self.model = model
        self.reset()

    def reset(self) -> None:
        """A fresh conversation ("New"): the old one's state is freed."""
        if self.state != IDLE:
            raise RuntimeError("a chat turn is running: cancel it first")
        self.items.clear()
        self.conversation = self.model.conversation(self.system, self.tools) if self.model is not None else None
        self._autosave()
        self._changed(None)

    def _autosave(self) -> None:
        """An answer being generated when the app is killed is in the file (Conversation.autosave)."""
        if self.conversation is not None and self.autosave is not None:
            self.conversation.autosave(self.autosave)

    @property
    def history(self) -> list[dict[str, Any]]:
        """The conversation as the model sees it."""
        if self.conversation is not None:
            return self.conversation.messages
        return [{"role": "system", "content": self.system}] if self.system else []

    def save(self, path: Path) -> bool:
        """Save the conversation (between turns only); False when there is nothing to save or a turn runs."""
        if self.conversation is None or self.state != IDLE or not self.conversation.turns:
            return False
        self.conversation.save(path)
        return True

    def restore(self, path: Path) -> str | None:
        """Continue the conversation saved at `path` with the loaded model; returns why not, or None. A file
        from another bundle or a damaged one is left alone and the chat starts fresh."""

        if self.model is None or self.state != IDLE:
            return "no model loaded, or a turn is running"
        if not Path(path).is_file():
            return "nothing saved"
        try:
            self.conversation = self.model.load_conversation(path, self.tools)
        except (StateFileError, ValueError) as e:
            return str(e)
        self.items = transcript(self.conversation.messages)
        self._autosave()
        self._changed(None)
        return None

    def conversation_for(self, text: str) -> list[dict[str, Any]]:
        """The messages the model is given when `text` is sent now."""
        return [*self.history, {"role": "user", "content": text}]

    def send(self, text: str) -> str | None:
        """Start a turn; returns why it cannot start, or None when it did. Empty text finishes an answer the app
        was killed in (the restored conversation's partial answer), if there is one."""
        text = text.strip()
        if not text and self.conversation is not None and self.conversation.partial is not None and \
                self.model is not None and self.state == IDLE:
            last = self.items[-1] if self.items else None
            if isinstance(last, Bubble) and last.role == "assistant":
                last.footer = ""
                self._changed(len(self.items) - 1)
            self._start(None, len(self.items) - 1 if isinstance(last, Bubble) else None)
            return None
        if not text:
            return "nothing to send"
        if self.model is None:
            if self.loading:  # the app opened before its model was ready: the text stays in the input
                return f"the model is still loading ({self.loading}): send again when it is ready"
            return "no model loaded: pick one on the Model screen"
        if self.state != IDLE:
            return "the model is still answering"
        if self.conversation is None:
            self.reset()
        self.items.append(Bubble("user", text))
        self._changed(len(self.items) - 1)
        self._start(text, None)
        return None

    def _start(self, text: str | None, current: int | None) -> None:
        """A turn on the worker thread: `text` sent, or (None) the partial answer continued into item `current`."""
        self.state, self.tokens, self._current = GENERATING, 0, current
        self._cancel = threading.Event()
        self._thread = threading.Thread(target=self._work, args=(self.conversation, text, self._cancel),
                                        name="chat-turn", daemon=True)
        self._thread.start()

    def cycle_thinking(self) -> str:
        """The next reasoning budget of THINKING; returns its label ("Think: full", "Think: 64", "Think: off")."""
        self.reasoning_budget = THINKING[(THINKING.index(self.reasoning_budget) + 1) % len(THINKING)]
        return thinking_label(self.reasoning_budget)

    def cancel(self) -> None:
        if self.state == GENERATING:
            self.state = CANCELLING
            self._cancel.set()
            self._changed(None)

    def toggle_reasoning(self, index: int) -> None:
        item = self.items[index]
        if isinstance(item, Bubble):
            item.show_reasoning = not item.show_reasoning
            self._changed(index)

    def wait(self, timeout: float | None = None) -> bool:
        """Join the worker (tests and shutdown); True when no turn is running on a thread any more."""
        if self._thread is not None:
            self._thread.join(timeout)
            return not self._thread.is_alive()
        return True

    # --- the worker thread: only reads its arguments and posts ----------------------------------------------

    def _work(self, conversation: Conversation, text: str | None, cancel: threading.Event) -> None:
        options = {"cancel": cancel, "max_new_tokens": self.max_new_tokens, "reasoning_budget": self.reasoning_budget}

        def answer(round_: int):  # round 0 continues a partial answer when there is no text (send); tools loop on
            if round_ == 0 and text is None:
                return conversation.continue_answer(cancel=cancel)
            return conversation.send(text if round_ == 0 else None, **options)

        try:
            run = tool_loop(answer, conversation.messages, self.tools, 4,
                            on_event=lambda event: self.post(lambda: self._apply(event)))
        except Exception as e:  # a failed turn is shown in the transcript; the app keeps running
            error = f"{type(e).__name__}: {e}"
            self.post(lambda: self._finish(None, error))
            return
        self.post(lambda: self._finish(run, ""))

    # --- applying events (UI thread) -------------------------------------------------------------------------

    def _assistant(self) -> int:
        """Index of the bubble the model is writing into: this round's, while nothing was shown after it
        (text after a tool card goes into a new bubble, below the card)."""
        if self._current is None or self._current != len(self.items) - 1:
            self.items.append(Bubble("assistant"))
            self._current = len(self.items) - 1
        return self._current

    def _apply(self, event: Any) -> None:
        if isinstance(event, TextDelta | ReasoningDelta):
            i = self._assistant()
            if isinstance(event, TextDelta):
                self.items[i].text += event.text
            else:
                self.items[i].reasoning += event.text
            self.tokens += 1
            self._changed(i)
        elif isinstance(event, ToolCallEvent):
            if event.error:
                self.items.append(ToolCard("(unreadable call)", error=event.error))
                self._changed(len(self.items) - 1)
            for call in event.calls:
                self.items.append(ToolCard(call.name, dict(call.arguments)))
                self._changed(len(self.items) - 1)
        elif isinstance(event, ToolResult):  # a tool ran
            self._tool_result(event.call, event.result)
        elif isinstance(event, Done):  # the end of one round; a tool result starts the next
            if self._current is None and event.stats.stopped == "cancelled":
                self.items.append(Bubble("error", "cancelled"))  # e.g. cancelled while a tool ran
                self._changed(len(self.items) - 1)
            elif self._current is not None:
                s = event.stats
                self.items[self._current].footer = (
                    f"{s.generated_tokens} tokens, {s.decode_tokens_per_second:.1f} tok/s, "
                    f"first token {s.time_to_first_token * 1000:.0f} ms, {s.reused_tokens} reused, "
                    f"{s.prefilled_tokens} prefilled, "
                    + (f"thinking ended after {s.thinking_tokens} ({s.reasoning_forced}), " if s.reasoning_forced
                       else "") + s.stopped)
                self._changed(self._current)
            self._current = None

    def _tool_result(self, call: ToolCall, result: Any) -> None:
        for i, item in enumerate(self.items):
            if isinstance(item, ToolCard) and item.result is None and not item.error and item.name == call.name:
                item.result = result
                self._changed(i)
                return

    def _finish(self, run: ToolRun | None, error: str) -> None:
        self.state = IDLE
        if error:
            self.items.append(Bubble("error", error))
        self._changed(None)

    def _changed(self, index: int | None) -> None:
        for listener in self.listeners:
            listener(index)


def thinking_label(budget: int | None) -> str:
    return "Think: full" if budget is None else "Think: off" if budget == 0 else f"Think: {budget}"


def transcript(messages: list[dict[str, Any]]) -> list[Item]:
    """The bubbles and tool cards a saved conversation's messages show, in the order they streamed: an
    answer's reasoning and text, then the calls it made, each with its tool's result."""
    items: list[Item] = []
    for message in messages:
        role, content = message.get("role"), message.get("content")
        if role == "user":
            items.append(Bubble("user", str(content)))
        elif role == "assistant":
            bubble, cards = Bubble("assistant"), []
            parser = StreamParser()
            for event in [*parser.feed(str(content)), *parser.close()]:
                if isinstance(event, TextDelta):
                    bubble.text += event.text
                elif isinstance(event, ReasoningDelta):
                    bubble.reasoning += event.text
                elif isinstance(event, ToolCallEvent):
                    cards += [ToolCard(c.name, dict(c.arguments)) for c in event.calls]
            bubble.text, bubble.reasoning = bubble.text.strip(), bubble.reasoning.strip()
            if message.get("partial"):  # cut short when the app was killed (Conversation.autosave)
                bubble.footer = "interrupted when the app was closed: Send with no text finishes it"
            items += ([bubble] if bubble.text or bubble.reasoning else []) + cards
        elif role == "tool":
            card = next((i for i in items if isinstance(i, ToolCard) and i.result is None and not i.error), None)
            if card is not None:
                try:
                    card.result = json.loads(content) if isinstance(content, str) else content
                except ValueError:
                    card.result = content
    return items
