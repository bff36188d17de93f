"""lfm_edge.runtime: run an lfm-export bundle on onnxruntime, on a desktop or in a phone's Python.

    from lfm_edge.runtime import LfmModel, TextDelta, Done
    model = LfmModel("build/demo_model-int4-contrib")
    for event in model.stream([{"role": "user", "content": "What is a list?"}]):
        ...

What an app needs is here; the modules behind it are described in README.md in this folder. Needs only
onnxruntime (or a phone backend), numpy, tokenizers and jinja2.
"""

from .backend import Cache, Session
from .backends import open_session
from .bundle import BundleError
from .constrain import ConstraintError, ToolChoice
from .conversation import ContextFull, Conversation, ConversationBusy
from .demo_tools import DEMO_TOOLS
from .events import Done, Event, ReasoningDelta, TextDelta, ToolCall, ToolCallEvent, ToolResult, ToolRun
from .generate import Generation, GenerationStats
from .memory import resident_mb
from .model import LfmModel
from .pressure import TrimLevel, memory_warning, on_memory_warning
from .sampling import Sampling
from .schemas import function_schema
from .statefile import StateFileError
from .toolcalls import ToolCallParseError, parse_tool_calls

__all__ = [
    "DEMO_TOOLS", "BundleError", "Cache", "ConstraintError", "ContextFull", "Conversation", "ConversationBusy", "Done",
    "Event", "Generation", "GenerationStats", "LfmModel", "ReasoningDelta", "Sampling", "Session", "StateFileError",
    "TextDelta", "ToolCall", "ToolCallEvent", "ToolCallParseError", "ToolChoice", "ToolResult", "ToolRun",
    "TrimLevel", "function_schema", "memory_warning", "on_memory_warning",
    "open_session", "parse_tool_calls", "resident_mb",
]
