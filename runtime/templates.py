"""Render a checkpoint's own chat template, the way transformers' `apply_chat_template(..., tokenize=False)` does.

Every LFM2 / LFM2.5 checkpoint ships its prompt format as a Jinja template, and the formats differ between
families (tool-list wrapper tokens, a date line, reasoning handling). Running the template itself, in the same
sandbox and with the same helpers transformers provides, is what makes any checkpoint's prompts come out byte
for byte the way the model was trained on, without transformers on the phone.

What is matched from transformers (5.x), because templates depend on it:

- jinja2 `ImmutableSandboxedEnvironment`, `trim_blocks` and `lstrip_blocks`, the `loopcontrols` extension and a
  pass-through `{% generation %}` tag (LFM2.5 templates mark assistant text with it for training masks);
- `tojson` without HTML escaping and with `ensure_ascii` / `indent` / `separators` / `sort_keys`; the globals
  `raise_exception`, `strftime_now`, a `dict` constructor and a `namespace` that refuses `_`-prefixed names;
- message keys whose value is None are dropped (templates test `is defined`, not `is none`);
- reasoning given as `reasoning_content`, `thinking` or `reasoning` is visible under the first two names;
- everything the template sees is rebuilt from plain JSON-like data, so it cannot reach methods of caller objects;
- the named special tokens (`bos_token`, `eos_token`, `pad_token`, ...) are template variables, and extra keyword
  arguments override them;
- with several named templates, `tool_use` is picked when tools are given, else `default`.

A template is code from a download (a checkpoint, a GGUF), so it is treated as untrusted: rendered in the
sandbox with a bounded time (RENDER_SECONDS), a bounded output (`max_chars`), and bounded arithmetic (a
repetition, a power or a number passed to a call past MAX_SIZE is refused). Whatever goes wrong while rendering,
the template's own `raise_exception` included, is one TemplateError naming the template's file.
"""

from __future__ import annotations

import ctypes
import dataclasses
import itertools
import json
import re
import sys
import threading
import time
import typing
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .bundle import BundleError
from .files import describe, read_text
from .schemas import Tool, tool_schema

__all__ = ["ChatTemplate", "TemplateError"]

RENDER_SECONDS = 2.0  # a render that takes longer is refused (real templates take milliseconds)
MAX_CHARS = 4_000_000  # output refused past this, unless the caller sets `max_chars` (LfmModel: the context's worth)
MAX_SIZE = 1_000_000  # largest repetition, power or number passed to a call a template may ask for
MAX_FILE_BYTES = 16 << 20  # a template or tokenizer_config.json larger than this is not one


class TemplateError(ValueError):
    """A chat template that cannot render this conversation (its own raise_exception, a sandbox violation, too
    slow, too long an output, an error in its code); the message names the template's file."""

# The named special tokens transformers hands to every template (its SPECIAL_TOKENS_ATTRIBUTES).
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# Older names for a message's reasoning; templates read `reasoning_content` (LFM2.5: `thinking`).
_REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")


class ChatTemplate:
    """A chat template plus the special tokens it refers to; `render` turns messages into the prompt string."""

    def __init__(self, template: str | Mapping[str, str], special_tokens: Mapping[str, str] | None = None,
                 sources: Mapping[str, str] | None = None):
        """`sources`: where each named template comes from (a file, a field), for error messages."""
        self.templates: dict[str, str] = {"default": template} if isinstance(template, str) else dict(template)
        if not self.templates or not all(isinstance(t, str) for t in self.templates.values()):
            raise ValueError("a chat template must be a Jinja string or a non-empty {name: Jinja string} mapping")
        self.special_tokens: dict[str, str] = dict(special_tokens or {})
        self.sources = {name: (sources or {}).get(name, f"chat template {name!r}") for name in self.templates}
        self.max_chars = MAX_CHARS

    @classmethod
    def from_folder(cls, folder: str | Path) -> ChatTemplate:
        """Read the template and special tokens from a tokenizer folder, with transformers' precedence:
        `chat_template.jinja` (and `chat_templates/*.jinja`) over `tokenizer_config.json`'s `chat_template`."""
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"tokenizer folder not found: {folder}")
        config_path, jinja_path = folder / "tokenizer_config.json", folder / "chat_template.jinja"
        config = _read_json(config_path)
        templates: dict[str, str] = {}
        where: dict[str, str] = {}  # template name -> its file (and field), for errors
        if jinja_path.exists():
            templates["default"], where["default"] = _read_template(jinja_path), str(jinja_path)
        extra_dir = folder / "chat_templates"
        if extra_dir.is_dir():
            for path in sorted(extra_dir.glob("*.jinja")):
                name = path.name.removesuffix(".jinja")
                templates[name], where[name] = _read_template(path), str(path)
        if not templates:
            templates = _templates_from_config(config.get("chat_template"), config_path)
            field = "chat_template" if isinstance(config.get("chat_template"), str) else "chat_template[{!r}]"
            where = {name: f"{config_path}: {field.format(name)}" for name in templates}
        if not templates:
            raise ValueError(f"no chat template: {config_path} has no 'chat_template' and there is no {jinja_path}")
        for name, source in templates.items():  # a broken template fails at load, not at the first message
            if not isinstance(source, str):
                raise BundleError(f"{where[name]}: must be a Jinja string, found {type(source).__name__}")
            try:
                _compile(source)
            except jinja2.TemplateSyntaxError as e:
                raise BundleError(f"{where[name]}: Jinja syntax error at line {e.lineno}: {e.message}") from None
            except (RecursionError, MemoryError):
                raise BundleError(f"{where[name]}: the template is nested too deeply to compile") from None
        # Legacy checkpoints keep some special tokens in special_tokens_map.json; tokenizer_config.json wins.
        legacy = _read_json(folder / "special_tokens_map.json")
        special = {}
        for name in SPECIAL_TOKEN_NAMES:
            value = _token_text(config.get(name))
            value = value if value is not None else _token_text(legacy.get(name))
            if value is not None:
                special[name] = value
        return cls(templates, special, where)

    @property
    def bos_token(self) -> str | None:
        return self.special_tokens.get("bos_token")

    @property
    def eos_token(self) -> str | None:
        return self.special_tokens.get("eos_token")

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        tools: Sequence[Tool] | None = None,
        add_generation_prompt: bool = True,
        *,
        documents: Sequence[Mapping[str, Any]] | None = None,
        now: datetime | None = None,
        **extra: Any,
    ) -> str:
        """The prompt text for `messages`. `tools` are JSON-schema dicts (or documented, type-hinted functions,
        see schemas.function_schema); `extra` become template variables (e.g. `keep_past_thinking=True`); `now` pins
        the template's `strftime_now` (a conversation renders the date it started on, every turn).
        Unlike transformers, `add_generation_prompt` defaults to True: here a prompt is rendered to generate."""
        chat = _check_messages(messages)
        schemas = None if tools is None else [tool_schema(tool, i) for i, tool in enumerate(tools)]
        if documents is not None and not all(isinstance(d, Mapping) for d in documents):
            raise ValueError("documents must be a list of dicts (with 'title' and 'text' keys)")
        variables = _plain({**self.special_tokens, **extra})
        if now is not None:
            variables["strftime_now"] = now.strftime  # shadows the global that reads the clock
        name = self._pick(tools is not None)
        try:
            template = _compile(self.templates[name])
        except jinja2.TemplateSyntaxError as e:
            raise TemplateError(f"{self.sources[name]}: Jinja syntax error at line {e.lineno}: {e.message}") from None
        variables.update(messages=chat, tools=_plain(schemas), documents=_plain(documents),
                         add_generation_prompt=add_generation_prompt)
        return _render_bounded(template, variables, self.sources[name], self.max_chars)

    def _pick(self, has_tools: bool) -> str:
        if has_tools and "tool_use" in self.templates:
            return "tool_use"
        if "default" in self.templates:
            return "default"
        raise ValueError(f"several chat templates {sorted(self.templates)} and none is named 'default'")


# --- reading the folder -----------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        data = json.loads(read_text(path, MAX_FILE_BYTES))
    except OSError as e:
        raise BundleError(f"{path}: cannot read it ({describe(e)})") from None
    except (ValueError, RecursionError) as e:
        raise BundleError(f"{path}: not valid JSON ({e})") from None
    return data if isinstance(data, dict) else {}


def _read_template(path: Path) -> str:
    try:
        return read_text(path, MAX_FILE_BYTES)
    except OSError as e:
        raise BundleError(f"{path}: cannot read it ({describe(e)})") from None
    except UnicodeDecodeError:
        raise BundleError(f"{path}: not UTF-8 text") from None


def _templates_from_config(value: Any, path: Path) -> dict[str, str]:
    if value is None:
        return {}
    if isinstance(value, str):
        return {"default": value}
    if isinstance(value, list) and all(isinstance(t, dict) and {"name", "template"} <= t.keys() for t in value):
        return {t["name"]: t["template"] for t in value}
    if isinstance(value, dict):
        return dict(value)
    raise ValueError(f"{path}: 'chat_template' must be a string or a list of {{name, template}} entries")


def _token_text(value: Any) -> str | None:
    """Special tokens are saved as strings or as AddedToken dicts carrying a 'content'."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


# --- inputs ------------------------------------------------------------------------------------------------------


def _check_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
        raise ValueError(f"messages must be a list of dicts, got {type(messages).__name__}")
    if not messages:
        raise ValueError("cannot render an empty conversation; give at least one message")
    chat = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
            raise ValueError(f"message {i} must be a dict with a string 'role', got {message!r:.80}")
        # Keys set to None (OpenAI's content=None next to tool_calls) are dropped: templates test `is defined`.
        plain = _plain({k: v for k, v in message.items() if v is not None})
        reasoning = next((plain[k] for k in _REASONING_KEYS if plain.get(k) is not None), None)
        if reasoning is not None:
            plain = {"thinking": reasoning, **plain, "reasoning_content": reasoning}
        chat.append(plain)
    return chat


def _plain(value: Any) -> Any:
    """Rebuild `value` from JSON-like types. The sandbox only guards attribute access; caller objects (arrays,
    images, models) carry methods it cannot judge, so they are reduced to data or to an inert '<TypeName>'."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    numpy = sys.modules.get("numpy")
    if numpy is not None and isinstance(value, numpy.generic):
        return _plain(value.item())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return _plain(value.model_dump())
    return f"<{type(value).__name__}>"


# --- the Jinja environment ---------------------------------------------------------------------------------------


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks the assistant's tokens for training masks; renders as is."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Callable[[], str]) -> str:
        return caller()


class _Namespace(jinja2.utils.Namespace):
    """Jinja's `namespace()`, refusing `_`-prefixed names so a template cannot touch Python internals through it."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: B902 - `self` travels in args, as in jinja2's Namespace
        self, attrs = args[0], dict(*args[1:], **kwargs)
        for name in attrs:
            _refuse_private(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _refuse_private(name)
        super().__setitem__(name, value)


def _refuse_private(name: Any) -> None:
    if isinstance(name, str) and name.startswith("_"):
        raise jinja2.exceptions.SecurityError(f"chat templates may not set underscore-prefixed names ({name!r})")


class _DictMaker:
    """Stands in for `dict` in templates: builds dicts, but exposes nothing of the `dict` type itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any) -> dict:
        return dict.fromkeys(*args)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | str | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # Jinja's own filter HTML-escapes '<', '>', '&' and "'", which would change the prompt text.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class _Raised(jinja2.exceptions.TemplateError):
    """What a template's own raise_exception raises (templates do so for role orders they refuse)."""


def _raise_exception(message: str) -> typing.NoReturn:
    raise _Raised(str(message))


class _TimeUp(TemplateError):
    """Raised into a render that ran past its time (a TemplateError wherever it lands)."""


class _Watchdog:
    """One daemon thread that interrupts renders running past their deadline, by raising _TimeUp in the
    rendering thread (CPython's PyThreadState_SetAsyncExc: delivered at the template code's next bytecode, so
    nested loops stop; a normal render pays nothing but a lock)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._jobs: dict[int, tuple[float, int]] = {}  # token -> (deadline, thread id)
        self._tokens = itertools.count()
        self._thread: threading.Thread | None = None

    def start(self, seconds: float) -> int:
        with self._cond:
            token = next(self._tokens)
            self._jobs[token] = (time.monotonic() + seconds, threading.get_ident())
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="lfm-template-watchdog", daemon=True)
                self._thread.start()
            self._cond.notify()
            return token

    def stop(self, token: int) -> None:
        with self._cond:
            fired = self._jobs.pop(token, None) is None
        if fired:  # the exception may still be pending in this thread: cleared, it fires nowhere else
            _async_raise(threading.get_ident(), None)

    def _run(self) -> None:
        with self._cond:
            while True:
                if not self._jobs:
                    self._cond.wait()
                    continue
                token, (deadline, thread) = min(self._jobs.items(), key=lambda job: job[1][0])
                wait = deadline - time.monotonic()
                if wait > 0:
                    self._cond.wait(wait)
                    continue
                del self._jobs[token]
                _async_raise(thread, _TimeUp)


def _async_raise(thread: int, exception: type | None) -> None:
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread),
                                               ctypes.py_object(exception) if exception else None)


_WATCHDOG = _Watchdog()


def _render_bounded(template: jinja2.Template, variables: dict[str, Any], where: str, max_chars: int) -> str:
    """template.render(**variables), stopped after RENDER_SECONDS or past `max_chars` of output; every failure
    a TemplateError naming `where`."""
    token = _WATCHDOG.start(RENDER_SECONDS)
    try:
        out, length = [], 0
        for chunk in template.generate(**variables):
            length += len(chunk)
            if length > max_chars:
                raise TemplateError(f"{where}: the rendered prompt passed {max_chars:,} characters (the context's "
                                    "worth); refused")
            out.append(chunk)
        return "".join(out)
    except _TimeUp:
        raise TemplateError(f"{where}: rendering took more than {RENDER_SECONDS:g} s; refused (a template loops or "
                            "builds something huge)") from None
    except _Raised as e:
        raise TemplateError(f"{where}: the chat template refused this conversation: {e.message}") from None
    except jinja2.exceptions.SecurityError as e:
        raise TemplateError(f"{where}: the chat template tried what the sandbox forbids ({e})") from None
    except TemplateError:
        raise
    except (jinja2.exceptions.TemplateError, TypeError, ValueError, KeyError, IndexError, AttributeError,
            ArithmeticError, RecursionError, MemoryError) as e:
        raise TemplateError(f"{where}: the chat template failed on this conversation ({type(e).__name__}: "
                            f"{str(e)[:200]})") from None
    finally:
        _WATCHDOG.stop(token)


class _Sandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox, with bounded arithmetic: `'x' * 10**9`, `2 ** 10**9` and `' '.ljust(10**9)` are
    refused before Python computes them (the time bound cannot stop one long C-level operation)."""

    intercepted_binops = frozenset(["*", "**", "+"])

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and n * max(len(seq), 1) > MAX_SIZE:
                    raise jinja2.exceptions.SecurityError(f"a repetition of {n:,} x {len(seq):,} is too large")
        elif operator == "**":
            if isinstance(right, (int, float)) and abs(right) > 64 and isinstance(left, (int, float)) and \
                    abs(left) > 1:
                raise jinja2.exceptions.SecurityError(f"a power of {right} is too large")
        elif operator == "+" and isinstance(left, (str, list, tuple)) and isinstance(right, (str, list, tuple)):
            if len(left) + len(right) > 4 * MAX_CHARS:
                raise jinja2.exceptions.SecurityError("a concatenation past the output bound")
        return super().call_binop(context, operator, left, right)

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805 (jinja's names)
        for value in (*args, *kwargs.values()):
            if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_SIZE:
                raise jinja2.exceptions.SecurityError(f"a number as large as {value:,} passed to a call")
        return super().call(__context, __obj, *args, **kwargs)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=1)
def _environment() -> _Sandbox:
    version = tuple(int(p) for p in re.findall(r"\d+", jinja2.__version__)[:3])
    if version < (3, 1, 6):
        raise ImportError(f"jinja2>=3.1.6 is needed (older sandboxes have known escapes); found {jinja2.__version__}")
    env = _Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, dict=_DictMaker(),
                       namespace=_Namespace)
    return env


@lru_cache(maxsize=16)
def _compile(source: str) -> jinja2.Template:
    return _environment().from_string(source)
