"""Constrained decoding: a mask of allowed tokens, applied by the sampler before it picks (sampling.next_tokens).

Grammars are llguidance's (JSON schema, regex, Lark), compiled against the bundle's own tokenizer; this file
only decides *when* a grammar applies:
- `response_format`: the answer after any reasoning is a JSON document of a schema (or a regex / Lark match);
- `ToolCalls`: free text stays free; once the model opens `<|tool_call_start|>`, what follows is a Pythonic
  (or JSON) list of calls to the offered functions with arguments of their schemas' types, then
  `<|tool_call_end|>`;
- `ToolChoice`: "none" forbids the call marker (`Forbid`); "required" or a named function forces a call and
  ends the turn after it (`CallOnly`); `parallel` False allows one call;
- `ReasoningControl`: thinking ends (`</think>` is forced) when its token budget is spent or it repeats itself.
A constraint's `mask()` is None while it does not apply (no cost), else a bool array over the vocabulary.
"""

from __future__ import annotations

import dataclasses
import json
import threading
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from .schemas import dataclass_schema


class ConstraintError(ValueError):
    """A schema, regex or grammar that cannot be compiled; the message names what is wrong."""


@dataclasses.dataclass(frozen=True)
class ToolChoice:
    """Whether and which tool the model calls (OpenAI's `tool_choice` and `parallel_tool_calls`, as data):
    mode "auto" (the model decides), "none" (no call), "required" (a call, and the turn ends with it); or a
    `function` name (a call to that function, and the turn ends with it). `parallel` False allows one call per
    turn. `of()` reads OpenAI's spellings: "auto" | "none" | "required" | {"type": "function", "function":
    {"name": N}}."""

    mode: str = "auto"
    function: str | None = None
    parallel: bool = True

    @classmethod
    def of(cls, value: str | Mapping[str, Any] | ToolChoice, parallel: bool = True) -> ToolChoice:
        if isinstance(value, ToolChoice):
            return value
        if value in ("auto", "none", "required"):
            return cls(str(value), None, parallel)
        function = value.get("function") if isinstance(value, Mapping) else None
        name = function.get("name") if isinstance(function, Mapping) else None
        if not isinstance(name, str) or value.get("type", "function") != "function":
            raise ConstraintError(f"tool_choice {value!r}: expected 'auto', 'none', 'required' or "
                                  "{'type': 'function', 'function': {'name': ...}}")
        return cls("function", name, parallel)


class Constraint(Protocol):
    def mask(self) -> np.ndarray | None: ...  # allowed tokens [V] (bool), or None: anything goes

    def advance(self, token: int) -> None: ...  # the token that was picked


class Vocabulary:
    """llguidance's view of a bundle's tokenizer (built once per model: ~0.5 s at 65K tokens, ~2 s at 128K)."""

    def __init__(self, tokenizer_json: str, size: int, eos: int, specials: Mapping[str, int]):
        import llguidance

        self.llg, self.size, self.eos, self.specials = llguidance, size, eos, dict(specials)
        self.tokenizer = llguidance.LLTokenizer(tokenizer_json, n_vocab=size, eos_token=eos)

    def matcher(self, grammar: str) -> Any:
        m = self.llg.LLMatcher(self.tokenizer, grammar, log_level=0)
        if m.is_error():
            raise ConstraintError(_first_line(m.get_error()))
        return m

    def only(self, token: int) -> np.ndarray:
        allowed = np.zeros(self.size, dtype=bool)
        allowed[token] = True
        return allowed


def _first_line(message: str) -> str:
    return message.strip().splitlines()[0] if message.strip() else "the grammar does not compile"


class Grammar:
    """An llguidance grammar from the first token on (after the EOS it ends with, nothing more is allowed)."""

    def __init__(self, vocab: Vocabulary, grammar: str):
        self.vocab, self.matcher = vocab, vocab.matcher(grammar)

    def mask(self) -> np.ndarray:
        bits = np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8)
        allowed = np.unpackbits(bits, bitorder="little")[:self.vocab.size].astype(bool)
        if not allowed.any():  # the grammar is complete (or stuck): end the answer
            return self.vocab.only(self.vocab.eos)
        return allowed

    def advance(self, token: int) -> None:
        if not self.matcher.is_stopped() and not self.matcher.consume_token(token):
            raise ConstraintError(f"token {token} broke the grammar: {self.matcher.get_error()}")

    @property
    def satisfied(self) -> bool:
        return self.matcher.is_accepting()


class AfterReasoning:
    """`inner` applies once reasoning is over: at once, or after `</think>` when the prompt opened it."""

    def __init__(self, inner: Grammar, think_end: int | None, in_reasoning: bool):
        self.inner, self.think_end, self.waiting = inner, think_end, in_reasoning and think_end is not None

    def mask(self) -> np.ndarray | None:
        return None if self.waiting else self.inner.mask()

    def advance(self, token: int) -> None:
        if self.waiting:
            self.waiting = token != self.think_end
        else:
            self.inner.advance(token)


class ToolCalls:
    """Free text until `<|tool_call_start|>`; then the call grammar of the offered tools (one call when
    `single`) up to `<|tool_call_end|>`; then free again (several blocks are fine)."""

    def __init__(self, vocab: Vocabulary, schemas: Sequence[Mapping[str, Any]], start: int, end_marker: str,
                 single: bool = False):
        self.vocab, self.start = vocab, start
        self.grammar = pythonic_calls_grammar(schemas, end_marker, single)
        vocab.matcher(self.grammar)  # compile now: a schema llguidance refuses fails before generating
        self.active: Grammar | None = None

    def mask(self) -> np.ndarray | None:
        return None if self.active is None else self.active.mask()

    def advance(self, token: int) -> None:
        if self.active is not None:
            self.active.advance(token)
            if self.active.satisfied:  # the grammar ends with the end marker: the block is closed
                self.active = None
        elif token == self.start:
            self.active = Grammar(self.vocab, self.grammar)


class ReasoningControl:
    """Ends thinking by forcing `</think>` once `budget` thinking tokens are spent (None: no budget; 0: answer
    at once) or when the trace repeats one span `repeats` times in a row (a stuck loop)."""

    def __init__(self, size: int, think_start: int, think_end: int, in_reasoning: bool,
                 budget: int | None, repeats: int = 4, min_span: int = 24):
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 0):
            raise ValueError(f"reasoning_budget {budget!r}: expected an int >= 0 (tokens; 0 answers without "
                             "thinking) or None")
        self.size, self.think_start, self.think_end = size, think_start, think_end
        self.thinking, self.budget, self.repeats, self.min_span = in_reasoning, budget, repeats, min_span
        self.thinking_tokens, self.forced, self.history = 0, "", []

    def mask(self) -> np.ndarray | None:
        if not self.thinking:
            return None
        if self.budget is not None and self.thinking_tokens >= self.budget:
            self.forced = "budget"
        elif _repeating(self.history, self.repeats, self.min_span):
            self.forced = "repetition"
        else:
            return None
        allowed = np.zeros(self.size, dtype=bool)
        allowed[self.think_end] = True
        return allowed

    def advance(self, token: int) -> None:
        if token == self.think_start and not self.thinking:
            self.thinking, self.history = True, []
        elif token == self.think_end:
            self.thinking = False
        elif self.thinking:
            self.thinking_tokens += 1
            self.history = (self.history + [token])[-256:]


def _repeating(history: list[int], repeats: int, min_span: int) -> bool:
    """Whether the last tokens are one span of 1..64 tokens repeated `repeats` times (at least min_span long)."""
    n = len(history)
    for period in range(1, 65):
        span = period * repeats
        if span > n:
            return False
        if span >= min_span and history[-1] == history[-1 - period] and \
                history[-span:] == history[-period:] * repeats:
            return True
    return False


class CallOnly:
    """tool_choice "required" or a named function: once reasoning is over (at once, or after `</think>` when the
    prompt opened it) the next token is a tool call's start; once the call block's `end` is written, `stop` (the
    end of turn) follows: the answer is the call. The call itself is ToolCalls' to hold."""

    def __init__(self, size: int, start: int, end: int, stop: int, think_end: int | None, in_reasoning: bool):
        self.size, self.start, self.end, self.stop, self.think_end = size, start, end, stop, think_end
        self.phase = "reasoning" if in_reasoning and think_end is not None else "start"

    def mask(self) -> np.ndarray | None:
        if self.phase not in ("start", "stop"):
            return None
        allowed = np.zeros(self.size, dtype=bool)
        allowed[self.start if self.phase == "start" else self.stop] = True
        return allowed

    def advance(self, token: int) -> None:
        if self.phase == "reasoning" and token == self.think_end:
            self.phase = "start"
        elif self.phase == "start":
            self.phase = "call"
        elif self.phase == "call" and token == self.end:
            self.phase = "stop"
        elif self.phase == "stop":
            self.phase = "done"


class Forbid:
    """`tokens` are never sampled (a tool call's start, for tool_choice "none")."""

    def __init__(self, size: int, tokens: Sequence[int]):
        self.allowed = np.ones(size, dtype=bool)
        self.allowed[list(tokens)] = False

    def mask(self) -> np.ndarray:
        return self.allowed

    def advance(self, token: int) -> None:
        pass


class All:
    """Several constraints on one row: a token must satisfy every one that applies."""

    def __init__(self, parts: Sequence[Any]):
        self.parts = [p for p in parts if p is not None]

    def mask(self) -> np.ndarray | None:
        masks = [m for m in (p.mask() for p in self.parts) if m is not None]
        if not masks:
            return None
        allowed = masks[0]
        for m in masks[1:]:
            allowed = allowed & m
        return allowed

    def advance(self, token: int) -> None:
        for p in self.parts:
            p.advance(token)

    def find(self, kind: type) -> Any:
        return next((p for p in self.parts if isinstance(p, kind)), None)


# --- what users pass ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ResponseFormat:
    """`json_schema` (a dict), `regex` or `lark`: one of them. `parse` turns the answer into the object returned
    as Done.parsed (json.loads, then the Pydantic model or dataclass the schema came from)."""

    json_schema: Mapping[str, Any] | None = None
    regex: str | None = None
    lark: str | None = None
    target: Any = None  # a Pydantic model class or a dataclass

    def grammar(self, llg: Any) -> str:
        try:
            if self.json_schema is not None:
                return llg.LLMatcher.grammar_from_json_schema(json.dumps(self.json_schema), defaults=_COMPACT_JSON)
            if self.regex is not None:
                return llg.LLMatcher.grammar_from_regex(self.regex)
            return llg.LLMatcher.grammar_from_lark(self.lark)
        except (ValueError, TypeError, RuntimeError) as e:
            raise ConstraintError(f"response_format: {_first_line(str(e))}") from None

    def parse(self, text: str) -> Any:
        if self.json_schema is None:
            return text
        data = json.loads(text)
        if self.target is None:
            return data
        if hasattr(self.target, "model_validate"):
            return self.target.model_validate(data)
        return self.target(**data)


def closed(schema: Any) -> Any:
    """`schema` with every object that does not say otherwise closed (`additionalProperties: false`). Pydantic
    writes nothing for its default (extra keys ignored), `true` for extra="allow": a model's answer held to an
    open object may add keys forever, and a Python type has no use for them."""
    if isinstance(schema, list):
        return [closed(s) for s in schema]
    if not isinstance(schema, Mapping):
        return schema
    out = {k: closed(v) for k, v in schema.items()}
    if (out.get("type") == "object" or "properties" in out) and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def response_format(spec: Any) -> ResponseFormat:
    """A ResponseFormat from what users pass: one, a JSON schema dict, {"type": "json_schema", "json_schema":
    {"schema": ...}} (OpenAI's shape), {"regex": ...}, {"lark": ...}, a Pydantic model class (its objects closed
    unless it allows extra keys: `closed`) or a dataclass (closed)."""
    if isinstance(spec, ResponseFormat):
        return spec
    if isinstance(spec, type) and hasattr(spec, "model_json_schema"):
        return ResponseFormat(json_schema=closed(spec.model_json_schema()), target=spec)
    if isinstance(spec, type) and dataclasses.is_dataclass(spec):
        return ResponseFormat(json_schema=dataclass_schema(spec), target=spec)
    if isinstance(spec, Mapping):
        if spec.get("type") == "json_schema" and isinstance(spec.get("json_schema"), Mapping):
            return ResponseFormat(json_schema=spec["json_schema"].get("schema", {}))
        if set(spec) == {"regex"}:
            return ResponseFormat(regex=str(spec["regex"]))
        if set(spec) == {"lark"}:
            return ResponseFormat(lark=str(spec["lark"]))
        return ResponseFormat(json_schema=dict(spec))
    raise ConstraintError(f"response_format: expected a JSON schema dict, {{'regex': ...}}, {{'lark': ...}}, a "
                          f"Pydantic model or a dataclass, got {type(spec).__name__}")


# --- the Pythonic tool-call grammar ------------------------------------------------------------------------------

_VALUE_RULES = r'''
str_value: /'([^'\\\n]|\\.)*'/ | /"([^"\\\n]|\\.)*"/
int_value: /-?(0|[1-9][0-9]*)/
num_value: /-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?/
bool_value: "True" | "False"
none_value: "None"
any_value: str_value | num_value | bool_value | none_value | any_list | any_dict
any_list: "[" (any_value (", " any_value)*)? "]"
any_dict: "{" (str_value ": " any_value (", " str_value ": " any_value)*)? "}"
'''


# compact separators, no free whitespace: a small model held to flexible JSON can loop on newlines inside an
# object until max_new_tokens (seen on the demo model, in answers and in JSON tool calls alike)
_COMPACT_JSON = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def pythonic_calls_grammar(schemas: Sequence[Mapping[str, Any]], end_marker: str, single: bool = False) -> str:
    """A Lark grammar for `[f(a=1, b='x'), g()]` (or the same calls in JSON) followed by the end marker: each
    call one of `schemas`' functions, required arguments first then optional ones, in the schema's order, values
    of their types; one call only when `single`."""
    rules, calls = [], []
    for n, schema in enumerate(schemas):
        fn = schema.get("function", schema)
        name = fn.get("name")
        if not isinstance(name, str) or not name.replace("_", "a").replace(".", "a").isalnum():
            raise ConstraintError(f"tool {name!r}: a Pythonic call needs a name of letters, digits, _ and .")
        params = fn.get("parameters") or {}
        props = params.get("properties") or {}
        required = [p for p in params.get("required", []) if p in props]
        order = required + [p for p in props if p not in required]
        for p in order:
            if not p.isidentifier():
                raise ConstraintError(f"tool {name!r}: argument {p!r} is not a Python identifier")
        args = []
        for k, p in enumerate(order):
            rules.append(f"t{n}_v{k}: {_value(props[p], rules, f't{n}_v{k}')}")
            args.append((f'"{p}=" t{n}_v{k}', p in required))
        rules += _argument_rules(f"t{n}", args)
        rules.append(f't{n}: "{name}(" t{n}_first0 ")"')
        calls.append(f"t{n}")
    if not calls:
        raise ConstraintError("no tools to constrain calls to")
    # the same calls as JSON ({"name", "arguments"} objects), which templates asking for JSON calls get and
    # the parser reads inside the same markers (toolcalls.parse_call_list)
    as_json = {"type": "array", "minItems": 1, **({"maxItems": 1} if single else {}), "items": {"anyOf": [
        {"type": "object", "properties": {"name": {"const": fn.get("name")}, "arguments": _arguments_schema(fn)},
         "required": ["name", "arguments"], "additionalProperties": False}
        for fn in (schema.get("function", schema) for schema in schemas)]},
        "x-guidance": _COMPACT_JSON}
    more = "" if single else ' (", " call)*'
    head = (f'start: (py_calls | json_calls) {end_marker}\npy_calls: "[" call{more} "]"\n'
            f'json_calls: %json {json.dumps(as_json)}\ncall: {" | ".join(calls)}')
    return "\n".join([head, *rules, _VALUE_RULES])


def _arguments_schema(fn: Mapping[str, Any]) -> dict[str, Any]:
    params = dict(fn.get("parameters") or {"type": "object", "properties": {}})
    params.setdefault("type", "object")
    params.setdefault("additionalProperties", False)
    return params


def _argument_rules(prefix: str, args: list[tuple[str, bool]]) -> list[str]:
    """first_k: arguments k.. when none was written yet; more_k: after one was (so a comma goes first)."""
    rules = [f'{prefix}_first{len(args)}: ""', f'{prefix}_more{len(args)}: ""']
    for k in range(len(args) - 1, -1, -1):
        arg, needed = args[k]
        first = f"{arg} {prefix}_more{k + 1}"
        more = f'", " {arg} {prefix}_more{k + 1}'
        rules.append(f"{prefix}_first{k}: {first}" + ("" if needed else f" | {prefix}_first{k + 1}"))
        rules.append(f"{prefix}_more{k}: {more}" + ("" if needed else f" | {prefix}_more{k + 1}"))
    return rules


def _value(schema: Mapping[str, Any], rules: list[str], name: str) -> str:
    if "enum" in schema:
        return " | ".join(_literal(v) for v in schema["enum"]) or "none_value"
    if "const" in schema:
        return _literal(schema["const"])
    for key in ("anyOf", "oneOf"):
        if key in schema:
            alts = []
            for i, sub in enumerate(schema[key]):
                rules.append(f"{name}_{i}: {_value(sub, rules, f'{name}_{i}')}")
                alts.append(f"{name}_{i}")
            return " | ".join(alts)
    kind = schema.get("type")
    if isinstance(kind, list):
        return " | ".join(_value(dict(schema, type=k), rules, f"{name}_{k}") for k in kind)
    if kind == "array" and isinstance(schema.get("items"), Mapping):
        rules.append(f"{name}_item: {_value(schema['items'], rules, f'{name}_item')}")
        return f'"[" ({name}_item (", " {name}_item)*)? "]"'
    return {"string": "str_value", "integer": "int_value", "number": "num_value", "boolean": "bool_value",
            "null": "none_value", "array": "any_list", "object": "any_dict"}.get(kind, "any_value")


def _literal(value: Any) -> str:
    python = repr(value)
    return json.dumps(python)  # a Lark string literal of the Python spelling


# --- per model: what a model's generations are held to -------------------------------------------------------

class Constraints:
    """The constraints generations over one model can be held to. Owns llguidance's view of the model's
    tokenizer, built on first use (a grammar is needed) and shared by every generation, from any thread."""

    def __init__(self, tokenizer: Any, tokenizer_json: str, vocab_size: int, eos_token_ids: Sequence[int]):
        self.specials = {t.content: i for i, t in tokenizer.get_added_tokens_decoder().items()}
        self.tokenizer_json, self.vocab_size = tokenizer_json, vocab_size
        self.eos = int(eos_token_ids[0]) if eos_token_ids else self.specials.get("<|im_end|>", 0)
        self._vocabulary: Vocabulary | None = None
        self._lock = threading.Lock()

    @property
    def vocabulary(self) -> Vocabulary:
        with self._lock:
            if self._vocabulary is None:
                try:
                    import llguidance  # noqa: F401
                except ImportError:
                    raise ConstraintError("constrained decoding needs llguidance (pip install llguidance)") from None
                self._vocabulary = Vocabulary(self.tokenizer_json, self.vocab_size, self.eos, self.specials)
            return self._vocabulary

    def build(self, prompt_in_reasoning: bool, schemas: Sequence[Mapping[str, Any]] | None,
              response_format_spec: Any = None, reasoning_budget: int | None = None,
              constrain_tools: bool | None = None, reasoning_guard: bool = True,
              tool_choice: str | Mapping[str, Any] | ToolChoice = "auto") -> All | None:
        """The constraints of one generation, or None. Tool calls are constrained when tools are offered (and no
        response_format asks for something else): `constrain_tools` None does so when llguidance is installed,
        True requires it, False never. `tool_choice` (ToolChoice or OpenAI's spelling) anything but "auto" with
        parallel calls needs llguidance. llguidance's tokenizer is built only when a grammar is needed."""
        specials = self.specials
        choice = ToolChoice.of(tool_choice)
        parts: list[Any] = []
        think_start, think_end = specials.get("<think>"), specials.get("</think>")
        if think_start is not None and think_end is not None and (reasoning_budget is not None or reasoning_guard):
            parts.append(ReasoningControl(self.vocab_size, think_start, think_end, prompt_in_reasoning,
                                          reasoning_budget))
        elif reasoning_budget is not None:
            raise ConstraintError("reasoning_budget: this tokenizer has no <think> / </think> tokens")
        if response_format_spec is not None:
            fmt = response_format(response_format_spec)
            vocab = self.vocabulary
            parts.append(AfterReasoning(Grammar(vocab, fmt.grammar(vocab.llg)), think_end, prompt_in_reasoning))
        elif schemas and choice != ToolChoice():
            parts += self._tool_choice(schemas, choice, think_end, prompt_in_reasoning)
        elif schemas and constrain_tools is not False and "<|tool_call_start|>" in specials and \
                "<|tool_call_end|>" in specials and (constrain_tools or available()):
            parts.append(ToolCalls(self.vocabulary, schemas, specials["<|tool_call_start|>"], "<|tool_call_end|>"))
        return All(parts) if parts else None

    def _tool_choice(self, schemas: Sequence[Mapping[str, Any]], choice: ToolChoice, think_end: int | None,
                     in_reasoning: bool) -> list[Any]:
        start, end = self.specials.get("<|tool_call_start|>"), self.specials.get("<|tool_call_end|>")
        if start is None or end is None:
            raise ConstraintError(f"tool_choice {choice}: this tokenizer has no tool-call markers")
        if choice.mode == "none":
            return [Forbid(self.vocab_size, [start])]
        if choice.mode == "function":
            schemas = [s for s in schemas if s.get("function", s).get("name") == choice.function]
            if not schemas:
                raise ConstraintError(f"tool_choice names {choice.function!r}, which is not among the offered tools")
        calls = ToolCalls(self.vocabulary, schemas, start, "<|tool_call_end|>", single=not choice.parallel)
        if choice.mode == "auto":
            return [calls]
        return [CallOnly(self.vocab_size, start, end, self.eos, think_end, in_reasoning), calls]


def available() -> bool:
    """Whether llguidance can be imported (a phone build may lack it: then tool calls are parsed, not held)."""
    import importlib.util

    return importlib.util.find_spec("llguidance") is not None
