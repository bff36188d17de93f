"""The tool loop: the model calls, the app's function runs, its result goes back as a tool message, and
generation continues until the model answers without calling (or the rounds run out). One loop serves
LfmModel.run_tools (a stateless history) and Conversation.run_tools (kept state).

A call to an unknown tool, one that raises, or one whose result cannot be written as JSON goes back to the
model as `{"error": ...}`: a tool's failure is the model's to read, never an exception out of the loop.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from .events import Done, Event, ToolCall, ToolResult, ToolRun

__all__ = ["MAX_RESULT_CHARS", "run_calls", "tool_loop"]

MAX_RESULT_CHARS = 32 * 1024  # a tool message longer than this is cut (it would fill the context)


def tool_loop(answer: Callable[[int], Iterator[Event]], messages: list[dict[str, Any]],
              functions: Mapping[str, Callable[..., Any]], max_rounds: int,
              on_event: Callable[[Event], None] | None = None) -> ToolRun:
    """Rounds of `answer(round)` (a stream of events ending in Done, whose answer joins `messages`), each
    followed by its calls run and their results appended to `messages` as tool messages. A round that ends
    cancelled ends the loop: its calls are not run. `on_event` sees every event, ToolResults included."""
    if max_rounds < 1:
        raise ValueError(f"max_rounds {max_rounds}: expected >= 1")
    run = ToolRun(messages)
    for n in range(max_rounds):
        done = None
        for event in answer(n):
            if on_event:
                on_event(event)
            done = event
        assert isinstance(done, Done)
        run.answer = done
        if not done.tool_calls or done.stats.stopped == "cancelled":
            break
        for result in run_calls(done.tool_calls, functions):
            run.results.append(result)
            if on_event:
                on_event(result)
            messages.append({"role": "tool", "content": result.content})
    return run


def run_calls(calls: Sequence[ToolCall], functions: Mapping[str, Callable[..., Any]]) -> Iterator[ToolResult]:
    """Each call run with the app's function, as a ToolResult whose `content` the model reads."""
    for call in calls:
        fn = functions.get(call.name)
        try:
            result = fn(**call.arguments) if fn else {"error": f"unknown tool {call.name!r}"}
        except Exception as e:  # the app's tool failed: the model is told, the loop goes on
            result = {"error": f"{type(e).__name__}: {str(e)[:500]}"}
        yield ToolResult(call, result, _content(call, result))


def _content(call: ToolCall, result: Any) -> str:
    try:
        text = result if isinstance(result, str) else json.dumps(result)
    except (TypeError, ValueError, OverflowError, RecursionError) as e:
        # e.g. an object JSON cannot write, or an integer of more digits than Python will print
        text = json.dumps({"error": f"{call.name} returned a result that cannot be written as JSON "
                                    f"({type(e).__name__}: {str(e)[:200]})"})
    if len(text) > MAX_RESULT_CHARS:
        text = text[:MAX_RESULT_CHARS] + f"... (cut: {len(text):,} characters)"
    return text
