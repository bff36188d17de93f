"""What a generation streams, and what it returns: the typed events an app handles.

    for event in model.stream(messages):     # or conversation.send(...)
        TextDelta       answer text, ready to show
        ReasoningDelta  text inside <think>...</think>
        ToolCallEvent   a complete tool-call block, parsed as data (or `error` saying why it is malformed)
        ToolResult      a tool the tool loop ran, and what it returned (run_tools only)
        Done            the last event: the whole answer, split, and the generation's numbers
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .generate import GenerationStats

__all__ = ["Done", "Event", "ReasoningDelta", "TextDelta", "ToolCall", "ToolCallEvent", "ToolResult", "ToolRun"]


@dataclass
class ToolCall:
    """One call the model asked for: the tool's name and its keyword arguments as plain JSON-like data."""

    name: str
    arguments: dict[str, Any] = field(default_factory=dict)
    id: str | None = None


@dataclass
class TextDelta:
    """Answer text, ready to show."""

    text: str


@dataclass
class ReasoningDelta:
    """Text inside `<think>...</think>`."""

    text: str


@dataclass
class ToolCallEvent:
    """A complete tool-call block. On a malformed block `calls` is empty and `error` says why; `raw` is the
    payload (cut at toolcalls.MAX_PAYLOAD_CHARS) so it can be logged or shown to the model."""

    calls: list[ToolCall]
    raw: str = ""
    error: str | None = None


@dataclass
class ToolResult:
    """A call the tool loop ran: `result` is what the function returned (or {"error": ...}), `content` the
    text the model reads back as the tool message."""

    call: ToolCall
    result: Any
    content: str


@dataclass
class Done:
    """The last event of a stream: the whole answer, split, and how the generation went."""

    text: str
    reasoning: str
    tool_calls: list[ToolCall]
    raw: str  # everything the model wrote, markers included (what goes back into the conversation)
    stats: GenerationStats
    tokens: list[int] = field(default_factory=list)  # the token ids sampled, an end-of-turn token included
    parsed: Any = None  # with response_format: the answer as data (None when it did not complete)


Event = TextDelta | ReasoningDelta | ToolCallEvent | ToolResult | Done


@dataclass
class ToolRun:
    """What a tool loop did: the conversation grown by every turn, the final answer, and each call it ran."""

    messages: list[dict[str, Any]]
    answer: Done | None = None
    results: list[ToolResult] = field(default_factory=list)

    @property
    def calls(self) -> list[tuple[ToolCall, Any]]:
        """(call, result) of every call run, in order."""
        return [(r.call, r.result) for r in self.results]
