"""Saving a conversation and continuing it later, in another process, exactly where it stopped.

One safetensors file (statefile.py): tensors `kv.{layer}.key/value` (the rows in use, [1, Hkv, length, D]),
`conv.{layer}` (the state after the last token) and `snapshot.{n}.conv.{layer}`; the JSON document holds the
messages, the token ids in the state, the snapshot lengths, the settings and the bundle's fingerprint. A
file from another bundle, a damaged file or one from a newer lfm-edge is refused, naming what differs: state
from another model would continue with wrong answers and no error.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import statefile
from .conversation import FORMAT, VERSION, Conversation, Snapshot
from .statefile import StateFileError

if TYPE_CHECKING:
    from .engine import LfmModel


def save_conversation(conv: Conversation, path: Path) -> int:
    cache = conv._cache
    tensors: dict[str, np.ndarray] = {}
    length = cache.length if cache is not None else 0
    if cache is not None:
        tensors = statefile.state_tensors(cache.kv_rows(), cache.conv_state())
        for n, snap in enumerate(conv.snapshots.items):
            for i, a in snap.conv.items():
                tensors[f"snapshot.{n}.conv.{i}"] = a
    document = {
        "format": FORMAT, "version": VERSION, "bundle": conv.model.identity,
        "messages": conv.messages, "tools": conv.schemas, "template_vars": conv.template_vars,
        "tokens": conv.tokens, "length": length, "started": conv.started,
        "snapshots": [s.length for s in conv.snapshots.items] if cache is not None else [],
        "settings": {"snapshot_every": conv.snapshot_every, "max_snapshots": conv.snapshots.max_count,
                     "snapshot_bytes": conv.snapshots.max_bytes, "context_policy": conv.context_policy,
                     "prefill_chunk": conv.prefill_chunk, "reserve": conv.reserve,
                     "prepare_next": conv.prepare_next},
    }
    try:
        json.dumps(document)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: the conversation holds something JSON cannot store ({e}); messages, tool "
                         "schemas and template variables must be plain data") from None
    return statefile.write(path, tensors, document)


def load_conversation(model: LfmModel, path: Path, tools: Mapping[str, Callable[..., Any]] | None = None,
                      **options: Any) -> Conversation:
    tensors, doc = statefile.read(path)
    if doc.get("format") != FORMAT:
        raise StateFileError(f"{path}: not a saved conversation (format {doc.get('format')!r})")
    version = doc.get("version")
    if not isinstance(version, int) or version > VERSION:
        raise StateFileError(f"{path}: format version {version!r} was written by a newer lfm-edge; this one reads "
                             f"versions up to {VERSION}")
    if doc.get("bundle") != model.identity:
        raise StateFileError(f"{path}: saved with another bundle (fingerprint {str(doc.get('bundle'))[:12]}..., "
                             f"{model.folder} is {model.identity[:12]}...): its state is meaningless here")
    try:
        messages, schemas, tokens = list(doc["messages"]), list(doc["tools"]), [int(t) for t in doc["tokens"]]
        length, lengths = int(doc["length"]), [int(n) for n in doc["snapshots"]]
        settings = dict(doc["settings"]) | options
    except (KeyError, TypeError, ValueError) as e:
        raise StateFileError(f"{path}: field {e} is missing or malformed") from None
    conv = Conversation(model, None, tools if tools is not None else schemas,
                        template_vars=doc.get("template_vars") or {}, **settings)
    conv.messages, conv.schemas = messages, schemas  # as saved: the rendering must be the same
    conv.started = float(doc.get("started", conv.started))
    if length == 0:
        return conv
    if len(tokens) != length or not all(0 <= t < model.session.vocab_size for t in tokens):
        raise StateFileError(f"{path}: {len(tokens)} token ids for a state of {length} tokens, or ids outside the "
                             f"vocabulary of {model.session.vocab_size}")
    session = model.session
    cache = session.new_cache(1, min(session.context_length, max(1 << max(length, 1).bit_length(), conv.reserve)))
    state = session.state

    def tensor(name: str, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        a = tensors.get(name)
        if a is None or a.shape != shape or a.dtype != dtype:
            found = "missing" if a is None else f"{a.dtype} {list(a.shape)}"
            raise StateFileError(f"{path}: tensor {name!r} is {found}, this bundle needs {np.dtype(dtype)} "
                                 f"{list(shape)}")
        return a

    kv = {i: tuple(tensor(f"kv.{i}.{part}", (1, h, length, d), cache.kv_dtype[i]) for part in ("key", "value"))
          for i, (h, d) in state.kv.items()}
    conv_shape = {i: ((1, h, k), cache.conv_dtype[i]) for i, (h, k) in state.conv.items()}
    cache.set_kv_rows(kv, length)
    cache.set_conv_state({i: tensor(f"conv.{i}", *conv_shape[i]) for i in state.conv})
    for n, at in enumerate(lengths):
        if not 0 < at <= length:
            raise StateFileError(f"{path}: snapshot {n} at {at} tokens lies outside the state's {length}")
        conv.snapshots.add(Snapshot(at, {i: tensor(f"snapshot.{n}.conv.{i}", *conv_shape[i]).copy()
                                         for i in state.conv}))
    conv._cache, conv._tokens = cache, tokens
    return conv
