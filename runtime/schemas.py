"""JSON schemas: of the tools offered to the model, of Python functions and dataclasses, checked once.

A tool is a JSON-schema dict in OpenAI's shape (`{"type": "function", "function": {"name", "description",
"parameters"}}`, or the inner object alone) or a documented, type-hinted Python function (`function_schema`).
`tool_schema` checks a tool before it reaches a template or a grammar: a name of letters, digits, `_`, `-`
and `.`; `parameters` an object whose `properties` is an object and `required` a list of its names; nesting
at most MAX_DEPTH deep; JSON-serialisable. A malformed tool is a ValueError naming it, never a TypeError or
RecursionError from deep inside a template or the grammar compiler.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import re
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["MAX_DEPTH", "dataclass_schema", "function_schema", "hint_schema", "tool_name", "tool_schema"]

MAX_DEPTH = 32  # nesting of a tool's schema (objects and lists); as the tool-call parser's argument depth
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]{0,127}")

Tool = Mapping[str, Any] | Callable[..., Any]


def tool_schema(tool: Tool, index: int = 0) -> dict[str, Any]:
    """The schema of one offered tool (a dict, or a function's schema), checked; ValueError names the tool."""
    if callable(tool) and not isinstance(tool, Mapping):
        return function_schema(tool)
    if not isinstance(tool, Mapping):
        raise ValueError(f"tool {index} must be a JSON-schema dict or a function, got {type(tool).__name__}")
    name = tool_name(tool) or f"#{index}"
    where = f"tool {name!r}"
    _check_depth(tool, 0, where)
    try:
        json.dumps(tool)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where} is not JSON-serialisable: {e}") from None
    fn = tool.get("function", tool)
    if not isinstance(fn, Mapping):
        raise ValueError(f"{where}: 'function' must be an object, found {type(fn).__name__}")
    if not isinstance(fn.get("name"), str) or not _NAME.fullmatch(fn["name"]):
        raise ValueError(f"tool {index}: 'name' must be a string of letters, digits, '_', '-' and '.' (at most 128, "
                         f"not starting with a digit), found {fn.get('name')!r:.60}")
    if "description" in fn and not isinstance(fn["description"], str):
        raise ValueError(f"{where}: 'description' must be a string, found {type(fn['description']).__name__}")
    params = fn.get("parameters")
    if params is not None:
        if not isinstance(params, Mapping):
            raise ValueError(f"{where}: 'parameters' must be an object (a JSON schema), found {type(params).__name__}")
        props = params.get("properties", {})
        if not isinstance(props, Mapping) or not all(isinstance(v, Mapping) for v in props.values()):
            raise ValueError(f"{where}: 'parameters.properties' must be an object of schemas")
        required = params.get("required", [])
        if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
            raise ValueError(f"{where}: 'parameters.required' must be a list of argument names")
        unknown = [r for r in required if r not in props]
        if unknown:
            raise ValueError(f"{where}: 'parameters.required' names {unknown}, which 'properties' does not define")
    return dict(tool)


def tool_name(tool: Mapping[str, Any]) -> str | None:
    """The function name a tool schema declares, if it declares one."""
    fn = tool.get("function")
    name = fn.get("name") if isinstance(fn, Mapping) else tool.get("name")
    return name if isinstance(name, str) else None


def _check_depth(value: Any, depth: int, where: str) -> None:
    if depth > MAX_DEPTH:
        raise ValueError(f"{where}: the schema is nested deeper than {MAX_DEPTH} levels")
    if isinstance(value, Mapping):
        for v in value.values():
            _check_depth(v, depth + 1, where)
    elif isinstance(value, (list, tuple)):
        for v in value:
            _check_depth(v, depth + 1, where)


_SCALAR_TYPES = {str: "string", int: "integer", float: "number", bool: "boolean", type(None): "null"}
_CONTAINER_TYPES = {list: "array", tuple: "array", dict: "object"}


def function_schema(fn: Callable[..., Any]) -> dict[str, Any]:
    """The JSON schema transformers' `get_json_schema` gives for a plain function, for the common cases only:
    parameters typed with str/int/float/bool/list/dict (also `list[X]`, `dict[str, X]`, `X | None`) and a
    Google-style docstring whose `Args:` describe every parameter. Anything fancier: pass a schema dict."""
    name = getattr(fn, "__name__", "operation")
    doc = inspect.getdoc(fn)
    if not doc:
        raise ValueError(f"tool {name!r}: a function tool needs a docstring (or pass a JSON-schema dict)")
    description, arg_docs, returns_doc = _google_docstring(doc.strip())
    hints = typing.get_type_hints(fn)
    params = list(inspect.signature(fn).parameters.values())
    if params and params[0].name in ("self", "cls") and params[0].annotation is inspect.Parameter.empty:
        params = params[1:]
    properties: dict[str, Any] = {}
    required = []
    for param in params:
        if param.name not in hints:
            raise ValueError(f"tool {name!r}: argument {param.name!r} has no type hint")
        if param.name not in arg_docs:
            raise ValueError(f"tool {name!r}: the docstring's Args: section does not describe {param.name!r}")
        properties[param.name] = {**hint_schema(hints[param.name], name), "description": arg_docs[param.name]}
        if param.default is inspect.Parameter.empty:
            required.append(param.name)
    parameters: dict[str, Any] = {"type": "object", "properties": properties}
    if required:
        parameters["required"] = required
    out: dict[str, Any] = {"name": name, "description": description, "parameters": parameters}
    if "return" in hints:
        try:
            out["return"] = hint_schema(hints["return"], name)
        except ValueError:
            pass  # the model never writes the return value; an unusual return type is no reason to refuse the tool
        else:
            if returns_doc is not None:
                out["return"]["description"] = returns_doc
    return {"type": "function", "function": out}


def hint_schema(hint: Any, tool: str) -> dict[str, Any]:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is None and hint in _SCALAR_TYPES:
        return {"type": _SCALAR_TYPES[hint]}
    if origin is None and hint in _CONTAINER_TYPES:
        return {"type": _CONTAINER_TYPES[hint]}
    if origin is list and len(args) == 1:
        return {"type": "array", "items": hint_schema(args[0], tool)}
    if origin is dict and len(args) == 2:
        return {"type": "object", "additionalProperties": hint_schema(args[1], tool)}
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            schema = hint_schema(inner[0], tool)
        elif all(a in _SCALAR_TYPES for a in inner):
            schema = {"type": sorted({_SCALAR_TYPES[a] for a in inner})}
        else:
            raise ValueError(f"tool {tool!r}: unsupported union {hint!r}; pass a JSON-schema dict instead")
        if len(inner) < len(args):
            schema["nullable"] = True
        return schema
    raise ValueError(f"tool {tool!r}: unsupported type hint {hint!r}; pass a JSON-schema dict instead")


def _google_docstring(doc: str) -> tuple[str, dict[str, str], str | None]:
    """(description, {arg: description}, returns) from a Google-style docstring; continuation lines are joined."""
    sections = re.split(r"\n\s*(Args|Returns|Raises):\s*\n", "\n" + doc)
    description = sections[0].strip()
    named = dict(zip(sections[1::2], sections[2::2], strict=True))
    args: dict[str, str] = {}
    lines = [line for line in named.get("Args", "").split("\n") if line.strip()]
    base = min((len(line) - len(line.lstrip()) for line in lines), default=0)
    current = None
    for line in lines:
        indent = len(line) - len(line.lstrip())
        match = re.match(r"(\w+):\s*(.*)", line.strip()) if indent == base else None
        if match:
            current = match.group(1)
            args[current] = match.group(2).strip()
        elif current is not None:
            args[current] = f"{args[current]} {line.strip()}".strip()
    returns = named.get("Returns")
    return description, args, returns.strip() if returns is not None else None


def dataclass_schema(cls: type) -> dict[str, Any]:
    """A closed object schema of a dataclass's fields (every field without a default is required)."""
    hints = typing.get_type_hints(cls)
    props, required = {}, []
    for f in dataclasses.fields(cls):
        props[f.name] = hint_schema(hints[f.name], cls.__name__)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            required.append(f.name)
    return {"type": "object", "properties": props, "required": required, "additionalProperties": False}
