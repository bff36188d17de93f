"""The chat template a bundle will carry, checked at export: a checkpoint's or a GGUF's template is code from a
download, so it is compiled and rendered on a probe conversation (system, user, assistant, user; with a tool and
without) in the runtime's bounded sandbox before it ships. One that fails is replaced by FALLBACK, LFM2's ChatML
layout, and the bundle says so (manifest.json `chat_template`, and a warning from lfm-export)."""

from __future__ import annotations

from pathlib import Path

from ..runtime.bundle import BundleError
from ..runtime.templates import ChatTemplate, TemplateError

__all__ = ["FALLBACK", "check_template"]

# LFM2's layout: bos, a system prompt with the tool list, one ChatML block per message, tool results wrapped
FALLBACK = r"""{{- bos_token -}}
{%- set ns = namespace(system_prompt="") -%}
{%- if messages and messages[0]["role"] == "system" -%}
  {%- set ns.system_prompt = messages[0]["content"] -%}{%- set messages = messages[1:] -%}
{%- endif -%}
{%- if tools -%}
  {%- set ns.system_prompt = ns.system_prompt + ("\n" if ns.system_prompt else "") + "List of tools: <|tool_list_start|>[" -%}
  {%- for tool in tools -%}
    {%- if tool is not string -%}{%- set tool = tool | tojson -%}{%- endif -%}
    {%- set ns.system_prompt = ns.system_prompt + tool + (", " if not loop.last else "") -%}
  {%- endfor -%}
  {%- set ns.system_prompt = ns.system_prompt + "]<|tool_list_end|>" -%}
{%- endif -%}
{%- if ns.system_prompt -%}{{- "<|im_start|>system\n" + ns.system_prompt + "<|im_end|>\n" -}}{%- endif -%}
{%- for message in messages -%}
  {%- set content = message["content"] -%}
  {%- if content is not string -%}{%- set content = content | tojson -%}{%- endif -%}
  {%- if message["role"] == "tool" -%}{%- set content = "<|tool_response_start|>" + content + "<|tool_response_end|>" -%}{%- endif -%}
  {{- "<|im_start|>" + message["role"] + "\n" + content + "<|im_end|>\n" -}}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- "<|im_start|>assistant\n" -}}{%- endif -%}
"""  # noqa: E501

PROBE = [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "What is 2+2?"},
         {"role": "assistant", "content": "4."}, {"role": "user", "content": "And 3+3?"}]
PROBE_TOOL = {"type": "function", "function": {"name": "calculator", "description": "Evaluate arithmetic.",
              "parameters": {"type": "object", "properties": {"expression": {"type": "string"}},
                             "required": ["expression"]}}}


def check_template(folder: Path) -> dict:
    """What the bundle folder's template is: {"source": "checkpoint"} when it renders the probe, else it is replaced
    by FALLBACK (chat_template.jinja, which takes precedence) and {"source": "fallback", "reason": ...}."""
    try:
        template = ChatTemplate.from_folder(folder)
        template.render(PROBE, tools=[PROBE_TOOL])
        template.render(PROBE)
        return {"source": "checkpoint"}
    except (BundleError, TemplateError, ValueError) as e:
        reason = str(e).replace(str(folder) + "/", "")  # the file's name in the bundle, not the temporary folder
    (folder / "chat_template.jinja").write_text(FALLBACK, encoding="utf-8")
    for extra in sorted((folder / "chat_templates").glob("*.jinja")) if (folder / "chat_templates").is_dir() else []:
        extra.unlink()
    return {"source": "fallback", "reason": reason}
