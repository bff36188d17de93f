"""ChatTemplate renders byte for byte what transformers' apply_chat_template(..., tokenize=False) renders.

The templates are Liquid's own (whitespace inside `{%- -%}` tags does not reach the output):

- LFM2_TEMPLATE: LFM2-350M / LFM2-1.2B as published on the Hub, found embedded in public code (the mlx-raclate
  tests inline it for LiquidAI/LFM2-350M; llama.cpp's models/templates/llama-cpp-lfm2.jinja starts from it).
  LFM2-8B-A1B's own file could not be found in public code; it is assumed to use this LFM2 format.
- LFM25_INSTRUCT_TEMPLATE: LFM2.5-1.2B-Instruct, from the `tokenizer.chat_template` of LiquidAI's GGUF
  (LFM2.5-1.2B-Instruct-Q8_0.gguf, dumped in the l-bom README).
- LFM25_MOE_TEMPLATE: LFM2.5-8B-A1B, llama.cpp models/templates/LFM2.5-8B-A1B.jinja.
- the demo model's template, read from demo_model/tokenizer_config.json.
"""

# ruff: noqa: E501 - the templates below are kept exactly as published
from __future__ import annotations

import datetime as dt
import json
import shutil
from pathlib import Path

import jinja2
import pytest
import transformers.utils.chat_template_utils as hf_chat
from transformers import AutoTokenizer
from transformers.utils import get_json_schema

import lfm_edge.runtime.templates as chat
from lfm_edge.device_bench.lfm25_template import LFM25_MOE_TEMPLATE as PUBLISHED_LFM25_MOE
from lfm_edge.runtime.schemas import function_schema
from lfm_edge.runtime.templates import ChatTemplate, TemplateError

DEMO = Path(__file__).resolve().parents[1] / "demo_model"

LFM2_TEMPLATE = r"""{{- bos_token -}}
{%- set system_prompt = "" -%}
{%- set ns = namespace(system_prompt="") -%}
{%- if messages[0]["role"] == "system" -%}
	{%- set ns.system_prompt = messages[0]["content"] -%}
	{%- set messages = messages[1:] -%}
{%- endif -%}
{%- if tools -%}
	{%- set ns.system_prompt = ns.system_prompt + ("\n" if ns.system_prompt else "") + "List of tools: <|tool_list_start|>[" -%}
	{%- for tool in tools -%}
		{%- if tool is not string -%}
            {%- set tool = tool | tojson -%}
		{%- endif -%}
		{%- set ns.system_prompt = ns.system_prompt + tool -%}
        {%- if not loop.last -%}
            {%- set ns.system_prompt = ns.system_prompt + ", " -%}
        {%- endif -%}
	{%- endfor -%}
	{%- set ns.system_prompt = ns.system_prompt + "]<|tool_list_end|>" -%}
{%- endif -%}
{%- if ns.system_prompt -%}
	{{- "<|im_start|>system\n" + ns.system_prompt + "<|im_end|>\n" -}}
{%- endif -%}
{%- for message in messages -%}
	{{- "<|im_start|>" + message["role"] + "\n" -}}
	{%- set content = message["content"] -%}
	{%- if content is not string -%}
		{%- set content = content | tojson -%}
	{%- endif -%}
	{%- if message["role"] == "tool" -%}
		{%- set content = "<|tool_response_start|>" + content + "<|tool_response_end|>" -%}
	{%- endif -%}
	{{- content + "<|im_end|>\n" -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
	{{- "<|im_start|>assistant\n" -}}
{%- endif -%}
"""

LFM25_INSTRUCT_TEMPLATE = r"""{{- bos_token -}}
{%- set keep_past_thinking = keep_past_thinking | default(false) -%}
{%- set ns = namespace(system_prompt="") -%}
{%- if messages[0]["role"] == "system" -%}
    {%- set ns.system_prompt = messages[0]["content"] -%}
    {%- set messages = messages[1:] -%}
{%- endif -%}
{%- if tools -%}
    {%- set ns.system_prompt = ns.system_prompt + ("\n" if ns.system_prompt else "") + "List of tools: [" -%}
    {%- for tool in tools -%}
        {%- if tool is not string -%}
            {%- set tool = tool | tojson -%}
        {%- endif -%}
        {%- set ns.system_prompt = ns.system_prompt + tool -%}
        {%- if not loop.last -%}
            {%- set ns.system_prompt = ns.system_prompt + ", " -%}
        {%- endif -%}
    {%- endfor -%}
    {%- set ns.system_prompt = ns.system_prompt + "]" -%}
{%- endif -%}
{%- if ns.system_prompt -%}
    {{- "<|im_start|>system\n" + ns.system_prompt + "<|im_end|>\n" -}}
{%- endif -%}
{%- set ns.last_assistant_index = -1 -%}
{%- for message in messages -%}
    {%- if message["role"] == "assistant" -%}
        {%- set ns.last_assistant_index = loop.index0 -%}
    {%- endif -%}
{%- endfor -%}
{%- for message in messages -%}
    {{- "<|im_start|>" + message["role"] + "\n" -}}
    {%- set content = message["content"] -%}
    {%- if content is not string -%}
        {%- set content = content | tojson -%}
    {%- endif -%}
    {%- if message["role"] == "assistant" and not keep_past_thinking and loop.index0 != ns.last_assistant_index -%}
        {%- if "</think>" in content -%}
            {%- set content = content.split("</think>")[-1] | trim -%}
        {%- endif -%}
    {%- endif -%}
    {{- content + "<|im_end|>\n" -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- "<|im_start|>assistant\n" -}}
{%- endif -%}"""

LFM25_MOE_TEMPLATE = PUBLISHED_LFM25_MOE  # one copy, in the package: the benchmark renders with it


TEMPLATES = {
    "lfm2": LFM2_TEMPLATE,
    "lfm2.5-1.2b-instruct": LFM25_INSTRUCT_TEMPLATE,
    "lfm2.5-8b-a1b": LFM25_MOE_TEMPLATE,
    "demo": json.loads((DEMO / "tokenizer_config.json").read_text())["chat_template"],
}

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather & forecast for <city> — “quoted”, 東京 too",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                   "required": ["city"]}}}
CLOCK = {"name": "now", "description": "The time", "parameters": {"type": "object", "properties": {}}}
CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}}

SYSTEM = {"role": "system", "content": "You are a helpful assistant trained by Liquid AI."}
USER = {"role": "user", "content": "What's the weather in Paris? <b>now</b> & \"later\""}

# (messages, tools, extra template variables)
CASES = {
    "user only": ([USER], None, {}),
    "system + user": ([SYSTEM, USER], None, {}),
    "multi-turn": ([SYSTEM, USER, {"role": "assistant", "content": "Sunny."},
                    {"role": "user", "content": "And tomorrow?"}], None, {}),
    "tools, no system": ([USER], [WEATHER, CLOCK], {}),
    "tools + system": ([SYSTEM, USER], [WEATHER], {}),
    "empty tool list": ([SYSTEM, USER], [], {}),
    "tool call and result": ([SYSTEM, USER, {
        "role": "assistant", "tool_calls": [CALL],
        "content": "<|tool_call_start|>[get_weather(city=\"Paris\", days=3)]<|tool_call_end|>Checking."},
        {"role": "tool", "content": '{"temp_c": 21, "sky": "clear"}'}], [WEATHER], {}),
    "tool result as data": ([USER, {"role": "assistant", "content": "Calling.", "tool_calls": [CALL]},
                             {"role": "tool", "content": ["21°C", {"sky": "clear"}]}], [WEATHER], {}),
    "past reasoning": ([USER, {"role": "assistant", "content": "<think>\nhm\n</think>\n\nSunny."},
                        {"role": "user", "content": "Thanks"}], None, {}),
    "past reasoning kept": ([USER, {"role": "assistant", "content": "<think>hm</think> Sunny."},
                             {"role": "user", "content": "Thanks"}], None,
                            {"keep_past_thinking": True, "preserve_thinking": True}),
    "last reasoning": ([USER, {"role": "assistant", "content": "<think>hm</think>Sunny."}], None, {}),
    "reasoning field": ([USER, {"role": "assistant", "content": "Sunny.", "reasoning_content": "look outside"}],
                        None, {}),
    "none values dropped": ([{"role": "system", "content": "S", "name": None}, USER,
                             {"role": "assistant", "content": "ok", "tool_calls": None}], None, {}),
}


@pytest.fixture(autouse=True)
def fixed_clock(monkeypatch):
    """Both renderers call datetime.now() for strftime_now; pin it so a run across midnight cannot differ."""

    class Frozen(dt.datetime):
        @classmethod
        def now(cls, tz=None):
            return cls(2026, 3, 14, 15, 9, 26)

    monkeypatch.setattr(hf_chat, "datetime", Frozen)
    monkeypatch.setattr(chat, "datetime", Frozen)


def _folder(root: Path, template: str | list | None = None, jinja: str | None = None, **config) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(DEMO / "tokenizer.json", root / "tokenizer.json")
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|startoftext|>",
              "eos_token": "<|im_end|>", "pad_token": "<|pad|>", **config}
    if template is not None:
        config["chat_template"] = template
    (root / "tokenizer_config.json").write_text(json.dumps(config))
    if jinja is not None:
        (root / "chat_template.jinja").write_text(jinja)
    return root


def _both(folder: Path, messages, tools=None, add_generation_prompt=True, **extra) -> tuple[str, str]:
    tokenizer = AutoTokenizer.from_pretrained(folder)
    expected = tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=add_generation_prompt,
                                             tokenize=False, **extra)
    ours = ChatTemplate.from_folder(folder).render(messages, tools, add_generation_prompt, **extra)
    return ours, expected


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("templates")
    return {name: _folder(root / name, template) for name, template in TEMPLATES.items()}


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("template", list(TEMPLATES))
def test_matches_transformers(folders, template, case, add_generation_prompt):
    messages, tools, extra = CASES[case]
    ours, expected = _both(folders[template], messages, tools, add_generation_prompt, **extra)
    assert ours == expected


def test_lfm25_specifics_show_up(folders):
    """Guard against a vacuous pass: the features the cases are about really appear in the rendered text."""
    messages, tools, _ = CASES["tool call and result"]
    moe = ChatTemplate.from_folder(folders["lfm2.5-8b-a1b"]).render(messages, tools)
    assert "Today's date: 2026-03-14\n\nList of tools: [" in moe
    assert "<|tool_call_start|>[get_weather(city='Paris', days=3)]<|tool_call_end|>" in moe
    assert "東京" in moe and "<city>" in moe  # tojson neither escapes HTML nor forces ASCII
    reasoning = ChatTemplate.from_folder(folders["lfm2.5-8b-a1b"]).render(*CASES["reasoning field"][:2])
    assert "<think>look outside</think>Sunny." in reasoning
    lfm2 = ChatTemplate.from_folder(folders["lfm2"]).render(messages, tools)
    assert "List of tools: <|tool_list_start|>[" in lfm2
    assert '<|tool_response_start|>{"temp_c": 21, "sky": "clear"}<|tool_response_end|>' in lfm2


@pytest.mark.parametrize("case", ["system + user", "tool call and result"])
def test_demo_model_folder_itself(case):
    messages, tools, _ = CASES[case]
    ours, expected = _both(DEMO, messages, tools)
    assert ours == expected


def test_special_tokens_and_extras(tmp_path):
    template = "{{ bos_token }}|{{ eos_token }}|{{ pad_token }}|{{ unk_token is defined }}|{{ extra | tojson }}"
    folder = _folder(tmp_path, template, bos_token={"__type": "AddedToken", "content": "<|startoftext|>", "special": True})
    ours, expected = _both(folder, [USER], extra={"a": [1, 2.5, None, True]})
    assert ours == expected == '<|startoftext|>|<|im_end|>|<|pad|>|False|{"a": [1, 2.5, null, true]}'
    ours, expected = _both(folder, [USER], bos_token="<s>", extra=1)  # extras override special tokens
    assert ours == expected and ours.startswith("<s>|")


def test_tojson_arguments_match(tmp_path):
    template = ("{{ tools | tojson(indent=2) }}{{ tools | tojson(separators=(',', ':'), sort_keys=true) }}"
                "{{ messages | tojson(ensure_ascii=true) }}")
    ours, expected = _both(_folder(tmp_path, template), [USER, {"role": "user", "content": "é ✓"}], [WEATHER])
    assert ours == expected


def test_jinja_file_wins_and_named_templates(tmp_path):
    folder = _folder(tmp_path / "a", "from config", jinja="from file {{ messages | length }}")
    assert _both(folder, [USER]) == ("from file 1", "from file 1")
    named = [{"name": "default", "template": "plain"}, {"name": "tool_use", "template": "tools {{ tools | length }}"}]
    folder = _folder(tmp_path / "b", named)
    assert _both(folder, [USER]) == ("plain", "plain")
    assert _both(folder, [USER], [WEATHER]) == ("tools 1", "tools 1")
    assert _both(folder, [USER], []) == ("tools 0", "tools 0")  # transformers checks `is not None`


def test_function_tools_match_transformers(tmp_path):
    def get_weather(city: str, days: int = 1, units: str | None = None, hours: list[int] | None = None) -> dict:
        """Get the weather forecast
        for a city.

        Args:
            city: The city, e.g. Paris.
            days: How many days
                to forecast.
            units: "metric" or "imperial".
            hours: Hours of the day to report.

        Returns:
            The forecast.
        """

    def stamp(tags: dict[str, float], flag: bool, level: int | float):
        """Stamp things.

        Args:
            tags: Tag weights.
            flag: A flag.
            level: The level.
        """

    for fn in (get_weather, stamp):
        assert function_schema(fn) == get_json_schema(fn)
    ours, expected = _both(_folder(tmp_path, LFM25_MOE_TEMPLATE), [USER], [get_weather, stamp])
    assert ours == expected


def test_function_tool_errors():
    def undocumented(x: int):
        pass

    def untyped(x):
        """Doc.

        Args:
            x: thing
        """

    def fancy(x: set[int]):
        """Doc.

        Args:
            x: thing
        """

    for fn, words in ((undocumented, "docstring"), (untyped, "type hint"), (fancy, "unsupported")):
        with pytest.raises(ValueError, match=words):
            function_schema(fn)


def _outcome(render) -> tuple[str, object]:
    try:
        return "ok", render()
    except Exception as e:  # noqa: BLE001 - the point is to compare whatever happens
        return "error", type(e)


def test_sandbox_and_helpers_behave_alike(tmp_path):
    cases = {
        "{{ raise_exception('bad turn') }}": jinja2.exceptions.TemplateError,
        "{% set ns = namespace(_x=1) %}": jinja2.exceptions.SecurityError,
        "{% set ns = namespace(a=1) %}{% set ns._b = 2 %}": jinja2.exceptions.SecurityError,
        "{{ messages.__class__ }}": None,
        "{{ messages.__class__.__mro__ }}": None,
        "{{ dict(a=1) | tojson }} {{ dict.fromkeys(['x']) }}": None,
        "{{ dict.__class__.__subclasses__() }}": None,
        "{{ namespace(a=1).a }}": None,
        # no `-` anywhere: the output depends on trim_blocks / lstrip_blocks
        "{% for m in messages %}\n    {% if m.role == 'user' %}\n  U: {{ m.content }}\n    {% endif %}\n{% endfor %}\n":
            None,
        "A\n  {% generation %}\n  gen {{ messages[0].role }}\n  {% endgeneration %}\nB": None,
        "{% for m in messages %}{% if loop.first %}{% continue %}{% endif %}{{ m.role }}{% break %}{% endfor %}":
            None,
    }
    for i, (template, error) in enumerate(cases.items()):
        folder = _folder(tmp_path / str(i), template)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        expected = _outcome(lambda: tokenizer.apply_chat_template([USER, SYSTEM], tokenize=False))  # noqa: B023
        ours = _outcome(lambda: ChatTemplate.from_folder(folder).render([USER, SYSTEM], None, False))  # noqa: B023
        if expected[0] == "ok":
            assert ours == expected, template
        else:  # where transformers raises jinja's error, ours is one TemplateError naming the template's file
            assert ours == ("error", TemplateError), template
        if error is not None:
            assert expected == ("error", error), template


def test_inputs_are_reduced_to_plain_data(tmp_path):
    class Secret:
        def __repr__(self):
            return "secret"

    folder = _folder(tmp_path, "{{ messages[0].content }} {{ messages[0].obj }} {{ flag }}")
    messages = [{"role": "user", "content": "hi", "obj": Secret()}]
    assert _both(folder, messages, flag=(1, "x")) == ("hi <Secret> (1, 'x')", "hi <Secret> (1, 'x')")


def test_errors_are_clear(tmp_path):
    empty = _folder(tmp_path / "none")
    with pytest.raises(ValueError, match="tokenizer_config.json.*chat_template.jinja"):
        ChatTemplate.from_folder(empty)
    with pytest.raises(FileNotFoundError):
        ChatTemplate.from_folder(tmp_path / "missing")
    template = ChatTemplate(LFM2_TEMPLATE, {"bos_token": "<|startoftext|>"})
    bad_messages = [[], "hi", [{"content": "no role"}], [{"role": 3, "content": "x"}], [USER, "text"], {"role": "u"}]
    for messages in bad_messages:
        with pytest.raises(ValueError, match="message"):
            template.render(messages)
    unserialisable = {"type": "function", "function": {"name": "get_weather", "parameters": {"x": {1, 2}}}}
    with pytest.raises(ValueError, match="'get_weather' is not JSON-serialisable"):
        template.render([USER], tools=[unserialisable])
    with pytest.raises(ValueError, match="tool 0"):
        template.render([USER], tools=["get_weather"])
