"""Tool calls and reasoning in LFM2 / LFM2.5 output, read as data.

The models call tools in Python call syntax between special tokens,
`<|tool_call_start|>[get_weather(city='Paris', days=3), other(x=1)]<|tool_call_end|>`, or, when the system
prompt asks for it, as JSON (`[{"name": ..., "arguments": {...}}]`). The text comes from a model, so it is
parsed and never evaluated: `ast.parse` builds a syntax tree and only literal nodes are accepted from it
(strings, numbers, booleans, None, lists, tuples, dicts, a sign on a number). Sizes are bounded so a runaway
generation cannot make parsing slow or deep.

Decisions worth knowing:

- Dotted call names are kept as written (`math.sqrt(x=2)` gives the name "math.sqrt"): the name is only
  matched against the caller's own tool list, never resolved, and some tool sets use namespaced names.
- Tuples become lists and `true` / `false` / `null` are accepted next to Python's spellings, so the arguments
  are the same JSON-ready data whichever form the model chose.
- Reasoning is `<think>...</think>`; tool-call markers inside it are part of the reasoning. A stray `</think>`
  in the answer is a control token, not text, and is dropped; so is a stray `<|tool_call_end|>` from streamed
  text (`parse_tool_calls` ignores one). Marker strings inside argument values cannot be represented.
- The limits apply to each tool-call payload (`MAX_PAYLOAD_CHARS`), the nesting of argument values
  (`MAX_DEPTH`) and the number of calls (`MAX_CALLS`); the surrounding answer is only scanned, so it may be long.
"""

from __future__ import annotations

import ast
import json
import warnings
from typing import Any

from .events import ReasoningDelta, TextDelta, ToolCall, ToolCallEvent

__all__ = [
    "MAX_CALLS", "MAX_DEPTH", "MAX_PAYLOAD_CHARS", "StreamParser", "ToolCallParseError", "parse_call_list",
    "parse_tool_calls", "split_reasoning",
]

THINK_START, THINK_END = "<think>", "</think>"
CALL_START, CALL_END = "<|tool_call_start|>", "<|tool_call_end|>"

MAX_PAYLOAD_CHARS = 64 * 1024
MAX_DEPTH = 32
MAX_CALLS = 64

_JSON_NAMES = {"true": True, "false": False, "null": None}


class ToolCallParseError(ValueError):
    """The model's tool-call text is not a well-formed list of calls with literal keyword arguments."""


# --- one-shot parsing --------------------------------------------------------------------------------------------


def parse_tool_calls(text: str, *, json_mode: bool = False) -> list[ToolCall]:
    """All calls in a model answer, from every `<|tool_call_start|>...<|tool_call_end|>` block outside
    `<think>` reasoning. With `json_mode`, an answer without markers that starts with `[` or `{` is read as a
    bare JSON list of calls (system prompts that ask for JSON calls sometimes get them unwrapped)."""
    if not isinstance(text, str):
        raise ToolCallParseError(f"expected the model's text as str, got {type(text).__name__}")
    answer = split_reasoning(text, strip=False)[1]
    calls: list[ToolCall] = []
    pos = answer.find(CALL_START)
    if pos < 0 and json_mode and answer.strip()[:1] in ("[", "{"):
        return _parse_json(_check_size(answer.strip()))
    while pos >= 0:
        end = answer.find(CALL_END, pos)
        if end < 0:
            raise ToolCallParseError(f"unterminated tool call: {CALL_START} without {CALL_END}")
        calls += parse_call_list(answer[pos + len(CALL_START):end])
        if len(calls) > MAX_CALLS:
            raise ToolCallParseError(f"more than {MAX_CALLS} tool calls")
        pos = answer.find(CALL_START, end)
    return calls


def parse_call_list(payload: str) -> list[ToolCall]:
    """The calls in one block's payload (the text between the markers), Pythonic or JSON."""
    text = _check_size(payload).strip()
    if not text:
        raise ToolCallParseError("empty tool call block")
    first = text[1:].lstrip()[:1] if text[0] == "[" else text[0]
    return _parse_json(text) if first == "{" else _parse_pythonic(text)


def _check_size(payload: str) -> str:
    if len(payload) > MAX_PAYLOAD_CHARS:
        raise ToolCallParseError(f"tool call payload is {len(payload)} characters; the limit is {MAX_PAYLOAD_CHARS}")
    return payload


def _parse_pythonic(text: str) -> list[ToolCall]:
    try:
        with warnings.catch_warnings():  # e.g. "invalid escape sequence": the same text must parse the same way
            warnings.simplefilter("ignore")  # whatever the process's warning filters (-W error would raise)
            body = ast.parse(text, mode="eval").body
    except SyntaxError as e:
        raise ToolCallParseError(f"not a Python call list: {e.msg} (column {e.offset})") from None
    except (ValueError, MemoryError, RecursionError) as e:
        # CPython's parser reports input too deep for its stack as MemoryError / RecursionError
        raise ToolCallParseError(f"not a Python call list: {type(e).__name__} {e}".strip()) from None
    items = body.elts if isinstance(body, (ast.List, ast.Tuple)) else [body]
    if len(items) > MAX_CALLS:
        raise ToolCallParseError(f"{len(items)} tool calls; the limit is {MAX_CALLS}")
    return [_call(item, i) for i, item in enumerate(items)]


def _call(node: ast.expr, index: int) -> ToolCall:
    if not isinstance(node, ast.Call):
        raise ToolCallParseError(f"call {index + 1}: expected name(arg=value, ...), found {_describe(node)}")
    name = _dotted_name(node.func, index)
    if node.args:
        raise ToolCallParseError(f"{name}(): positional arguments are not allowed; write name=value")
    arguments: dict[str, Any] = {}
    for keyword in node.keywords:
        if keyword.arg is None:
            raise ToolCallParseError(f"{name}(): **mapping unpacking is not allowed")
        if keyword.arg in arguments:
            raise ToolCallParseError(f"{name}(): argument {keyword.arg!r} given twice")
        arguments[keyword.arg] = _literal(keyword.value, 1, f"{name}({keyword.arg}=...)")
    return ToolCall(name, arguments)


def _dotted_name(node: ast.expr, index: int) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        raise ToolCallParseError(f"call {index + 1}: the called name must be plain or dotted, found {_describe(node)}")
    parts.append(node.id)
    return ".".join(reversed(parts))


def _literal(node: ast.expr, depth: int, where: str) -> Any:
    """The value of a literal node; anything that would need evaluation is refused."""
    if depth > MAX_DEPTH:
        raise ToolCallParseError(f"{where}: values nested deeper than {MAX_DEPTH}")
    if isinstance(node, ast.Constant):
        if node.value is None or type(node.value) in (str, int, float, bool):
            return node.value
        raise ToolCallParseError(f"{where}: {type(node.value).__name__} literals are not allowed")
    if (isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd))
            and isinstance(node.operand, ast.Constant) and type(node.operand.value) in (int, float)):
        return -node.operand.value if isinstance(node.op, ast.USub) else node.operand.value
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_literal(item, depth + 1, where) for item in node.elts]
    if isinstance(node, ast.Dict):
        out = {}
        for key_node, value_node in zip(node.keys, node.values, strict=True):
            if key_node is None:
                raise ToolCallParseError(f"{where}: **mapping unpacking is not allowed")
            key = _literal(key_node, depth + 1, where)
            if isinstance(key, (list, dict)):
                raise ToolCallParseError(f"{where}: dict keys must be strings, numbers, booleans or None")
            out[key] = _literal(value_node, depth + 1, where)
        return out
    if isinstance(node, ast.Name) and node.id in _JSON_NAMES:
        return _JSON_NAMES[node.id]
    raise ToolCallParseError(f"{where}: {_describe(node)} is not a literal value")


def _describe(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return f"the bare name {node.id!r}"
    kinds = {ast.Call: "a call", ast.Attribute: "attribute access", ast.Subscript: "subscripting",
             ast.BinOp: "an operator expression", ast.Lambda: "a lambda", ast.Starred: "* unpacking",
             ast.JoinedStr: "an f-string", ast.Set: "a set"}
    return next((text for kind, text in kinds.items() if isinstance(node, kind)), f"a {type(node).__name__} node")


def _parse_json(text: str) -> list[ToolCall]:
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise ToolCallParseError(f"not a JSON call list: {e}") from None
    items = data if isinstance(data, list) else [data]
    if len(items) > MAX_CALLS:
        raise ToolCallParseError(f"{len(items)} tool calls; the limit is {MAX_CALLS}")
    return [_json_call(item, i) for i, item in enumerate(items)]


def _json_call(item: Any, index: int) -> ToolCall:
    """{"name", "arguments"} (or "parameters"), optionally wrapped OpenAI-style in {"function": ..., "id": ...}."""
    if not isinstance(item, dict):
        raise ToolCallParseError(f"call {index + 1}: expected a JSON object, found {type(item).__name__}")
    inner = item["function"] if isinstance(item.get("function"), dict) else item
    name = inner.get("name")
    if not isinstance(name, str) or not name:
        raise ToolCallParseError(f"call {index + 1}: missing a string 'name'")
    arguments = inner.get("arguments", inner.get("parameters"))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except (ValueError, RecursionError) as e:
            raise ToolCallParseError(f"{name}: 'arguments' is a string but not JSON: {e}") from None
    arguments = {} if arguments is None else arguments
    if not isinstance(arguments, dict):
        raise ToolCallParseError(f"{name}: 'arguments' must be an object, found {type(arguments).__name__}")
    for value in arguments.values():  # an argument's value is level 1, as in the Pythonic form
        _check_depth(value, 1, name)
    call_id = item.get("id")
    return ToolCall(name, arguments, call_id if isinstance(call_id, str) else None)


def _check_depth(value: Any, depth: int, name: str) -> None:
    if depth > MAX_DEPTH:
        raise ToolCallParseError(f"{name}: arguments nested deeper than {MAX_DEPTH}")
    children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    for child in children:
        _check_depth(child, depth + 1, name)


# --- reasoning -----------------------------------------------------------------------------------------------------


def split_reasoning(text: str, *, strip: bool = True, start_in_reasoning: bool = False) -> tuple[str, str]:
    """(reasoning, answer): the text of `<think>` blocks and the rest. An unclosed `<think>` makes all that
    follows reasoning (the model is still thinking, or ran out of tokens). Tool-call blocks stay in the answer
    verbatim. `start_in_reasoning` is for templates whose generation prompt already opened `<think>`.
    With `strip=False` nothing is trimmed, so the parts match what `StreamParser` emits."""
    reasoning: list[str] = []
    answer: list[str] = []
    pos, thinking = 0, start_in_reasoning
    while pos < len(text):
        if thinking:
            end = text.find(THINK_END, pos)
            stop = len(text) if end < 0 else end
            reasoning.append(text[pos:stop])
            pos, thinking = stop + len(THINK_END), False
            continue
        index, marker = _first_marker(text, pos, (THINK_START, THINK_END, CALL_START))
        if index < 0:
            answer.append(text[pos:])
            break
        answer.append(text[pos:index])
        pos = index + len(marker)
        if marker == THINK_START:
            thinking = True
        elif marker == CALL_START:  # copied through whole, so markers inside a call's strings are not seen
            end = text.find(CALL_END, pos)
            stop = len(text) if end < 0 else end + len(CALL_END)
            answer.append(CALL_START + text[pos:stop])
            pos = stop
    if strip:
        return "".join(reasoning).strip(), "".join(answer).strip()
    return "".join(reasoning), "".join(answer)


def _first_marker(text: str, start: int, markers: tuple[str, ...]) -> tuple[int, str]:
    found = [(i, m) for m in markers if (i := text.find(m, start)) >= 0]
    return min(found) if found else (-1, "")


# --- streaming -----------------------------------------------------------------------------------------------------


_TEXT, _REASONING, _TOOL = "text", "reasoning", "tool"
_WATCHED = {
    _TEXT: (THINK_START, THINK_END, CALL_START, CALL_END),
    _REASONING: (THINK_END,),
    _TOOL: (CALL_END,),
}


class StreamParser:
    """Turns detokenised deltas into typed events as they arrive.

    A delta may end partway through a marker ("<thi", "<|tool_ca"), so a tail that could still become a
    marker is held back until the next delta (or `close()`) settles it. Whatever the input, it never raises
    on text: malformed or unterminated tool calls come out as a `ToolCallEvent` with `error` set. The text
    deltas concatenate to the answer of `split_reasoning(text, strip=False)` with tool-call blocks and stray
    markers removed; the reasoning deltas to its reasoning."""

    def __init__(self, *, start_in_reasoning: bool = False):
        self._mode = _REASONING if start_in_reasoning else _TEXT
        self._held = ""
        self._payload: list[str] = []
        self._payload_chars = 0
        self._closed = False

    def feed(self, delta: str) -> list[TextDelta | ReasoningDelta | ToolCallEvent]:
        """Events completed by this delta (possibly none)."""
        if self._closed:
            raise RuntimeError("feed() after close()")
        events: list = []
        self._held += delta
        self._drain(events, final=False)
        return events

    def close(self) -> list[TextDelta | ReasoningDelta | ToolCallEvent]:
        """Flush held-back text at the end of generation; an open tool call is reported as unterminated."""
        if self._closed:
            return []
        events: list = []
        self._drain(events, final=True)
        if self._mode == _TOOL:
            events.append(self._finish_block(f"unterminated tool call: no {CALL_END} before the end"))
        self._closed = True
        return events

    def _drain(self, events: list, final: bool) -> None:
        while True:
            index, marker = _first_marker(self._held, 0, _WATCHED[self._mode])
            if index < 0:
                keep = 0 if final else _partial_marker_len(self._held, _WATCHED[self._mode])
                self._emit(self._held[:len(self._held) - keep], events)
                self._held = self._held[len(self._held) - keep:]
                return
            self._emit(self._held[:index], events)
            self._held = self._held[index + len(marker):]
            self._on_marker(marker, events)

    def _emit(self, text: str, events: list) -> None:
        if not text:
            return
        if self._mode == _TOOL:
            if self._payload_chars <= MAX_PAYLOAD_CHARS:  # beyond the limit the block fails anyway: stop storing
                self._payload.append(text)
            self._payload_chars += len(text)
        elif self._mode == _REASONING:
            events.append(ReasoningDelta(text))
        else:
            events.append(TextDelta(text))

    def _on_marker(self, marker: str, events: list) -> None:
        if self._mode == _TOOL:  # the closing marker: the block is complete
            events.append(self._finish_block())
            self._mode = _TEXT
        elif marker == THINK_START:
            self._mode = _REASONING
        elif marker == THINK_END:
            self._mode = _TEXT  # closes reasoning; in the answer a stray one is dropped
        elif marker == CALL_START:
            self._mode, self._payload, self._payload_chars = _TOOL, [], 0
        # a stray CALL_END in the answer is dropped

    def _finish_block(self, error: str | None = None) -> ToolCallEvent:
        raw = "".join(self._payload)[:MAX_PAYLOAD_CHARS]
        if error is None and self._payload_chars > MAX_PAYLOAD_CHARS:
            error = f"tool call payload is {self._payload_chars} characters; the limit is {MAX_PAYLOAD_CHARS}"
        if error is None:
            try:
                return ToolCallEvent(parse_call_list(raw), raw)
            except ToolCallParseError as e:
                error = str(e)
        return ToolCallEvent([], raw, error)


def _partial_marker_len(text: str, markers: tuple[str, ...]) -> int:
    """Length of the longest tail of `text` that is a proper prefix of a marker."""
    for size in range(min(len(text), max(map(len, markers)) - 1), 0, -1):
        tail = text[-size:]
        if any(m.startswith(tail) for m in markers):
            return size
    return 0
