"""Constrained decoding: answers that parse and validate by construction, tool calls that match the offered
functions, and reasoning that ends when its budget is spent or it loops."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from shared_bundles import demo_bundle
from tokenizers import Tokenizer

from lfm_edge.runtime import LfmModel, ToolChoice
from lfm_edge.runtime.constrain import ConstraintError, pythonic_calls_grammar
from lfm_edge.runtime.toolcalls import parse_tool_calls
from scripted_model import write_bundle

DEMO = Path(__file__).resolve().parent.parent / "demo_model"
TOK = Tokenizer.from_file(str(DEMO / "tokenizer.json"))
EOS = TOK.token_to_id("<|im_end|>")
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather.", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"},
                                     "unit": {"type": "string", "enum": ["c", "f"]}},
    "required": ["city"]}}}


def ids(text: str) -> list[int]:
    return TOK.encode(text, add_special_tokens=False).ids


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return LfmModel(demo_bundle(tmp_path_factory.getbasetemp(), "int4"))


def scripted(folder: Path, at: int, said: str, second_choices: dict[str, float] | None = None) -> LfmModel:
    script = {at + i: t for i, t in enumerate(ids(said))}
    choices = {TOK.token_to_id(t) if t.startswith("<") else ids(t)[0]: v for t, v in (second_choices or {}).items()}
    return LfmModel(write_bundle(folder, DEMO, script, TOK.get_vocab_size(), EOS, second_choices=choices))


# --- the Pythonic call grammar ------------------------------------------------------------------------------------

@pytest.mark.parametrize("text,ok", [
    ("[get_weather(city='Paris')]<|tool_call_end|>", True),
    ('[get_weather(city="Paris", days=3)]<|tool_call_end|>', True),
    ("[get_weather(city='Paris', unit='f'), get_weather(city='Rome', days=-2)]<|tool_call_end|>", True),
    ("[get_weather(city='Paris', days='3')]<|tool_call_end|>", False),  # an integer, quoted
    ("[get_weather(days=3)]<|tool_call_end|>", False),  # the required city missing
    ("[get_wether(city='Paris')]<|tool_call_end|>", False),  # no such tool
    ("[get_weather(city='Paris', unit='k')]<|tool_call_end|>", False),  # not in the enum
    ("[get_weather(city='Paris')<|tool_call_end|>", False),  # unclosed
    ('[{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}]<|tool_call_end|>', True),  # JSON
    ('[{"name": "get_weather", "arguments": {"days": 2}}]<|tool_call_end|>', False),  # JSON, city missing
    ('[{"name": "get_wether", "arguments": {"city": "Paris"}}]<|tool_call_end|>', False),  # JSON, no such tool
])
@pytest.mark.slow
def test_call_grammar_accepts_valid_calls_only(demo, text, ok):
    vocab = demo.constraints.vocabulary
    matcher = vocab.matcher(pythonic_calls_grammar([WEATHER], "<|tool_call_end|>"))
    tokens = ids(text)
    accepted = matcher.validate_tokens(tokens)
    assert (accepted == len(tokens)) == ok, (text, accepted, len(tokens))
    if ok:
        assert parse_tool_calls(f"<|tool_call_start|>{text}")  # and our parser reads what the grammar allows


def test_tools_that_cannot_be_called_in_python_syntax_are_named():
    with pytest.raises(ConstraintError, match="'my tool'"):
        pythonic_calls_grammar([{"name": "my tool", "parameters": {}}], "<|tool_call_end|>")
    with pytest.raises(ConstraintError, match="'class'|'a-b'"):
        pythonic_calls_grammar([{"name": "f", "parameters": {"properties": {"a-b": {"type": "string"}}}}], "x")


# --- tool calls in the loop ---------------------------------------------------------------------------------------

def test_a_model_that_writes_a_malformed_call_writes_a_valid_one(tmp_path):
    """The scripted model's first choice leaves the call unclosed; held to the grammar it closes it (its
    second choices) and the tool runs in the first round. Without the constraint the loop needs a retry."""
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    probe = scripted(tmp_path / "probe", 0, "")
    at = len(probe.prompt_ids(messages, [WEATHER]))
    malformed = "<|tool_call_start|>[get_weather(city='Paris'<|tool_call_end|>"
    model = scripted(tmp_path / "model", at, malformed, {")": 0.0, "]": 0.0, "<|tool_call_end|>": 0.0})
    ran = []

    def get_weather(city: str, days: int = 1, unit: str = "c") -> dict:
        ran.append(city)
        return {"sky": "sunny"}

    free = model.run_tools(messages, {"get_weather": get_weather}, schemas=[WEATHER], max_rounds=1,
                           constrain_tools=False, max_new_tokens=30)
    assert free.calls == [] and not ran  # unreadable: nothing ran, another round would be needed
    held = model.run_tools(messages, {"get_weather": get_weather}, schemas=[WEATHER], max_rounds=1,
                           max_new_tokens=30)
    assert ran == ["Paris"] and held.calls[0][0].name == "get_weather"
    assert "[get_weather(city='Paris')]<|tool_call_end|>" in held.messages[1]["content"]


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}},
                                    ToolChoice("required", parallel=False)])
def test_tool_choice_forces_one_turn_that_is_the_call(demo, choice):
    """Even the random-weights demo, which would never call a tool by itself, answers with a valid call and the
    turn ends there; parallel False allows one call; "none" never opens a call."""
    tools = [{"type": "function", "function": {"name": "note", "parameters": {"type": "object", "properties": {
        "text": {"type": "string", "maxLength": 8}}, "required": ["text"]}}}, WEATHER]
    done = demo.chat([{"role": "user", "content": "Weather in Paris?"}], tools, tool_choice=choice,
                         max_new_tokens=120)
    assert done.stats.stopped == "eos" and done.text == ""
    assert done.raw.startswith("<|tool_call_start|>") and done.raw.endswith("<|tool_call_end|>")
    assert done.tool_calls and all(c.name in ("note", "get_weather") for c in done.tool_calls)
    if isinstance(choice, dict):
        assert {c.name for c in done.tool_calls} == {"get_weather"}
    if isinstance(choice, ToolChoice):
        assert len(done.tool_calls) == 1
    none = demo.chat([{"role": "user", "content": "Weather in Paris?"}], tools, tool_choice="none",
                         max_new_tokens=40)
    assert "<|tool_call_start|>" not in none.raw and not none.tool_calls


def test_tool_choice_is_checked(demo):
    for bad, match in [("sometimes", "tool_choice 'sometimes'"), ({"type": "function"}, "tool_choice"),
                       ({"type": "function", "function": {"name": "nope"}}, "'nope'.*not among")]:
        with pytest.raises(ConstraintError, match=match):
            demo.chat([{"role": "user", "content": "x"}], [WEATHER], tool_choice=bad, max_new_tokens=2)


# --- response_format ----------------------------------------------------------------------------------------------

_leaf = st.one_of(
    st.just({"type": "integer"}), st.just({"type": "boolean"}),
    st.builds(lambda n: {"type": "string", "maxLength": n}, st.integers(1, 12)),
    st.builds(lambda vs: {"type": "string", "enum": vs}, st.lists(st.sampled_from(["red", "green", "blue", "x y"]),
                                                                 min_size=1, max_size=3, unique=True)),
    st.builds(lambda lo: {"type": "integer", "minimum": lo, "maximum": lo + 50}, st.integers(-20, 20)),
)
_schema = st.recursive(
    _leaf,
    lambda inner: st.one_of(
        st.builds(lambda items, n: {"type": "array", "items": items, "maxItems": n}, inner, st.integers(0, 3)),
        st.builds(lambda props: {"type": "object", "properties": props, "required": sorted(props),
                                 "additionalProperties": False},
                  st.dictionaries(st.sampled_from(["a", "name", "count", "ok", "tags"]), inner, min_size=1,
                                  max_size=3))),
    max_leaves=5)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(schema=_schema)
@pytest.mark.slow
def test_every_constrained_answer_validates_against_its_schema(demo, schema):
    messages = [{"role": "user", "content": "Give me the data as JSON."}]
    done = demo.chat(messages, response_format=schema, max_new_tokens=160)
    if done.stats.constraint_satisfied:
        jsonschema.validate(done.parsed, schema)
        assert done.parsed == json.loads(done.text)
    else:  # ran out of tokens: flagged, and no half object is returned as valid
        assert done.stats.stopped == "length" and done.parsed is None


def test_pydantic_models_dataclasses_regex_and_lark(demo):
    from pydantic import BaseModel, ConfigDict, Field

    class City(BaseModel):  # bounded, as real schemas are: the tiny demo model would otherwise write on
        name: str = Field(max_length=16)
        population: int = Field(ge=0, le=10**8)

    class Open(BaseModel):  # asks for extra keys: kept open
        model_config = ConfigDict(extra="allow")
        name: str = Field(max_length=16)

    class Trip(BaseModel):  # a nested model: closed too
        to: City
        days: int = Field(ge=1, le=9)

    from lfm_edge.runtime.constrain import response_format
    assert response_format(City).json_schema["additionalProperties"] is False  # plain BaseModel: closed
    assert response_format(Open).json_schema["additionalProperties"] is True
    trip = response_format(Trip).json_schema
    assert trip["additionalProperties"] is False and trip["$defs"]["City"]["additionalProperties"] is False

    @dataclasses.dataclass
    class Point:
        x: int
        y: int
        label: str = "p"

    messages = [{"role": "user", "content": "A city, please."}]
    city = demo.chat(messages, response_format=City, max_new_tokens=120)
    assert isinstance(city.parsed, City) and city.stats.mask_seconds
    point = demo.chat(messages, response_format=Point, max_new_tokens=120)
    assert point.stats.constraint_satisfied is False or isinstance(point.parsed, Point)
    date = demo.chat(messages, response_format={"regex": r"20[0-9]{2}-[01][0-9]-[0-3][0-9]"}, max_new_tokens=20)
    assert len(date.parsed) == 10 and date.parsed[:2] == "20" and date.parsed[4] == "-"
    yes = demo.chat(messages, response_format={"lark": 'start: "yes" | "no"'}, max_new_tokens=5)
    assert yes.parsed in ("yes", "no")
    openai = {"type": "json_schema", "json_schema": {"schema": {"type": "object", "properties": {
        "ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": False}}}
    assert isinstance(demo.chat(messages, response_format=openai, max_new_tokens=40).parsed["ok"], bool)


def test_conversations_take_a_response_format_too(demo):
    conv = demo.conversation(system="You answer in JSON.")
    first = conv.say("Hi", response_format={"type": "object", "properties": {"n": {"type": "integer", "minimum": 0,
                                                                                   "maximum": 99}},
                                            "required": ["n"], "additionalProperties": False}, max_new_tokens=30)
    assert isinstance(first.parsed["n"], int)
    second = conv.say("Again, in plain words.", max_new_tokens=8)  # the next turn is free again
    assert second.parsed is None and second.stats.reused_tokens > 0


@pytest.mark.parametrize("bad,match", [
    ({"type": "object", "properties": {"a": {"type": "string", "format": "no-such-format"}}}, "format"),
    ({"type": "strnig"}, "strnig"),
    ({"regex": "(unclosed"}, "regex|unclosed|parse"),
    ({"lark": "start: undefined_rule"}, "undefined_rule"),
    (42, "expected a JSON schema"),
])
def test_bad_formats_are_refused_before_generating(demo, bad, match):
    with pytest.raises(ConstraintError, match=match):
        demo.chat([{"role": "user", "content": "hi"}], response_format=bad, max_new_tokens=4)


# --- reasoning control ----------------------------------------------------------------------------------------------

def test_reasoning_budget_forces_the_end_of_thinking(tmp_path):
    messages = [{"role": "user", "content": "Think about it."}]
    at = len(scripted(tmp_path / "probe", 0, "").prompt_ids(messages))
    forever = "<think>" + "".join(f" step {i}" for i in range(300))  # varied: the loop guard stays out of it
    model = scripted(tmp_path / "thinker", at, forever)
    capped = model.chat(messages, reasoning_budget=12, max_new_tokens=60)
    assert capped.stats.reasoning_forced == "budget" and capped.stats.thinking_tokens == 12
    start, end = capped.tokens.index(TOK.token_to_id("<think>")), capped.tokens.index(TOK.token_to_id("</think>"))
    assert end - start - 1 == 12 and capped.reasoning.startswith("step 0 step 1")
    none = model.chat(messages, reasoning_budget=0, max_new_tokens=8)
    assert none.stats.thinking_tokens == 0 and none.reasoning == "" and none.raw.startswith("<think></think>")
    free = model.chat(messages, max_new_tokens=60)  # no budget: it thinks until max_new_tokens
    assert free.stats.reasoning_forced == "" and free.stats.stopped == "length"
    with pytest.raises(ValueError, match="reasoning_budget -1"):
        model.chat(messages, reasoning_budget=-1)


def test_a_reasoning_trace_that_loops_is_ended(tmp_path):
    messages = [{"role": "user", "content": "Think."}]
    at = len(scripted(tmp_path / "probe", 0, "").prompt_ids(messages))
    first, again = "First I check the list. Then I check it again.", " Then I check it again."
    model = scripted(tmp_path / "looper", at, "<think>" + first + again * 30)
    done = model.chat(messages, max_new_tokens=300)
    # ended within four periods of the loop after its first sentence (the rule: a span repeated 4 times; 13 tokens
    # a period with the demo's tokenizer, so 63 thinking tokens, 300 without the rule)
    assert done.stats.reasoning_forced == "repetition"
    assert done.stats.thinking_tokens <= len(ids(first)) + 4 * len(ids(again))
    assert "</think>" in done.raw


# --- everywhere ---------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_lfm_chat_json_schema_and_reasoning_budget(demo, tmp_path):
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps({"type": "object", "properties": {"answer": {"type": "string", "maxLength": 20}},
                                  "required": ["answer"], "additionalProperties": False}))
    cmd = [sys.executable, "-m", "lfm_edge.runtime.cli.chat", str(demo.folder), "-n", "60", "--no-tools"]
    out = subprocess.run(cmd + ["--json-schema", str(schema), "-p", "Say hi"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert isinstance(json.loads(out.stdout.strip().splitlines()[-1])["answer"], str)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    refused = subprocess.run(cmd + ["--json-schema", str(bad), "-p", "x"], capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and str(bad) in refused.stderr and "Traceback" not in refused.stderr


def test_the_mask_cost_benchmark_measures_masks_against_decode_steps(demo, tmp_path):
    from lfm_edge.device_bench.studies.constrained import measure

    result = measure(demo.folder, tokens=12, runs=1, threads=1)
    assert result["vocab"] == demo.session.vocab_size and result["masked_steps"] >= 6
    assert 0 < result["mask_median_us"] <= result["mask_p99_us"] and result["decode_step_ms"] > 0
    assert result["mask_share_of_step"] > 0 and result["tokenizer"] == "the bundle's"
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_bytes((DEMO / "tokenizer.json").read_bytes())
    other = measure(demo.folder, tokens=8, runs=1, threads=1, tokenizer=tmp_path / "tok" / "tokenizer.json")
    assert other["tokenizer"].endswith("tokenizer.json") and other["masked_steps"] > 0
    assert (demo.folder / "tokenizer.json").is_file()  # the bundle itself is untouched
