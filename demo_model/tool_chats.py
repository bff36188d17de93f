"""Synthetic tool-use chats for the demo model (train.py mixes them into its pydoc training data).

Every chat is rendered by the runtime's own code (`ChatTemplate` over train.py's CHAT_TEMPLATE, tool schemas
from `function_schema` or OpenAI-style dicts), so the model is trained on exactly the tokens `LfmModel` feeds
it. Kinds of chat, each offered a varied list of the demo tools (one to four, shuffled; sometimes none):

- a calculation: the user writes an arithmetic expression; the assistant calls
  `<|tool_call_start|>[calculator(expression="...")]<|tool_call_end|>` with the expression copied, the tool
  answers calculator()'s own JSON ({"result": 87}), the assistant answers "12*7+3 = 87.";
- the weather in a city: `get_weather(city="...")`, then e.g. "It is 18 °C and cloudy in Paris.";
- the time (`current_time()`) and the battery (`battery()`, the app's tool, offered as BATTERY_SCHEMA);
- a question about Python, or small talk: answered in plain text (the first sentences of a pydoc topic of
  the training split), also when tools are offered;
- a question whose tool is not offered: a plain-text "I have no ... tool" answer.

Question frames, numbers and cities are drawn from TRAIN_* lists with a seeded random.Random. The tool test
(tests/test_demo_tools.py) asks with frames, numbers and cities that are not in them: operands n >= 10 with
n % 11 == 5 never appear in a training question (held_out_number).
"""

from __future__ import annotations

import json
import random
import re
from typing import Any

from lfm_edge.runtime.demo_tools import calculator, current_time
from lfm_edge.runtime.templates import ChatTemplate

CALL_START, CALL_END = "<|tool_call_start|>", "<|tool_call_end|>"


# The app's battery tool (mobile_app/app/tools.py) as function_schema renders it: data here, since demo_model/ may
# not import the app (lfm_edge/layers.py); tests/test_demo_tools.py holds the two equal.
BATTERY_SCHEMA: dict[str, Any] = {"type": "function", "function": {
    "name": "battery", "description": "The device's battery charge and whether it is charging.",
    "parameters": {"type": "object", "properties": {}}, "return": {"type": "object"}}}


def get_weather(city: str) -> dict:
    """Current weather.

    Args:
        city: the city's name
    """
    return {"city": city, "sky": "sunny"}  # the runtime README's example; its schema is one of those offered


def held_out_number(n: int) -> bool:
    """Operands kept out of the training questions (the tool test asks with them)."""
    return n >= 10 and n % 11 == 5

# --- tool schemas, as apps and the OpenAI-compatible server offer them ---------------------------------------------

_CITY = {"type": "string"}
WEATHER_SCHEMAS: list[Any] = [
    get_weather,  # rendered through function_schema, as run_tools does for a Python function
    {"type": "function", "function": {"name": "get_weather", "description": "Get the current weather in a given city",
                                      "parameters": {"type": "object", "properties": {"city": _CITY},
                                                     "required": ["city"]}}},
    {"type": "function", "function": {"name": "get_weather", "description": "Current weather for a city.",
                                      "parameters": {"type": "object", "properties": {
                                          "city": {"type": "string", "description": "The city, e.g. Paris"}},
                                          "required": ["city"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "get_weather", "description": "Weather.", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"},
                                         "unit": {"type": "string", "enum": ["c", "f"]}},
        "required": ["city"]}}},
]
CALCULATOR_SCHEMAS: list[Any] = [
    calculator, calculator, calculator,  # lfm-chat's and the app's own, most of the time
    {"type": "function", "function": {"name": "calculator", "description": "Evaluate an arithmetic expression.",
                                      "parameters": {"type": "object", "properties": {"expression": {
                                          "type": "string"}}, "required": ["expression"]}}},
]
# Tools the assistant never calls here: they make it read the list instead of counting positions.
OTHER_SCHEMAS: list[Any] = [
    {"type": "function", "function": {"name": "search_docs", "description": "Search the Python documentation.",
                                      "parameters": {"type": "object", "properties": {"query": {"type": "string"}},
                                                     "required": ["query"]}}},
    {"type": "function", "function": {"name": "send_message", "description": "Send a text message to a contact.",
                                      "parameters": {"type": "object", "properties": {
                                          "to": {"type": "string"}, "text": {"type": "string"}},
                                          "required": ["to", "text"]}}},
    {"type": "function", "function": {"name": "set_timer", "description": "Start a countdown timer.",
                                      "parameters": {"type": "object", "properties": {
                                          "minutes": {"type": "integer"}}, "required": ["minutes"]}}},
]
TOOL_NAMES = ("calculator", "current_time", "battery", "get_weather")  # the tools a chat's assistant calls

# --- training phrasings and values ------------------------------------------------------------------------------------

TRAIN_CALC_FRAMES = [
    "What is {e}?", "what is {e}", "Use the calculator: what is {e}?", "Calculate {e}.", "Compute {e}",
    "How much is {e}?", "{e} = ?", "Please work out {e}.", "Can you calculate {e} for me?", "Evaluate {e}.",
    "I need the value of {e}.", "What does {e} come to?", "Solve {e}", "{e}?", "Quick: {e}", "What's {e}?",
    "Tell me {e}.", "Find {e}.", "Give me the result of {e}.", "Calculator: {e}", "{e}", "Use the calculator for {e}.",
    "What is the value of {e}?", "How much does {e} make?", "Can you do {e}?", "Please compute {e}",
    "What's the answer to {e}?", "Help me with {e}.",
]
TRAIN_WEATHER_FRAMES = [
    "What's the weather in {c}?", "Weather in {c}?", "How is the weather in {c} today?", "Is it raining in {c}?",
    "What is the temperature in {c}?", "Tell me the weather for {c}.", "{c} weather", "How hot is it in {c}?",
    "Do I need an umbrella in {c}?", "Weather forecast for {c}, please.", "What are the conditions in {c} right now?",
    "Check the weather in {c}.", "Is it cold in {c}?", "How warm is {c} today?", "Current weather, {c}?",
    "weather {c}", "What is the weather like in {c}?", "Can you get the weather in {c}?", "Is it windy in {c}?",
    "Should I wear a coat in {c} today?", "Temperature in {c}?", "Get me the weather for {c}.",
]
TRAIN_TIME_FRAMES = [
    "What time is it?", "What's the time?", "What is the date today?", "What day is it today?", "Tell me the time.",
    "Current time, please.", "time?", "What's today's date?", "Do you know what time it is?", "Give me the date.",
]
TRAIN_BATTERY_FRAMES = [
    "How much battery do I have left?", "Is my phone charging?", "Battery level?", "What's my battery at?",
    "Check the battery.", "How full is the battery?", "battery", "Is the battery low?", "Show me the battery status.",
]
TRAIN_DOC_FRAMES = [
    "What are {h}?", "Tell me about {h}.", "Explain {h}.", "{h}: what should I know?", "Describe {h}.",
    "What does the documentation say about {h}?", "Can you explain {h}?", "I want to learn about {h}.",
]
SMALL_TALK = [
    ("Hello!", "Hello! Ask me about Python, or ask me to use one of my tools."),
    ("Hi", "Hi! What would you like to know?"),
    ("Thanks!", "You are welcome."),
    ("Thank you.", "You are welcome."),
    ("Who are you?", "I am a tiny demo model that writes Python documentation and can call tools."),
    ("What can you do?", "I can tell you about Python, and I can call the tools I am given."),
    ("Good morning", "Good morning! What would you like to know?"),
    ("Bye", "Goodbye!"),
]
TRAIN_CITIES = [c.replace("_", " ") for c in """
Paris London Berlin Madrid Rome Vienna Prague Warsaw Budapest Amsterdam Brussels Dublin Oslo
Stockholm Helsinki Copenhagen Zurich Geneva Milan Naples Barcelona Seville Porto Munich Hamburg Frankfurt Cologne
Lyon Marseille Nice Bordeaux Toulouse Athens Istanbul Ankara Cairo Lagos Accra Dakar Casablanca Tunis Algiers
Johannesburg Cape_Town Durban Addis_Ababa Kampala Kigali Luanda Moscow Kyiv Minsk Riga Tallinn Vilnius Bucharest
Sofia Belgrade Zagreb Ljubljana Sarajevo Tirana Skopje Beijing Shanghai Shenzhen Guangzhou Chengdu Wuhan Hong_Kong
Taipei Seoul Busan Tokyo Osaka Kyoto Sapporo Manila Jakarta Bangkok Hanoi Ho_Chi_Minh_City Kuala_Lumpur Singapore
Delhi Mumbai Chennai Kolkata Bangalore Hyderabad Karachi Lahore Dhaka Kathmandu Colombo Tehran Baghdad Riyadh Dubai
Doha Muscat Amman Beirut Jerusalem Tel_Aviv Baku Tbilisi Yerevan Tashkent Almaty Sydney Melbourne Brisbane Perth
Adelaide Auckland Wellington New_York Los_Angeles Chicago Houston Phoenix Boston Seattle Denver Miami Atlanta Dallas
Detroit Portland San_Francisco San_Diego Las_Vegas Toronto Montreal Vancouver Ottawa Calgary Mexico_City Guadalajara
Havana Bogota Lima Quito Caracas Santiago Buenos_Aires Montevideo Sao_Paulo Rio_de_Janeiro Brasilia La_Paz Reykjavik
Edinburgh Glasgow Manchester Liverpool Birmingham Leeds Bristol Cardiff Belfast Cork Bergen Gothenburg Malmo Turku
Krakow Gdansk Brno Graz Salzburg Basel Bern Lausanne Turin Florence Venice Bologna Genoa Palermo Valencia Bilbao
Granada""".split()]
CONDITIONS = ["sunny", "cloudy", "rainy", "windy", "snowy", "foggy", "clear", "stormy", "partly cloudy", "light rain"]
SYSTEM_PROMPTS = ["You are a helpful assistant.", "You are brief.", "Answer in one sentence.",
                  "You are a helpful assistant with tools."]
DOC_NEXT = "Use a tool only when the question needs one."

# --- values -----------------------------------------------------------------------------------------------------------


def _city_name(rng: random.Random) -> str:
    """A real city from the training list, or an invented one (so the model learns to copy, not to recall)."""
    if rng.random() < 0.65:
        return rng.choice(TRAIN_CITIES)
    syllables = ["ka", "lo", "mar", "ven", "tor", "bel", "ri", "san", "do", "ne", "qu", "ash", "el", "vik", "ora",
                 "ber", "ton", "ham", "burg", "ville", "sta", "mi", "la", "po", "zu", "gre", "fen", "dal", "wick"]
    name = "".join(rng.choice(syllables) for _ in range(rng.randint(2, 4))).capitalize()
    return name if rng.random() < 0.85 else f"{name} {rng.choice(['City', 'Bay', 'Falls', 'Springs'])}"


def random_name(rng: random.Random) -> str:
    """A made-up name of 4-11 letters, consonants and vowels mostly alternating ("Rotuvekka"): any letters, so it
    tokenizes into pieces the training cities do not (train.py's --echo-letters rows copy it)."""
    vowels, consonants = "aeiou", "bcdfghklmnprstvwyz"
    vowel, letters = rng.random() < 0.3, []
    for _ in range(rng.randint(4, 11)):
        letters.append(rng.choice(vowels if vowel else consonants))
        vowel = vowel if rng.random() < 0.2 else not vowel
    return "".join(letters).capitalize()


def _operand(rng: random.Random) -> str:
    while True:
        r = rng.random()
        n = rng.randint(1, 9) if r < 0.3 else rng.randint(10, 99) if r < 0.7 else rng.randint(100, 999) \
            if r < 0.93 else rng.randint(1000, 9999)
        if not held_out_number(n):
            return str(n) if rng.random() < 0.95 else f"{n}.{rng.randint(1, 9)}"


def _expression(rng: random.Random) -> str:
    """An arithmetic expression calculator() evaluates, spaced or not."""
    ops = ["+", "+", "+", "-", "-", "*", "*", "*", "/"]  # few divisions: their results are long floats
    shape = rng.random()
    if shape < 0.05:
        parts = [str(rng.randint(2, 12)), "**", str(rng.randint(2, 6))]
    else:
        count = 2 if shape < 0.45 else 3 if shape < 0.9 else 4
        parts = [_operand(rng)]
        for _ in range(count - 1):
            parts += [rng.choice(ops), _operand(rng)]
        if count >= 3 and rng.random() < 0.35:  # parentheses around the first or the last pair
            if rng.random() < 0.5:
                parts = ["(", *parts[:3], ")", *parts[3:]]
            else:
                parts = [*parts[:-3], "(", *parts[-3:], ")"]
    spaced = rng.random() < 0.5
    text = ""
    for p in parts:
        if spaced and p in ("+", "-", "*", "/", "**"):
            text += f" {p} "
        else:
            text += p
    return text


def _result_text(result: dict) -> str:
    return json.dumps(result)


# --- chats ------------------------------------------------------------------------------------------------------------


def _call(name: str, **arguments: str) -> str:
    args = ", ".join(f"{k}={json.dumps(v)}" for k, v in arguments.items())
    return f"{CALL_START}[{name}({args})]{CALL_END}"


def _docs_answer(text: str, rng: random.Random) -> str:
    """The first prose sentences of a pydoc topic (grammar, code and version notes skipped)."""
    paragraphs = [" ".join(line.strip() for line in p.splitlines()) for p in text.split("\n\n")[1:]
                  if p.strip() and not p.startswith(" ") and not p.lstrip().startswith(("*", "=", "New in", "Changed"))]
    prose = " ".join(paragraphs[:2])
    sentences = re.split(r"(?<=[.!?])\s+", prose)
    out = ""
    for s in sentences[: rng.randint(1, 3)]:
        if out and len(out) + len(s) > 320:
            break
        out = f"{out} {s}".strip()
    return out[:400]


def _heading(text: str) -> str:
    head = text.splitlines()[0].strip()
    return head[0].lower() + head[1:] if head[:2] != head[:2].upper() else head


def _tools_for(rng: random.Random, needed: str | None, offer_needed: bool = True) -> list[Any]:
    """A shuffled list of one to four tool schemas; `needed` is in it when offer_needed, else kept out."""
    pool = {"calculator": CALCULATOR_SCHEMAS, "get_weather": WEATHER_SCHEMAS, "current_time": [current_time],
            "battery": [BATTERY_SCHEMA]}
    names = [n for n in pool if n != needed]
    rng.shuffle(names)
    chosen = names[: rng.randint(0 if offer_needed and needed else 1, 3)]
    if needed and offer_needed:
        chosen.append(needed)
    tools = [rng.choice(pool[n]) for n in chosen]
    if rng.random() < 0.25:
        tools.append(rng.choice(OTHER_SCHEMAS))
    rng.shuffle(tools)
    return tools


def _tool_turns(kind: str, rng: random.Random) -> tuple[str, list[dict[str, str]]]:
    """(tool name, [user, assistant call, tool result, assistant answer]) for one tool kind."""
    if kind == "calculator":
        e = _expression(rng)
        result = calculator(e)
        value = result.get("result")
        answer = f"{e} = {json.dumps(value)}." if "result" in result else f"I could not compute {e}: {result['error']}."
        return kind, [{"role": "user", "content": rng.choice(TRAIN_CALC_FRAMES).format(e=e)},
                      {"role": "assistant", "content": _call("calculator", expression=e)},
                      {"role": "tool", "content": _result_text(result)}, {"role": "assistant", "content": answer}]
    if kind == "get_weather":
        c = _city_name(rng)
        t, cond = rng.randint(-15, 38), rng.choice(CONDITIONS)
        if rng.random() < 0.75:
            result, answer = {"city": c, "temperature_c": t, "conditions": cond}, f"It is {t} °C and {cond} in {c}."
        else:
            result, answer = {"city": c, "sky": cond}, f"The sky is {cond} in {c}."
        return kind, [{"role": "user", "content": rng.choice(TRAIN_WEATHER_FRAMES).format(c=c)},
                      {"role": "assistant", "content": _call("get_weather", city=c)},
                      {"role": "tool", "content": _result_text(result)}, {"role": "assistant", "content": answer}]
    if kind == "current_time":
        day = f"2025-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
        hh, mm, ss = rng.randint(0, 23), rng.randint(0, 59), rng.randint(0, 59)
        result = {"now": f"{day}T{hh:02d}:{mm:02d}:{ss:02d}"}
        return kind, [{"role": "user", "content": rng.choice(TRAIN_TIME_FRAMES)},
                      {"role": "assistant", "content": _call("current_time")},
                      {"role": "tool", "content": _result_text(result)},
                      {"role": "assistant", "content": f"It is {hh:02d}:{mm:02d} on {day}."}]
    percent, charging = rng.randint(1, 100), rng.random() < 0.4
    if rng.random() < 0.15:
        result, answer = {"battery": "unavailable"}, "I cannot read the battery on this device."
    else:
        result = {"percent": percent, "charging": charging}
        if rng.random() < 0.5:
            result["status"] = "Charging" if charging else "Discharging"
        answer = f"The battery is at {percent} % and {'charging' if charging else 'not charging'}."
    return "battery", [{"role": "user", "content": rng.choice(TRAIN_BATTERY_FRAMES)},
                       {"role": "assistant", "content": _call("battery")},
                       {"role": "tool", "content": _result_text(result)}, {"role": "assistant", "content": answer}]


_NO_TOOL_ANSWERS = {
    "calculator": ["I have no calculator tool here, so I cannot compute that.", "There is no calculator tool to use."],
    "get_weather": ["I have no weather tool, so I cannot check the weather.", "I cannot look up the weather here."],
    "current_time": ["I have no clock tool, so I cannot tell the time."],
    "battery": ["I have no battery tool, so I cannot read the battery."],
}


def _plain_turns(rng: random.Random, docs: list[str]) -> list[dict[str, str]]:
    """A question that needs no tool: about Python (answered from the docs) or small talk."""
    if rng.random() < 0.2:
        question, answer = rng.choice(SMALL_TALK)
    else:
        text = rng.choice(docs)
        question, answer = rng.choice(TRAIN_DOC_FRAMES).format(h=_heading(text)), _docs_answer(text, rng)
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def make_chat(rng: random.Random, docs: list[str]) -> tuple[list[dict[str, str]], list[Any] | None]:
    """One synthetic chat: (messages, tools offered or None)."""
    r = rng.random()
    kinds = ["calculator"] * 8 + ["get_weather"] * 6 + ["current_time", "battery"]
    if r < 0.62:  # a tool call and its answer
        kind, turns = _tool_turns(rng.choice(kinds), rng)
        tools = _tools_for(rng, kind)
    elif r < 0.80:  # tools offered, none needed
        turns, tools = _plain_turns(rng, docs), _tools_for(rng, None)
    elif r < 0.90:  # the tool the question needs is not offered (or nothing is)
        kind, asked = _tool_turns(rng.choice(kinds), rng)
        turns = [asked[0], {"role": "assistant", "content": rng.choice(_NO_TOOL_ANSWERS[kind])}]
        tools = _tools_for(rng, kind, offer_needed=False) if rng.random() < 0.7 else None
    else:  # no tools at all
        turns, tools = _plain_turns(rng, docs), None
    if rng.random() < 0.2:  # an earlier exchange first
        earlier = _plain_turns(rng, docs) if rng.random() < 0.5 or not tools else None
        if earlier is None:
            names = [(t.get("function", t) if isinstance(t, dict) else {"name": t.__name__})["name"] for t in tools]
            callable_names = [n for n in names if n in TOOL_NAMES]
            earlier = _tool_turns(rng.choice(callable_names), rng)[1] if callable_names else _plain_turns(rng, docs)
        turns = earlier + turns
    system = [{"role": "system", "content": rng.choice(SYSTEM_PROMPTS)}] if rng.random() < 0.3 else []
    return system + turns, tools


def render_with_spans(template: ChatTemplate, messages: list[dict[str, str]], tools: list[Any] | None
                      ) -> tuple[str, list[tuple[int, int]]]:
    """The chat as the runtime renders it, and the character spans of what the assistant wrote (each assistant
    message's content plus its <|im_end|>): the tokens to train on."""
    text = template.render(messages, tools=tools, add_generation_prompt=False)
    spans = []
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(template.render(messages[:k], tools=tools, add_generation_prompt=True))
        end = len(template.render(messages[: k + 1], tools=tools, add_generation_prompt=False)) - 1  # before "\n"
        assert text[start:end] == message["content"] + "<|im_end|>", (text[start:end], message)
        spans.append((start, end))
    return text, spans

