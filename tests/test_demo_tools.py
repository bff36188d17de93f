"""The demo model calls its tools (demo_model/tool_chats.py trains it to): on phrasings, numbers and cities it
never saw in training, through the real export and runtime, with calls held to the offered schemas."""

from __future__ import annotations

import math
import re

import pytest
from shared_bundles import demo_bundle

from lfm_edge.demo_model import tool_chats
from lfm_edge.mobile_app.app.tools import battery
from lfm_edge.runtime import LfmModel, function_schema
from lfm_edge.runtime.demo_tools import calculator, current_time

# Of PROMPTS answered right: the bar in fp32. The shipped weights: 20/25 fp32, 19/25 int4 (their
# weather and calculator copies are what int4's rounding moves; demo_model/README.md, Tool calls).
HIT_RATE = {"fp32": 0.8, "int4": 0.76}
CALL_START = "<|tool_call_start|>"


def get_weather(city: str) -> dict:
    """Current weather.

    Args:
        city: the city's name
    """
    return {"city": city, "temperature_c": 14, "conditions": "rainy"}


# As the OpenAI-compatible server's clients offer it; the description is not one trained on.
WEATHER_DICT = {"type": "function", "function": {
    "name": "get_weather", "description": "Look up the weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
LFM_CHAT = [calculator, current_time]  # lfm-chat's DEMO_TOOLS
APP = [calculator, current_time, battery]  # the app's
BOTH = [WEATHER_DICT, calculator]

# (tools offered, question, what must happen): ("calculator", expression whose value the call must have),
# ("get_weather", the city), or (None, None): answered without a call. Frames, operands and cities are held out.
PROMPTS = [
    (LFM_CHAT, "Could you figure out 16*27+3?", ("calculator", "16*27+3")),
    (APP, "What do you get for 49 - 38?", ("calculator", "49 - 38")),
    ([calculator], "Work out 104 + 71 * 2 for me.", ("calculator", "104 + 71 * 2")),
    (BOTH, "Determine (60+82)*3, please.", ("calculator", "(60+82)*3")),
    (LFM_CHAT, "I'd like to know 93/3.", ("calculator", "93/3")),
    (APP, "Result of 115 * 4?", ("calculator", "115 * 4")),
    (BOTH, "Do the math: 192-27+5", ("calculator", "192-27+5")),
    ([calculator], "Run the numbers on 368 + 159.", ("calculator", "368 + 159")),
    (LFM_CHAT, "How big is 7 * 93?", ("calculator", "7 * 93")),
    (APP, "Need 82*71 worked out.", ("calculator", "82*71")),
    (BOTH, "Please evaluate 500 / 4 for me.", ("calculator", "500 / 4")),
    ([get_weather], "Any idea what the weather is like in Lisbon?", ("get_weather", "Lisbon")),
    ([WEATHER_DICT], "Is it sunny in Nairobi at the moment?", ("get_weather", "Nairobi")),
    (BOTH, "Look up the weather in Marrakech.", ("get_weather", "Marrakech")),
    ([get_weather, calculator], "How's the weather over in Winnipeg?", ("get_weather", "Winnipeg")),
    ([WEATHER_DICT], "What's it like outside in Rotterdam today?", ("get_weather", "Rotterdam")),
    ([get_weather], "Please fetch the weather for Leipzig.", ("get_weather", "Leipzig")),
    ([current_time, get_weather], "Is it going to rain in Antwerp?", ("get_weather", "Antwerp")),
    (BOTH, "Weather report: Nagoya", ("get_weather", "Nagoya")),
    ([get_weather], "Tell me how warm it is in Hobart.", ("get_weather", "Hobart")),
    ([WEATHER_DICT, current_time], "Forecast for Halifax?", ("get_weather", "Halifax")),
    (BOTH, "How do comparisons work in Python?", (None, None)),
    (LFM_CHAT, "What is the assert statement for?", (None, None)),
    (APP, "Good evening!", (None, None)),
    ([get_weather], "Could you tell me about slicings?", (None, None)),
]


def check(done, expected: tuple[str | None, str | None]) -> bool:
    """Whether the answer did what `expected` asks: the right tool with valid arguments, or no call."""
    name, value = expected
    if name is None:
        return not done.tool_calls and CALL_START not in done.raw
    if len(done.tool_calls) != 1 or done.tool_calls[0].name != name:
        return False
    arguments = done.tool_calls[0].arguments
    if name == "get_weather":
        return arguments.get("city") == value
    got, want = calculator(str(arguments.get("expression", ""))), calculator(value)
    return "result" in got and math.isclose(got["result"], want["result"], rel_tol=1e-9)


def hit_rate(model: LfmModel) -> tuple[float, list[str]]:
    """The share of PROMPTS answered right, and a line per miss."""
    misses = []
    for tools, question, expected in PROMPTS:
        done = model.chat([{"role": "user", "content": question}], tools=tools, max_new_tokens=40)
        if not check(done, expected):
            misses.append(f"{question!r}: expected {expected}, got {done.raw!r}")
    return 1 - len(misses) / len(PROMPTS), misses


@pytest.fixture(scope="module", params=["fp32", "int4"])
def model(request, tmp_path_factory):
    return LfmModel(demo_bundle(tmp_path_factory.getbasetemp(), request.param))


def test_the_prompts_are_held_out():
    """No frame, operand or city of PROMPTS is in the training data's lists."""
    frames = tool_chats.TRAIN_CALC_FRAMES + tool_chats.TRAIN_WEATHER_FRAMES + tool_chats.TRAIN_DOC_FRAMES
    small_talk = [q for q, _ in tool_chats.SMALL_TALK]
    assert len(PROMPTS) >= 20
    for _, question, (name, value) in PROMPTS:
        if name == "calculator":
            frame = question.replace(value, "{e}")
            operands = [int(n) for n in re.findall(r"\d+", value)]
            assert any(tool_chats.held_out_number(n) for n in operands), value
        elif name == "get_weather":
            frame = question.replace(value, "{c}")
            assert value not in tool_chats.TRAIN_CITIES
        else:
            frame = question
            assert question not in small_talk
        assert frame not in frames, frame


def test_the_battery_schema_trained_on_is_the_apps():
    assert tool_chats.BATTERY_SCHEMA == function_schema(battery)


@pytest.mark.slow
def test_the_demo_model_calls_the_right_tool_on_held_out_prompts(model, request):
    rate, misses = hit_rate(model)
    assert rate >= HIT_RATE[request.node.callspec.params["model"]], "\n".join(misses)


def test_run_tools_completes_a_round_trip(model):
    run = model.run_tools([{"role": "user", "content": "Please fetch the weather for Leipzig."}],
                          {"get_weather": get_weather}, max_rounds=2, max_new_tokens=40)
    assert [call.name for call, _ in run.calls] == ["get_weather"]
    assert run.calls[0][0].arguments == {"city": "Leipzig"}
    assert [m["role"] for m in run.messages] == ["user", "assistant", "tool", "assistant"]
    assert run.answer.text.strip() and not run.answer.tool_calls
