"""A conversation on disk: what Conversation.save writes and Conversation.load reads, every field checked.

One safetensors file (statefile.py): tensors `kv.{layer}.key/value` (the rows in use, [1, Hkv, length, D]),
`conv.{layer}` (the state after the last token) and `snapshot.{n}.conv.{layer}`; the JSON document holds the
messages, the tool schemas, the token ids in the state, the snapshot lengths, the settings and the bundle's
fingerprint. A file from another bundle, a damaged or edited file, or one from a newer lfm-edge is refused
with a StateFileError naming the file and the field: state from another model would continue with wrong
answers and no error, and a malformed field must never surface as a TypeError deep inside a turn.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import statefile
from .bundle import StateSpec
from .schemas import tool_schema
from .statefile import StateFileError

FORMAT, VERSION = "lfm-edge conversation", 1
# the settings a file may carry (Conversation's keyword arguments) and their JSON types
SETTINGS: dict[str, type] = {"snapshot_every": int, "max_snapshots": int, "snapshot_bytes": int,
                             "context_policy": str, "prefill_chunk": int, "reserve": int, "prepare_next": bool}
MAX_SNAPSHOTS = 1024  # in one file; a conversation keeps 32 by default
MAX_MESSAGES = 100_000
HEADER_BYTES = 64 << 20  # room for the document in a file's size limit


@dataclass
class Saved:
    """A conversation as saved: the document's fields, and its state as arrays (empty when it holds none)."""

    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]]
    template_vars: dict[str, Any]
    tokens: list[int]
    started: float
    settings: dict[str, Any]
    snapshot_lengths: list[int] = field(default_factory=list)
    tensors: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    answer: dict[str, Any] | None = None  # an answer cut short, to continue (check_answer)
    checksum: str = ""  # the file's, as read (a journal names its base by it)

    @property
    def length(self) -> int:
        return len(self.tokens)


def save(path: Path, saved: Saved, identity: str, kv: dict[int, tuple[np.ndarray, np.ndarray]],
         conv: dict[int, np.ndarray], snapshots: list[dict[int, np.ndarray]]) -> int:
    """Write `saved` and its state (KV rows, conv state, one conv state per snapshot length) atomically."""
    tensors = statefile.state_tensors(kv, conv) if saved.tokens else {}
    for n, snap in enumerate(snapshots if saved.tokens else []):
        for i, a in snap.items():
            tensors[f"snapshot.{n}.conv.{i}"] = a
    document = {
        "format": FORMAT, "version": VERSION, "bundle": identity, "messages": saved.messages, "tools": saved.tools,
        "template_vars": saved.template_vars, "tokens": saved.tokens, "length": saved.length,
        "started": saved.started, "snapshots": saved.snapshot_lengths if saved.tokens else [],
        "settings": saved.settings,
    }
    if saved.answer is not None:  # (a reader before this field shows the partial answer as a finished one)
        document["answer"] = saved.answer
    try:
        json.dumps(document)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: the conversation holds something JSON cannot store ({e}); messages, tool "
                         "schemas and template variables must be plain data") from None
    return statefile.write(path, tensors, document)


def size_limit(state: StateSpec, context_length: int) -> int:
    """The largest file a conversation of this model can save (float32 state at the full context, the most
    snapshots a file may hold): anything bigger is refused before it is read."""
    kv = sum(2 * h * d * 4 for h, d in state.kv.values()) * context_length
    conv = sum(h * k * 4 for h, k in state.conv.values())
    return HEADER_BYTES + kv + conv * (MAX_SNAPSHOTS + 1)


def load(path: Path, identity: str, state: StateSpec, vocab_size: int, context_length: int,
         eos: Sequence[int] = ()) -> Saved:
    """The conversation saved at `path`, its document checked (the tensors are checked by `state_arrays`)."""
    tensors, doc = statefile.read(path, size_limit(state, context_length))
    if doc.get("format") != FORMAT:
        kind = f"an lfm-edge {doc['format']!r} file" if isinstance(doc.get("format"), str) else "another file"
        raise StateFileError(f"{path}: not a saved conversation ({kind})")
    version = doc.get("version")
    if type(version) is not int or version < 1:
        raise StateFileError(f"{path}: field 'version' must be an integer >= 1, found {version!r:.40}")
    if version > VERSION:
        raise StateFileError(f"{path}: format version {version} was written by a newer lfm-edge; this one reads "
                             f"versions up to {VERSION}")
    if doc.get("bundle") != identity:
        raise StateFileError(f"{path}: saved with another bundle (fingerprint {str(doc.get('bundle'))[:12]}..., "
                             f"this bundle is {identity[:12]}...): its state is meaningless here")
    fields = _Fields(path, doc)
    messages = check_messages(str(path), doc.get("messages"))
    tools = fields.list("tools", 4096)
    for n, tool in enumerate(tools):
        try:
            tool_schema(tool, n)
        except ValueError as e:
            raise StateFileError(f"{path}: tools[{n}]: {e}") from None
    template_vars = doc.get("template_vars") or {}
    if not isinstance(template_vars, dict):
        raise StateFileError(f"{path}: field 'template_vars' must be an object, found {template_vars!r:.60}")
    length = fields.integer("length", 0, context_length)
    tokens = fields.list("tokens", context_length)
    if len(tokens) != length:
        raise StateFileError(f"{path}: field 'tokens' holds {len(tokens)} ids for a state of {length} tokens")
    bad = next((t for t in tokens if type(t) is not int or not 0 <= t < vocab_size), None)
    if bad is not None:
        raise StateFileError(f"{path}: field 'tokens' holds {bad!r:.40}, not a token id of this bundle's vocabulary "
                             f"[0, {vocab_size})")
    started = doc.get("started", 0.0)
    if type(started) not in (int, float) or not math.isfinite(started) or not 0 <= started < 1e11:
        raise StateFileError(f"{path}: field 'started' must be a time in seconds, found {started!r:.40}")
    lengths = fields.list("snapshots", MAX_SNAPSHOTS)
    if not all(type(n) is int and 0 < n <= length for n in lengths) or lengths != sorted(set(lengths)):
        raise StateFileError(f"{path}: field 'snapshots' must be increasing token counts within the state's "
                             f"{length}, found {lengths!r:.80}")
    settings = doc.get("settings") or {}
    if not isinstance(settings, dict):
        raise StateFileError(f"{path}: field 'settings' must be an object, found {settings!r:.60}")
    for key, value in settings.items():
        kind = SETTINGS.get(key)
        if kind is None:
            raise StateFileError(f"{path}: settings.{key} is not a setting of a conversation (expected some of "
                                 f"{', '.join(SETTINGS)})")
        if type(value) is not kind:
            raise StateFileError(f"{path}: settings.{key} must be {kind.__name__}, found {value!r:.40}")
    answer = doc.get("answer")
    if answer is not None:
        answer = check_answer(f"{path}: field 'answer'", answer, length, vocab_size, eos)
    return Saved(messages, tools, dict(template_vars), tokens, float(started), dict(settings), lengths, tensors,
                 answer, str(doc.get(statefile.CHECKSUM, "")))


ANSWER_FIELDS = {"prompt_length": int, "pending": int, "max_new_tokens": int, "stop": list,
                 "reasoning_budget": (int, type(None)), "allow_special_tokens": bool}


def check_messages(where: str, messages: Any) -> list[dict[str, Any]]:
    """A document's messages: a list of objects with a string 'role'; StateFileError starting with `where` (the
    file, or the file and its record)."""
    if not isinstance(messages, list):
        raise StateFileError(f"{where}: field 'messages' must be a list, found {messages!r:.60}")
    if len(messages) > MAX_MESSAGES:
        raise StateFileError(f"{where}: field 'messages' holds {len(messages):,} items, at most {MAX_MESSAGES:,} "
                             "expected")
    for n, message in enumerate(messages):
        if not isinstance(message, dict) or type(message.get("role")) is not str:
            raise StateFileError(f"{where}: messages[{n}] must be an object with a string 'role', found "
                                 f"{message!r:.60}")
    return messages


def check_answer(where: str, answer: Any, length: int, vocab_size: int, eos: Sequence[int]) -> dict[str, Any]:
    """An answer cut short (journal.py): the state holds its prompt (`prompt_length` tokens) and the answer's
    tokens but the last, `pending` (sampled, not yet fed); it continues for up to `max_new_tokens` in all."""
    if not isinstance(answer, dict) or answer.keys() != ANSWER_FIELDS.keys():
        raise StateFileError(f"{where} must be an object with the fields {', '.join(ANSWER_FIELDS)}, found "
                             f"{answer!r:.80}")
    for key, kind in ANSWER_FIELDS.items():
        if not isinstance(answer[key], kind) or isinstance(answer[key], bool) and kind is int:
            raise StateFileError(f"{where}: {key} has the wrong type ({answer[key]!r:.40})")
    prompt, pending, most = answer["prompt_length"], answer["pending"], answer["max_new_tokens"]
    if not 1 <= prompt <= length:
        raise StateFileError(f"{where}: prompt_length {prompt} is not within the state's {length} tokens")
    if not 0 <= pending < vocab_size or pending in eos:
        raise StateFileError(f"{where}: pending {pending} is not a token id that continues an answer")
    if not length - prompt + 1 < most:
        raise StateFileError(f"{where}: max_new_tokens {most} leaves nothing to continue after "
                             f"{length - prompt + 1} tokens")
    budget = answer["reasoning_budget"]
    if budget is not None and budget < 0 or not all(isinstance(x, str) for x in answer["stop"]):
        raise StateFileError(f"{where}: reasoning_budget must be >= 0 and stop a list of strings")
    return dict(answer)


ConvState = dict[int, np.ndarray]


def state_arrays(path: Path, saved: Saved, state: StateSpec, conv_dtype: dict[int, Any], kv_dtype: dict[int, Any]
                 ) -> tuple[dict[int, tuple[np.ndarray, np.ndarray]], ConvState, list[ConvState]]:
    """(KV rows, conv state, conv state per snapshot) of a loaded file, each tensor checked against this bundle's
    state layout and dtypes."""
    length = saved.length

    def tensor(name: str, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        a = saved.tensors.get(name)
        if a is None or a.shape != shape or a.dtype != dtype:
            found = "missing" if a is None else f"{a.dtype} {list(a.shape)}"
            raise StateFileError(f"{path}: tensor {name!r} is {found}, this bundle needs {np.dtype(dtype)} "
                                 f"{list(shape)}")
        return a

    kv = {i: tuple(tensor(f"kv.{i}.{part}", (1, h, length, d), kv_dtype[i]) for part in ("key", "value"))
          for i, (h, d) in state.kv.items()}
    conv = {i: tensor(f"conv.{i}", (1, h, k), conv_dtype[i]) for i, (h, k) in state.conv.items()}
    snapshots = [{i: tensor(f"snapshot.{n}.conv.{i}", (1, h, k), conv_dtype[i]).copy()
                  for i, (h, k) in state.conv.items()} for n in range(len(saved.snapshot_lengths))]
    return kv, conv, snapshots  # type: ignore[return-value]


class _Fields:
    """Typed reads of a document's fields, each failure naming the file and the field."""

    def __init__(self, path: Path, doc: dict[str, Any]):
        self.path, self.doc = path, doc

    def list(self, name: str, most: int) -> list:
        value = self.doc.get(name)
        if not isinstance(value, list):
            raise StateFileError(f"{self.path}: field {name!r} must be a list, found {value!r:.60}")
        if len(value) > most:
            raise StateFileError(f"{self.path}: field {name!r} holds {len(value):,} items, at most {most:,} expected")
        return value

    def integer(self, name: str, low: int, high: int) -> int:
        value = self.doc.get(name)
        if type(value) is not int or not low <= value <= high:
            raise StateFileError(f"{self.path}: field {name!r} must be an integer in {low}..{high}, found "
                                 f"{value!r:.40}")
        return value
