"""Tool calls and reasoning are read from model text as data: exact results on the forms the models write,
clear errors on everything else, and a stream parser that agrees with the one-shot functions however the text
is cut into deltas."""

from __future__ import annotations

import json
import keyword
import random
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lfm_edge.runtime.toolcalls import (
    MAX_CALLS,
    MAX_DEPTH,
    MAX_PAYLOAD_CHARS,
    ReasoningDelta,
    StreamParser,
    TextDelta,
    ToolCall,
    ToolCallEvent,
    ToolCallParseError,
    parse_call_list,
    parse_tool_calls,
    split_reasoning,
)

START, END = "<|tool_call_start|>", "<|tool_call_end|>"
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def block(payload: str) -> str:
    return f"{START}{payload}{END}"


# --- Pythonic calls --------------------------------------------------------------------------------------------------


def test_pythonic_calls_from_the_model_card():
    text = "Let me check. " + block("[get_weather(city='Paris', days=3), other(x=1)]") + " Done."
    expected = [ToolCall("get_weather", {"city": "Paris", "days": 3}), ToolCall("other", {"x": 1})]
    assert parse_tool_calls(text) == expected


@pytest.mark.parametrize("payload, expected", [
    ('[f(s="double", t=\'single\', u="it\'s", v=\'say "hi"\')]',
     {"s": "double", "t": "single", "u": "it's", "v": 'say "hi"'}),
    (r"""[f(a='tab\tnew\nline', b='\u00e9\x41', c='back\\slash', d='''tri'ple''')]""",
     {"a": "tab\tnew\nline", "b": "éA", "c": "back\\slash", "d": "tri'ple"}),
    ("[f(n=-3, m=+2, x=-1.5e-3, big=12345678901234567890, h=0x1F)]",
     {"n": -3, "m": 2, "x": -0.0015, "big": 12345678901234567890, "h": 31}),
    ("[f(t=True, f=False, n=None, jt=true, jf=false, jn=null)]",
     {"t": True, "f": False, "n": None, "jt": True, "jf": False, "jn": None}),
    ("[f(l=[1, [2, [3]]], t=(1, 'a'), d={'k': {'n': [None, -1]}, 2: 'two'}, e=[], ed={}, one=(1,))]",
     {"l": [1, [2, [3]]], "t": [1, "a"], "d": {"k": {"n": [None, -1]}, 2: "two"}, "e": [], "ed": {}, "one": [1]}),
    ("[f()]", {}),
    ("[\n  f(\n    city = 'Paris' ,\n  ) ,\n]", {"city": "Paris"}),
    ("[f(s='東京 🌧 <b>&amp;</b>')]", {"s": "東京 🌧 <b>&amp;</b>"}),
    ("[f(s='a' 'b')]", {"s": "ab"}),
    (r"[f(re='\d+')]", {"re": "\\d+"}),  # an invalid escape is only a warning in Python; parse it the same anyway
])
def test_pythonic_literals(payload, expected):
    assert parse_call_list(payload) == [ToolCall("f", expected)]


def test_pythonic_shapes():
    assert parse_call_list("[]") == []
    assert parse_call_list("f(x=1)") == [ToolCall("f", {"x": 1})]  # brackets forgotten
    assert parse_call_list("f(x=1), g()") == [ToolCall("f", {"x": 1}), ToolCall("g")]
    # dotted names are kept as written: they are matched against the caller's tool list, never resolved
    assert parse_call_list("[math.sqrt(x=2), a.b.c()]") == [ToolCall("math.sqrt", {"x": 2}), ToolCall("a.b.c")]
    text = block("[a(x=1)]") + " between " + block('[{"name": "b", "arguments": {}}]')
    assert [c.name for c in parse_tool_calls(text)] == ["a", "b"]


@pytest.mark.parametrize("payload, words", [
    ("[get_weather('Paris')]", "positional"),
    ("[__import__('os')]", "positional"),
    ("[f(*args)]", "positional"),
    ("[f(**kwargs)]", r"\*\*mapping"),
    ("[f(x={**d})]", r"\*\*mapping"),
    ("[f(x=g())]", "a call is not a literal"),
    ("[f(x=__import__('os').system('true'))]", "a call is not a literal"),
    ("[f(x=open('/tmp/lfm_edge_pwned', 'w'))]", "a call is not a literal"),
    ("[f(x=os.environ)]", "attribute access"),
    ("[f(x=().__class__.__bases__)]", "attribute access"),
    ("[f(x=a[0])]", "subscripting"),
    ("[f(x=1+2)]", "operator"),
    ("[f(x=lambda: 1)]", "lambda"),
    ("[f(x=y)]", "bare name 'y'"),
    ("[f(x=f'{y}')]", "f-string"),
    ("[f(x={1, 2})]", "a set"),
    ("[f(x=[*a])]", r"\* unpacking"),
    ("[f(x=b'raw')]", "bytes"),
    ("[f(x=1j)]", "complex"),
    ("[f(x=...)]", "ellipsis"),
    ("[f(x=--1)]", "UnaryOp"),
    ("[f(x=not 1)]", "UnaryOp"),
    ("[f(x={[1]: 2})]", "dict keys"),
    ("[f(x=1, x=2)]", "twice|repeated"),
    ("[1, 2]", "expected name"),
    ("['f(x=1)']", "expected name"),
    ("[f()()]", "plain or dotted"),
    ("[a[0](x=1)]", "plain or dotted"),
    ("[f(x=]", "not a Python call list"),
    ("[f(x=1)", "not a Python call list"),
    ("get_weather city=Paris", "not a Python call list"),
    ("[f(x='\x00')]", "not a Python call list|literal"),
    ("   ", "empty"),
])
def test_pythonic_errors_say_what_is_wrong(payload, words):
    with pytest.raises(ToolCallParseError, match=words):
        parse_call_list(payload)
    with pytest.raises(ToolCallParseError):
        parse_tool_calls(block(payload))


def test_nothing_is_evaluated(tmp_path):
    marker = tmp_path / "pwned"
    payloads = [f"[f(x=open({str(marker)!r}, 'w'))]", f"[open(file={str(marker)!r}, mode='w')]",
                "[__import__(name='pathlib')]", f"[f(x=__import__('pathlib').Path({str(marker)!r}).touch())]"]
    for payload in payloads:
        try:
            calls = parse_call_list(payload)
        except ToolCallParseError:
            continue
        assert all(isinstance(c, ToolCall) for c in calls)  # inert data: a name and literal arguments
    assert not marker.exists()
    assert parse_call_list("[__import__(name='os')]") == [ToolCall("__import__", {"name": "os"})]


@pytest.mark.parametrize("payload", [
    "[f(x=" + "[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1) + ")]",
    "[f(x=" + "{'a': " * (MAX_DEPTH + 1) + "1" + "}" * (MAX_DEPTH + 1) + ")]",
    '[{"name": "f", "arguments": {"x": ' + "[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1) + "}}]",
    "[" * 60000,
    "-" * 60000 + "1",
    "f(x=" + "1+" * 20000 + "1)",
    "a." * 20000 + "b()",
    "[" + ", ".join(["f()"] * (MAX_CALLS + 1)) + "]",
    "[" + ", ".join(['{"name": "f"}'] * (MAX_CALLS + 1)) + "]",
    "[f(x='" + "a" * MAX_PAYLOAD_CHARS + "')]",
    "[f(x=" + "9" * 5000 + ")]",
])
def test_hostile_sizes_fail_cleanly(payload):
    with pytest.raises(ToolCallParseError):
        parse_call_list(payload)


def test_limits_allow_what_is_within_them():
    deep = "[" * MAX_DEPTH + "]" * MAX_DEPTH  # the argument's value is level 1
    assert parse_call_list(f"[f(x={deep})]") == parse_call_list(f'{{"name": "f", "arguments": {{"x": {deep}}}}}')
    assert len(parse_call_list("[" + ", ".join(["f()"] * MAX_CALLS) + "]")) == MAX_CALLS
    too_many = "".join(block("[" + ", ".join(["f()"] * 40) + "]") for _ in range(2))
    with pytest.raises(ToolCallParseError, match="more than"):
        parse_tool_calls(too_many)
    long_answer = "word " * 50_000 + block("[f(x=1)]")  # only the payload is bounded, not the answer
    assert parse_tool_calls(long_answer) == [ToolCall("f", {"x": 1})]


# --- JSON calls ------------------------------------------------------------------------------------------------------


def test_json_calls():
    payload = '[{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}, {"name": "now", "arguments": {}}]'
    assert parse_tool_calls(block(payload)) == [ToolCall("get_weather", {"city": "Paris", "days": 3}), ToolCall("now")]
    assert parse_call_list('{"name": "f", "parameters": {"x": [1, null]}}') == [ToolCall("f", {"x": [1, None]})]
    openai = '[{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{\\"x\\": 1}"}}]'
    assert parse_call_list(openai) == [ToolCall("f", {"x": 1}, id="call_1")]
    assert parse_call_list('[ {"name": "f", "arguments": null}]') == [ToolCall("f")]


def test_json_mode_reads_bare_lists():
    bare = '  [{"name": "f", "arguments": {"q": "x"}}]\n'
    assert parse_tool_calls(bare, json_mode=True) == [ToolCall("f", {"q": "x"})]
    assert parse_tool_calls(bare) == []  # without json_mode an unmarked answer is just text
    assert parse_tool_calls("Plain answer.", json_mode=True) == []
    assert parse_tool_calls("<think>[maybe]</think>Plain.", json_mode=True) == []
    with pytest.raises(ToolCallParseError, match="JSON"):
        parse_tool_calls("[1] is a citation", json_mode=True)


@pytest.mark.parametrize("payload, words", [
    ('[{"name": "f", "arguments": {]', "not a JSON call list"),
    ('[{"name": "f"}, 3]', "call 2: expected a JSON object"),
    ('[{"arguments": {}}]', "name"),
    ('[{"name": "", "arguments": {}}]', "name"),
    ('[{"name": "f", "arguments": [1]}]', "must be an object"),
    ('[{"name": "f", "arguments": "{nope"}]', "not JSON"),
    ('{"name": "f", "arguments": "[1]"}', "must be an object"),
])
def test_json_errors(payload, words):
    with pytest.raises(ToolCallParseError, match=words):
        parse_call_list(payload)


def test_block_structure_errors():
    for text, words in ((START + "[f()]", "unterminated"), (block(""), "empty"), ("a" + START, "unterminated")):
        with pytest.raises(ToolCallParseError, match=words):
            parse_tool_calls(text)
    assert parse_tool_calls("no calls here") == []
    assert parse_tool_calls("stray " + END + " end") == []
    assert parse_tool_calls("<think>" + block("[f(x=1)]") + "</think>after") == []  # reasoning is not an answer
    with pytest.raises(ToolCallParseError, match="str"):
        parse_tool_calls(b"[f()]")  # type: ignore[arg-type]


# --- reasoning -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, reasoning, answer", [
    ("<think>\nplan it\n</think>\n\nThe answer.", "plan it", "The answer."),
    ("<think>still thinking, out of tok", "still thinking, out of tok", ""),
    ("Just an answer.", "", "Just an answer."),
    ("Before <think>a</think> middle <think>b</think> end", "ab", "Before  middle  end"),
    ("stray</think> answer", "", "stray answer"),
    ("<think>mentions " + START + "[f()]" + END + " here</think>" + block("[g()]"),
     "mentions " + START + "[f()]" + END + " here", block("[g()]")),
    (block("[f(x='<think>')]") + " ok", "", block("[f(x='<think>')]") + " ok"),
])
def test_split_reasoning(text, reasoning, answer):
    assert split_reasoning(text) == (reasoning, answer)


def test_split_reasoning_options():
    assert split_reasoning("<think> a </think> b ", strip=False) == (" a ", " b ")
    assert split_reasoning("prefilled plan</think>answer", start_in_reasoning=True) == ("prefilled plan", "answer")


# --- streaming -------------------------------------------------------------------------------------------------------


def coalesce(events: list) -> list:
    """Adjacent deltas of one kind merged: how a UI would see them, and the same for any chunking."""
    out: list = []
    for event in events:
        if out and type(event) is type(out[-1]) and isinstance(event, (TextDelta, ReasoningDelta)):
            out[-1] = type(event)(out[-1].text + event.text)
        else:
            out.append(event)
    return out


def run(chunks: list[str], **options) -> list:
    parser = StreamParser(**options)
    events = [e for chunk in chunks for e in parser.feed(chunk)]
    return events + parser.close()


def chunkings(text: str, rng: random.Random):
    yield [text]
    yield list(text)
    for _ in range(5):
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(1, 12))))
        yield [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]


SAMPLE = ("<think>\nThe user wants weather. I could write " + START + " literally.\n</think>\n\nLet me check. "
          + block("[get_weather(city='Paris', days=3)]") + " and " + block('[{"name": "now", "arguments": {}}]')
          + " <b>done</b> <thin")


def test_stream_events_for_a_typical_answer():
    expected = [
        ReasoningDelta("\nThe user wants weather. I could write " + START + " literally.\n"),
        TextDelta("\n\nLet me check. "),
        ToolCallEvent([ToolCall("get_weather", {"city": "Paris", "days": 3})], "[get_weather(city='Paris', days=3)]"),
        TextDelta(" and "),
        ToolCallEvent([ToolCall("now")], '[{"name": "now", "arguments": {}}]'),
        TextDelta(" <b>done</b> <thin"),
    ]
    rng = random.Random(0)
    for chunks in chunkings(SAMPLE, rng):
        assert coalesce(run(chunks)) == expected, chunks


def test_stream_holds_back_partial_markers_only():
    parser = StreamParser()
    assert parser.feed("Hi <thi") == [TextDelta("Hi ")]
    assert parser.feed("nk>r") == [ReasoningDelta("r")]
    assert parser.feed("</th") == []
    assert parser.feed("ink>x <|tool_ca") == [TextDelta("x ")]
    assert parser.feed("ll_start|>[f(") == []
    assert parser.feed("x=1)]<|tool_call_end|><") == [ToolCallEvent([ToolCall("f", {"x": 1})], "[f(x=1)]")]
    assert parser.feed("b>") == [TextDelta("<b>")]
    assert parser.feed("<|tool_call_") == []
    assert parser.close() == [TextDelta("<|tool_call_")]
    assert parser.close() == []
    with pytest.raises(RuntimeError):
        parser.feed("more")


def test_stream_reports_bad_and_unfinished_calls():
    events = run(["a", block("[f('positional')]"), "b", START, "[g(x=1)"])
    assert events[0] == TextDelta("a") and events[2] == TextDelta("b")
    assert events[1].calls == [] and "positional" in events[1].error and events[1].raw == "[f('positional')]"
    assert events[3].calls == [] and "unterminated" in events[3].error and events[3].raw == "[g(x=1)"
    huge = run([START] + ["[f(x='" + "a" * 1000] * 100 + ["')]", END, "tail"])
    assert "limit" in huge[0].error and len(huge[0].raw) == MAX_PAYLOAD_CHARS and huge[1] == TextDelta("tail")


def test_stream_prefilled_reasoning():
    assert coalesce(run(list("plan</think>answer"), start_in_reasoning=True)) == [
        ReasoningDelta("plan"), TextDelta("answer")]
    assert coalesce(run(list("plan</think>answer"))) == [TextDelta("plananswer")]  # a stray close is dropped


# --- fuzzing ---------------------------------------------------------------------------------------------------------

PIECES = [START, END, "<think>", "</think>", "<|tool_call", "<thi", "</", "<", "|", "[", "]", "(", ")", "{", "}",
          "=", ",", "'", '"', "\\", ":", "-", ".", "*", " ", "\n", "f", "x", "1", "2.5", "True", "None", "null",
          "get_weather", "city='Paris'", '{"name": "f", "arguments": {"x": 1}}', "[f(x=1)]", "__import__",
          "os.system", "lambda", "é", "🌧"]
model_like_text = st.one_of(st.text(max_size=200), st.lists(st.sampled_from(PIECES), max_size=60).map("".join))


@FUZZ
@given(model_like_text, st.booleans())
def test_parse_fuzz_returns_calls_or_a_parse_error(text, json_mode):
    for payload in (text, block(text)):
        try:
            calls = parse_tool_calls(payload, json_mode=json_mode)
        except ToolCallParseError as e:
            assert str(e)
        else:
            assert all(isinstance(c, ToolCall) and isinstance(c.name, str) and isinstance(c.arguments, dict)
                       for c in calls)
            json.dumps([c.arguments for c in calls], default=str)


def reference_text(text: str, start_in_reasoning: bool) -> str:
    answer = split_reasoning(text, strip=False, start_in_reasoning=start_in_reasoning)[1]
    return re.sub(re.escape(START) + ".*?(?:" + re.escape(END) + r"|\Z)|" + re.escape(END), "", answer, flags=re.S)


def reference_blocks(text: str, start_in_reasoning: bool) -> list[str]:
    answer = split_reasoning(text, strip=False, start_in_reasoning=start_in_reasoning)[1]
    return re.findall(re.escape(START) + "(.*?)(?:" + re.escape(END) + r"|\Z)", answer, flags=re.S)


@FUZZ
@given(model_like_text, st.lists(st.integers(0, 400), max_size=20), st.booleans())
def test_stream_fuzz_agrees_with_one_shot_parsing(text, cuts, start_in_reasoning):
    cuts = sorted({c for c in cuts if c < len(text)} | {0, len(text)})
    chunks = [text[a:b] for a, b in zip(cuts, cuts[1:], strict=False)]
    events = run(chunks, start_in_reasoning=start_in_reasoning)  # must not raise
    assert coalesce(events) == coalesce(run([text], start_in_reasoning=start_in_reasoning))
    reasoning = split_reasoning(text, strip=False, start_in_reasoning=start_in_reasoning)[0]
    assert "".join(e.text for e in events if isinstance(e, ReasoningDelta)) == reasoning
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == reference_text(text, start_in_reasoning)
    tool_events = [e for e in events if isinstance(e, ToolCallEvent)]
    assert [e.raw for e in tool_events] == reference_blocks(text, start_in_reasoning)
    for event in tool_events:
        if event.error is None:
            assert event.calls == parse_call_list(event.raw)
        elif not event.error.startswith("unterminated"):
            with pytest.raises(ToolCallParseError):
                parse_call_list(event.raw)


# Marker strings inside argument values cannot round-trip: they are control tokens, and end or open a block.
plain_text = st.text(max_size=20).filter(lambda s: not any(m in s for m in (START, END, "<think>", "</think>")))
_letters = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_"
identifiers = st.builds(str.__add__, st.sampled_from(_letters), st.text(_letters + "0123456789", max_size=10)).filter(
    lambda s: not keyword.iskeyword(s))
scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**20, 10**20),
                    st.floats(allow_nan=False, allow_infinity=False), plain_text)
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                      st.dictionaries(plain_text, inner, max_size=4)),
                      max_leaves=8)
calls = st.lists(st.builds(ToolCall, identifiers, st.dictionaries(identifiers, values, max_size=4)), max_size=4)


@settings(FUZZ, max_examples=150)  # generating nested values is the slow part
@given(calls)
@pytest.mark.slow
def test_round_trip_through_both_forms(expected):
    pythonic = "[" + ", ".join(f"{c.name}(" + ", ".join(f"{k}={v!r}" for k, v in c.arguments.items()) + ")"
                               for c in expected) + "]"
    as_json = json.dumps([{"name": c.name, "arguments": c.arguments} for c in expected], ensure_ascii=False)
    assert parse_tool_calls(block(pythonic)) == expected
    assert parse_tool_calls(block(as_json)) == expected
    assert parse_tool_calls(as_json, json_mode=True) == expected
