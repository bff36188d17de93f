"""OpenAI's chat-completions API, as data: a request checked field by field into a ChatRequest, and the response
and chunk objects built from the runtime's events. No HTTP here (app.py).

What is taken: `model`, `messages` (system, user, assistant with `tool_calls`, tool), `max_tokens` /
`max_completion_tokens`, `temperature`, `top_p`, `seed`, `stop`, `n` (1 only), `stream`,
`stream_options.include_usage`, `tools`, `tool_choice`, `parallel_tool_calls`, `response_format` (`text`,
`json_object`, `json_schema`), `user`, `metadata`, `store` (false), and the extension `reasoning_budget`. Anything
else, or a value the runtime cannot honour, is a 400 naming the parameter: a silently ignored parameter would be
a wrong answer.
"""

from __future__ import annotations

import json
import math
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from ..constrain import ConstraintError, ToolChoice
from ..events import Done, ToolCall
from ..schemas import tool_schema

__all__ = ["ApiError", "ChatRequest", "chunk", "completion", "parse_request", "tool_call_text"]

MAX_MESSAGES = 4096
MAX_STOPS = 4
ACCEPTED = {"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "stop", "n",
            "stream", "stream_options", "tools", "tool_choice", "parallel_tool_calls", "response_format", "user",
            "metadata", "store", "reasoning_budget"}
# parameters a client may send at their neutral value (refused otherwise)
NEUTRAL = {"frequency_penalty": 0, "presence_penalty": 0, "logprobs": False, "logit_bias": {}}


class ApiError(Exception):
    """An error in OpenAI's shape: the HTTP status, a message, its type, and the parameter it is about."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.kind = kind or {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
                             413: "invalid_request_error", 429: "rate_limit_error", 503: "server_error"
                             }.get(status, "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class ChatRequest:
    """A checked chat-completions request, in the runtime's terms."""

    model: str
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None = None
    tool_choice: ToolChoice = ToolChoice()
    max_tokens: int | None = None
    sampling: dict[str, Any] = field(default_factory=dict)  # temperature, top_p, seed as given
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    response_format: Any = None  # a JSON schema for the runtime, or None
    reasoning_budget: int | None = None


def parse_request(body: Any, raw_texts: dict[str, str] | None = None) -> ChatRequest:
    """The request body (parsed JSON) as a ChatRequest, or ApiError(400) naming what is wrong. `raw_texts`:
    assistant messages this server wrote, by their `remember` key, so a client's copy is rendered back exactly as
    the model wrote it (tool-call quoting and reasoning included)."""
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, found {_kind(body)}")
    for key, neutral in NEUTRAL.items():
        if key in body and body[key] not in (neutral, None):
            raise ApiError(400, f"{key} is not supported by this server (only {neutral!r})", key,
                           "unsupported_parameter")
    unknown = sorted(set(body) - ACCEPTED - set(NEUTRAL))
    if unknown:
        raise ApiError(400, f"unrecognized request argument supplied: {unknown[0]}", unknown[0],
                       "unsupported_parameter")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "model must be a non-empty string", "model")
    if body.get("n", 1) != 1:
        raise ApiError(400, "n: only 1 is supported (one choice per request)", "n", "unsupported_value")
    if body.get("store") not in (None, False):
        raise ApiError(400, "store: this server stores nothing", "store", "unsupported_value")
    stream = _bool(body, "stream", False)
    options = body.get("stream_options")
    if options is not None and (not isinstance(options, dict) or set(options) - {"include_usage"}):
        raise ApiError(400, "stream_options must be an object with include_usage only", "stream_options")
    include_usage = bool((options or {}).get("include_usage", False))
    tools = _tools(body.get("tools"))
    choice = _tool_choice(body.get("tool_choice"), body.get("parallel_tool_calls"), tools)
    request = ChatRequest(
        model=model, messages=_messages(body.get("messages"), raw_texts or {}), tools=tools, tool_choice=choice,
        stream=stream, include_usage=include_usage,
        max_tokens=_max_tokens(body), stop=_stop(body.get("stop")),
        response_format=_response_format(body.get("response_format")),
        reasoning_budget=_int(body, "reasoning_budget", 0, 1 << 20))
    for key, low, high in (("temperature", 0.0, 2.0), ("top_p", 1e-9, 1.0)):
        if body.get(key) is not None:
            value = body[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or \
                    not low <= value <= high:
                raise ApiError(400, f"{key} must be a number in [{low:g}, {high:g}], found {value!r:.40}", key)
            request.sampling[key] = float(value)
    if body.get("seed") is not None:
        request.sampling["seed"] = _int(body, "seed", -(2**63), 2**64 - 1) % (2**63)
    return request


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), type(value).__name__)


def _bool(body: dict, key: str, default: bool) -> bool:
    value = body.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ApiError(400, f"{key} must be true or false, found {value!r:.40}", key)
    return value


def _int(body: dict, key: str, low: int, high: int) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ApiError(400, f"{key} must be an integer in [{low}, {high}], found {value!r:.40}", key)
    return value


def _max_tokens(body: dict) -> int | None:
    given = [k for k in ("max_completion_tokens", "max_tokens") if body.get(k) is not None]
    if len(given) == 2 and body["max_tokens"] != body["max_completion_tokens"]:
        raise ApiError(400, "max_tokens and max_completion_tokens disagree; give one", "max_tokens")
    return _int(body, given[0], 1, 1 << 24) if given else None


def _stop(value: Any) -> list[str]:
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > MAX_STOPS:
        raise ApiError(400, f"stop must be a non-empty string or a list of at most {MAX_STOPS} of them", "stop")
    return stops


def _text(content: Any, where: str) -> str:
    """A message's content as text: a string, or a list of text parts (other parts, such as images, refused)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for n, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else _kind(part)
                raise ApiError(400, f"{where}.content[{n}]: only text parts are supported, found {kind!r:.40}",
                               f"{where}.content")
            parts.append(part["text"])
        return "".join(parts)
    raise ApiError(400, f"{where}.content must be a string or a list of text parts, found {_kind(content)}",
                   f"{where}.content")


def _messages(value: Any, raw_texts: dict[str, str]) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not value:
        raise ApiError(400, "messages must be a non-empty list", "messages")
    if len(value) > MAX_MESSAGES:
        raise ApiError(400, f"messages: {len(value)} messages, at most {MAX_MESSAGES}", "messages")
    out = []
    for n, message in enumerate(value):
        where = f"messages[{n}]"
        if not isinstance(message, dict):
            raise ApiError(400, f"{where} must be an object, found {_kind(message)}", where)
        role = message.get("role")
        if role in ("system", "developer", "user"):
            out.append({"role": "system" if role == "developer" else role,
                        "content": _text(message.get("content"), where)})
        elif role == "tool":
            out.append({"role": "tool", "content": _text(message.get("content"), where)})
        elif role == "assistant":
            out.append({"role": "assistant", "content": _assistant(message, where, raw_texts)})
        else:
            raise ApiError(400, f"{where}.role must be system, developer, user, assistant or tool, found "
                                f"{role!r:.40}", f"{where}.role")
    return out


def _assistant(message: dict, where: str, raw_texts: dict[str, str]) -> str:
    """An assistant message as the model writes it: the text this server produced for it when it is one of ours,
    else its reasoning, content and tool calls in LFM's format."""
    content = message.get("content")
    content = "" if content is None else _text(content, where)
    reasoning = message.get("reasoning_content")
    if reasoning is not None and not isinstance(reasoning, str):
        raise ApiError(400, f"{where}.reasoning_content must be a string", f"{where}.reasoning_content")
    calls = []
    for n, call in enumerate(message.get("tool_calls") or []):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise ApiError(400, f"{where}.tool_calls[{n}] must have a function with a name",
                           f"{where}.tool_calls")
        try:
            arguments = json.loads(fn.get("arguments") or "{}")
        except (ValueError, TypeError, RecursionError):
            raise ApiError(400, f"{where}.tool_calls[{n}].function.arguments must be a JSON object string",
                           f"{where}.tool_calls") from None
        if not isinstance(arguments, dict):
            raise ApiError(400, f"{where}.tool_calls[{n}].function.arguments must be a JSON object string",
                           f"{where}.tool_calls")
        calls.append(ToolCall(fn["name"], arguments))
    key = remember_key(content, calls)
    if key in raw_texts:
        return raw_texts[key]
    text = f"<think>{reasoning}</think>" if reasoning else ""
    return text + content + (tool_call_text(calls) if calls else "")


def remember_key(content: str, calls: list[ToolCall]) -> str:
    """What identifies an assistant message a client sends back: its visible text and its calls."""
    return json.dumps([content.strip(), [[c.name, c.arguments] for c in calls]], sort_keys=True)


def tool_call_text(calls: list[ToolCall]) -> str:
    """Calls in the Pythonic form LFM models write: `<|tool_call_start|>[f(a=1)]<|tool_call_end|>`."""
    def literal(value: Any) -> str:
        if isinstance(value, bool) or value is None:
            return repr(value)
        if isinstance(value, (int, float, str)):
            return json.dumps(value, ensure_ascii=False)
        if isinstance(value, list):
            return "[" + ", ".join(literal(v) for v in value) + "]"
        return "{" + ", ".join(f"{json.dumps(str(k))}: {literal(v)}" for k, v in value.items()) + "}"

    body = ", ".join(f"{c.name}(" + ", ".join(f"{k}={literal(v)}" for k, v in c.arguments.items()) + ")"
                     for c in calls)
    return f"<|tool_call_start|>[{body}]<|tool_call_end|>"


def _tools(value: Any) -> list[dict] | None:
    if value is None:
        return None
    if not isinstance(value, list):
        raise ApiError(400, f"tools must be a list, found {_kind(value)}", "tools")
    out = []
    for n, tool in enumerate(value):
        if not isinstance(tool, dict) or tool.get("type", "function") != "function" or \
                not isinstance(tool.get("function"), dict):
            raise ApiError(400, f"tools[{n}] must be {{'type': 'function', 'function': {{...}}}}", f"tools[{n}]")
        try:
            out.append(tool_schema(tool, n))
        except ValueError as e:
            raise ApiError(400, f"tools[{n}]: {e}", f"tools[{n}]") from None
    return out or None


def _tool_choice(value: Any, parallel: Any, tools: list[dict] | None) -> ToolChoice:
    if parallel not in (None, True, False):
        raise ApiError(400, "parallel_tool_calls must be true or false", "parallel_tool_calls")
    try:
        choice = ToolChoice.of("auto" if value is None else value, parallel is not False)
    except ConstraintError as e:
        raise ApiError(400, str(e), "tool_choice") from None
    if choice.mode == "required" and not tools:
        raise ApiError(400, "tool_choice 'required' needs tools", "tool_choice")
    if choice.mode == "function" and not any(t["function"]["name"] == choice.function for t in tools or []):
        raise ApiError(400, f"tool_choice names {choice.function!r}, which is not among the tools", "tool_choice")
    return choice


def _response_format(value: Any) -> Any:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ApiError(400, "response_format must be an object", "response_format")
    kind = value.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            raise ApiError(400, "response_format.json_schema must be an object with a 'schema' object",
                           "response_format")
        return spec.get("schema") or {"type": "object"}
    raise ApiError(400, f"response_format.type must be text, json_object or json_schema, found {kind!r:.40}",
                   "response_format")


# --- responses ----------------------------------------------------------------------------------------------------

def new_id(prefix: str = "chatcmpl") -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def tool_call_objects(calls: list[ToolCall]) -> list[dict]:
    return [{"id": call.id or new_id("call"), "type": "function",
             "function": {"name": call.name, "arguments": json.dumps(call.arguments, ensure_ascii=False)}}
            for call in calls]


def finish_reason(done: Done) -> str:
    if done.tool_calls:
        return "tool_calls"
    return "length" if done.stats.stopped == "length" else "stop"


def usage(done: Done) -> dict:
    stats = done.stats
    return {"prompt_tokens": stats.prompt_tokens, "completion_tokens": stats.generated_tokens,
            "total_tokens": stats.prompt_tokens + stats.generated_tokens,
            "prompt_tokens_details": {"cached_tokens": stats.reused_tokens}}


def completion(completion_id: str, model: str, done: Done, calls: list[dict], created: int | None = None) -> dict:
    message: dict[str, Any] = {"role": "assistant", "content": done.text if done.text or not calls else None}
    if done.reasoning:
        message["reasoning_content"] = done.reasoning
    if calls:
        message["tool_calls"] = calls
    return {"id": completion_id, "object": "chat.completion", "created": created or int(time.time()), "model": model,
            "choices": [{"index": 0, "message": message, "finish_reason": finish_reason(done), "logprobs": None}],
            "usage": usage(done)}


def chunk(completion_id: str, model: str, created: int, delta: dict | None = None, finish: str | None = None,
          usage_: dict | None = None) -> dict:
    out: dict[str, Any] = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
                           "choices": [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish,
                                                                 "logprobs": None}]}
    if usage_ is not None:
        out["usage"] = usage_
    return out
