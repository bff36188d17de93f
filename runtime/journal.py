"""An answer's checkpoints: an append-only journal beside a saved conversation (Conversation.autosave).

The saved file (persist.py, written whole by files.write_atomic) is the base; `PATH.journal` holds what
happened since, as records appended to it, never rewritten:

    header   b"LFMJ" u32 n, n bytes of JSON {"format", "version", "base": the base's checksum, "base_length"},
             its sha256 (32 bytes)
    record   b"LFMR" u32 json_length u64 data_length, JSON, data, sha256(previous digest + all of the above)

A record's JSON: `from` (the state length its tokens follow: earlier rows are kept, later ones dropped),
`tokens` (ids fed to the state), optionally `messages` (the conversation's messages from then on), and
`answer` (an answer being generated: `prompt_length`, the `pending` token sampled but not yet fed, its
`max_new_tokens` and the other settings that shape it; null once the turn is over). Its data: the KV rows
of those tokens (each attention layer's key then value, [1, Hkv, n, D], layers in order) and the conv state
after them (each conv layer, [1, H, K-1]), in the cache's dtypes.

Each digest chains to the one before it, the first to the header's, the header to the base file's checksum:
a record belongs to one journal of one base, in order. Reading stops at the first record that is cut short or
whose digest fails at the end of the file (a write the process did not finish: ignored, the state is the
previous record's); a failing record with more after it, or any field out of range, is a StateFileError naming
the file and the record. A journal whose header names another base (the base was saved again and the process
ended before the new journal's header replaced the old one) is stale: ignored.

Writes are plain appends (no fsync: a killed process's writes are in the page cache; a power cut may lose the
records since the base); a failed append is cut off again, so a journal never holds a torn record followed by
more.
"""

from __future__ import annotations

import hashlib
import json
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import persist, statefile
from .bundle import StateSpec
from .files import describe, open_regular, write_atomic
from .statefile import StateFileError

FORMAT, VERSION = "lfm-edge journal", 1
HEADER_MAGIC, RECORD_MAGIC = b"LFMJ", b"LFMR"
RECORD_PREFIX = struct.Struct("<4sIQ")
MAX_JSON = 64 << 20
MAX_RECORD_OVERHEAD = 64 << 10  # a record's JSON and framing, per token, in the size limit of a journal


def path_for(base: Path) -> Path:
    """The journal beside a saved conversation."""
    return base.with_name(base.name + ".journal")


@dataclass
class Record:
    start: int
    tokens: list[int]
    kv: dict[int, tuple[np.ndarray, np.ndarray]]
    conv: dict[int, np.ndarray]
    messages: list[dict[str, Any]] | None = None
    answer: dict[str, Any] | None = None


class Writer:
    """Appends records for one base file. `tokens`: what base + records hold (None until a base is written)."""

    def __init__(self, base: Path, every_tokens: int, every_seconds: float):
        if every_tokens < 1 or not every_seconds > 0:
            raise ValueError(f"autosave every_tokens={every_tokens}, every_seconds={every_seconds}: expected >= 1 "
                             "and > 0")
        self.base, self.path = base, path_for(base)
        self.every_tokens, self.every_seconds = every_tokens, every_seconds
        self.tokens: list[int] | None = None
        self.base_length = self.base_size = self.size = 0
        self.digest = b""
        self.error = ""  # why the last write failed ("" when none did)

    def adopt(self, found: Found, checksum: str, base_length: int, tokens: Sequence[int]) -> None:
        """Continue the journal `read` found for this base (a conversation loaded from it autosaves to it
        again): its unfinished last write, if any, is cut off, and records follow the last good one. OSError when
        the base is no longer the file it was read from."""
        if statefile.read_document(self.base).get(statefile.CHECKSUM) != checksum:
            raise OSError(f"{self.base}: saved again since it was loaded")
        with open(self.path, "r+b") as f:
            f.truncate(found.end)
        self.size, self.digest, self.tokens = found.end, found.digest, list(tokens)
        self.base_length, self.base_size = base_length, self.base.stat().st_size

    def started(self, base_size: int, tokens: Sequence[int]) -> None:
        """The base file was just written (`base_size` bytes, holding `tokens`): start a journal for it."""
        checksum = statefile.read_document(self.base).get(statefile.CHECKSUM)
        if not isinstance(checksum, str):
            raise OSError(f"{self.base}: no checksum in the file just written")
        text = json.dumps({"format": FORMAT, "version": VERSION, "base": checksum, "base_length": len(tokens)},
                          separators=(",", ":")).encode()
        digest = hashlib.sha256(text).digest()
        self.size = write_atomic(self.path, HEADER_MAGIC + struct.pack("<I", len(text)) + text + digest)
        self.digest, self.tokens = digest, list(tokens)
        self.base_length, self.base_size = len(tokens), base_size

    def append(self, record: Record) -> None:
        """Append `record` (its tokens follow the first `record.start` of `tokens`)."""
        assert self.tokens is not None and self.base_length <= record.start <= len(self.tokens)
        doc: dict[str, Any] = {"from": record.start, "tokens": record.tokens}
        if record.messages is not None:
            doc["messages"] = record.messages
        doc["answer"] = record.answer
        text = json.dumps(doc, separators=(",", ":")).encode()
        data = [np.ascontiguousarray(a).tobytes() for a in _arrays(record.kv, record.conv)]
        prefix = RECORD_PREFIX.pack(RECORD_MAGIC, len(text), sum(len(d) for d in data))
        h = hashlib.sha256(self.digest + prefix + text)
        for d in data:
            h.update(d)
        digest = h.digest()
        with open(self.path, "r+b") as f:
            try:
                f.seek(self.size)
                for piece in (prefix, text, *data, digest):
                    f.write(piece)
                f.flush()
                end = f.tell()
            except BaseException:
                f.truncate(self.size)  # never a torn record with more after it
                raise
        self.size, self.digest = end, digest
        self.tokens = self.tokens[:record.start] + list(record.tokens)


class Autosave(Writer):
    """When a conversation checkpoints (Conversation.autosave), over a Writer. A failure to write is kept in
    `error`, never raised into the answer; the next checkpoint then rewrites the file."""

    def checkpoint(self, conv: Any, tokens: list[int], answer: dict[str, Any] | None, start: bool = False) -> None:
        """Append `conv`'s state (its cache holds `tokens`); at the start and the end of an answer (`start`: with
        the messages) the file is rewritten instead when the journal cannot extend it or has outgrown it."""
        cache = conv._cache
        if cache is None and tokens:
            return
        try:
            known = self.tokens
            keep = -1 if known is None else len(known) if tokens[:len(known)] == known else _common(known, tokens)
            if keep < self.base_length or start and self.size > max(self.base_size, 1 << 20):
                self.follow(conv._write(self.base, tokens, answer), tokens)
                return
            kv = cache.kv_rows(keep) if cache is not None else {}
            state = cache.conv_state() if cache is not None else {}
            self.append(Record(keep, tokens[keep:], kv, state, list(conv.messages) if start else None, answer))
            self.error = ""
        except (OSError, ValueError) as e:
            self.error, self.tokens = str(e), None

    def follow(self, size: int, tokens: list[int]) -> None:
        """The base file was rewritten (`size` bytes, holding `tokens`): a new journal for it."""
        try:
            self.started(size, tokens)
            self.error = ""
        except (OSError, StateFileError) as e:
            self.error, self.tokens = str(e), None

    def checkpointer(self, conv: Any, generation: Any, prompt: list[int], before: list[int], stop: Sequence[str],
                     reasoning_budget: int | None, allow_special_tokens: bool) -> Callable[[Any], None]:
        """Generation's on_decode: a checkpoint every so many tokens or seconds. The state then holds the prompt
        and the answer but its last token (sampled, not yet fed: `pending`). The answer's last token (an end
        token, max_new_tokens, a cancel) is not checkpointed: the turn's end follows at once."""
        eos = set(conv.model.session.eos_token_ids)
        total = len(before) + generation.max_new_tokens
        last = [len(before), time.monotonic()]

        def on_decode(cache: Any) -> None:
            answer = before + generation.new_tokens[0]
            if answer[-1] in eos or len(answer) >= total or generation.cancel.is_set() or \
                    len(answer) - last[0] < self.every_tokens and time.monotonic() - last[1] < self.every_seconds:
                return
            last[:] = [len(answer), time.monotonic()]
            self.checkpoint(conv, prompt + answer[:-1], {
                "prompt_length": len(prompt), "pending": answer[-1], "max_new_tokens": total, "stop": list(stop),
                "reasoning_budget": reasoning_budget, "allow_special_tokens": allow_special_tokens})
        return on_decode


def _common(a: Sequence[int], b: Sequence[int]) -> int:
    return next((n for n, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def _arrays(kv: dict[int, tuple[np.ndarray, np.ndarray]], conv: dict[int, np.ndarray]) -> list[np.ndarray]:
    return [a for i in sorted(kv) for a in kv[i]] + [conv[i] for i in sorted(conv)]


@dataclass
class Found:
    """A journal as read: its good records, where the last one ends and its digest (a writer continues there)."""

    records: list[Record]
    end: int = 0
    digest: bytes = b""


def read(path: Path, base_checksum: str, base_length: int, state: StateSpec, conv_dtype: dict[int, Any],
         kv_dtype: dict[int, Any], vocab_size: int, context_length: int, eos: Sequence[int]) -> Found:
    """The records of the journal at `path` for the base whose checksum and length are given; none when there
    is no journal or it belongs to another base. StateFileError for a damaged or edited one."""
    # the largest journal this model can write: a base's worth, and a record per token of the context
    limit = persist.size_limit(state, context_length) + context_length * (
        sum(h * k * 4 for h, k in state.conv.values()) + MAX_RECORD_OVERHEAD)
    try:
        with open_regular(path, limit) as f:
            raw = f.read()
    except FileNotFoundError:
        return Found([])
    except OSError as e:
        raise StateFileError(f"{path}: cannot read ({describe(e)})") from None
    if len(raw) < 8 or raw[:4] != HEADER_MAGIC:
        raise StateFileError(f"{path}: not a journal of lfm-edge")
    (n,) = struct.unpack_from("<I", raw, 4)
    if 8 + n + 32 > len(raw):
        return Found([])  # its header was never completely written: the journal was being replaced (stale)
    text, digest = raw[8:8 + n], raw[8 + n:8 + n + 32]
    if hashlib.sha256(text).digest() != digest:
        raise StateFileError(f"{path}: its header does not match its checksum")
    try:
        header = json.loads(text)
    except ValueError:
        raise StateFileError(f"{path}: its header is not JSON") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise StateFileError(f"{path}: not a journal of lfm-edge")
    if header.get("version") != VERSION:
        raise StateFileError(f"{path}: journal version {header.get('version')!r:.20}, this lfm-edge reads {VERSION}")
    if header.get("base") != base_checksum:
        return Found([])  # written for another save of the base: stale
    if header.get("base_length") != base_length:
        raise StateFileError(f"{path}: field 'base_length' is {header.get('base_length')!r:.20}, the base holds "
                             f"{base_length} tokens")
    records, offset, length = [], 8 + n + 32, base_length
    layers = [(i, h, d, np.dtype(kv_dtype[i])) for i, (h, d) in sorted(state.kv.items())]
    while offset < len(raw):
        where = f"{path}: record {len(records)}"
        if offset + RECORD_PREFIX.size > len(raw):
            break  # cut short: a write the process did not finish
        magic, text_length, data_length = RECORD_PREFIX.unpack_from(raw, offset)
        end = offset + RECORD_PREFIX.size + text_length + data_length + 32
        if magic != RECORD_MAGIC or text_length > MAX_JSON:
            raise StateFileError(f"{where}: not a record (damaged)")
        if end > len(raw):
            break
        body = raw[offset:end - 32]
        if hashlib.sha256(digest + body).digest() != raw[end - 32:end]:
            if end == len(raw):
                break  # the last write, not finished
            raise StateFileError(f"{where}: does not match its checksum (damaged or edited)")
        digest = raw[end - 32:end]
        start = offset + RECORD_PREFIX.size
        record = _record(where, raw[start:start + text_length], raw[start + text_length:end - 32], length,
                         base_length, state, layers, conv_dtype, vocab_size, context_length, eos)
        length = record.start + len(record.tokens)
        records.append(record)
        offset = end
    return Found(records, offset, digest)


def _record(where: str, text: bytes, data: bytes, length: int, base_length: int, state: StateSpec,
            layers: list, conv_dtype: dict[int, Any], vocab_size: int, context_length: int,
            eos: Sequence[int]) -> Record:
    """One record's fields, each checked; `length`: the state's length before it."""
    try:
        doc = json.loads(text)
    except ValueError:
        raise StateFileError(f"{where}: not JSON") from None
    if not isinstance(doc, dict):
        raise StateFileError(f"{where}: not a JSON object")
    start = doc.get("from")
    if type(start) is not int or not base_length <= start <= length:
        raise StateFileError(f"{where}: field 'from' must be an integer in {base_length}..{length}, found "
                             f"{start!r:.40}")
    tokens = doc.get("tokens")
    if not isinstance(tokens, list) or start + len(tokens) > context_length or \
            not all(type(t) is int and 0 <= t < vocab_size for t in tokens):
        raise StateFileError(f"{where}: field 'tokens' must be token ids of this bundle's vocabulary within the "
                             f"context length {context_length}")
    messages = doc.get("messages")
    if messages is not None:
        persist.check_messages(where, messages)
    answer = doc.get("answer")
    if answer is not None:
        answer = persist.check_answer(f"{where}: field 'answer'", answer, start + len(tokens), vocab_size, eos)
    n, offset, kv = len(tokens), 0, {}

    def take(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        nonlocal offset
        count = int(np.prod(shape))
        size = count * np.dtype(dtype).itemsize
        if offset + size > len(data):
            raise StateFileError(f"{where}: its data has {len(data):,} bytes, too few for {n} tokens' state")
        a = np.frombuffer(data, dtype, count, offset).reshape(shape)
        offset += size
        return a

    for i, h, d, dtype in layers:
        kv[i] = (take((1, h, n, d), dtype), take((1, h, n, d), dtype))
    conv = {i: take((1, h, k), conv_dtype[i]).copy() for i, (h, k) in sorted(state.conv.items())}
    if offset != len(data):
        raise StateFileError(f"{where}: its data has {len(data):,} bytes, {n} tokens' state needs {offset:,}")
    return Record(start, tokens, kv, conv, messages, answer)



@dataclass
class Replayed:
    """A base's state with its journal's records applied."""

    tokens: list[int]
    kv: dict[int, tuple[np.ndarray, np.ndarray]]
    conv: dict[int, np.ndarray]
    snapshots: list[tuple[int, dict[int, np.ndarray]]]  # (length, conv state): each record's end that stands
    messages: list[dict[str, Any]] | None  # the last record's that has them
    answer: dict[str, Any] | None  # the last record's


def replay(tokens: list[int], kv: dict[int, tuple[np.ndarray, np.ndarray]], conv: dict[int, np.ndarray],
           records: list[Record]) -> Replayed:
    """The state after `records` (checked by `read`) over the base's tokens, KV rows and conv state."""
    total = max([len(tokens)] + [r.start + len(r.tokens) for r in records])
    full = {}
    for i, pair in kv.items():
        full[i] = tuple(np.zeros((*a.shape[:2], total, a.shape[3]), a.dtype) for a in pair)
        for a, b in zip(full[i], pair, strict=True):
            a[:, :, :len(tokens)] = b
    tokens, snapshots, messages, answer = list(tokens), [], None, None
    for r in records:
        end = r.start + len(r.tokens)
        for i, pair in r.kv.items():
            for a, b in zip(full[i], pair, strict=True):
                a[:, :, r.start:end] = b
        tokens = tokens[:r.start] + r.tokens
        conv = r.conv
        snapshots = [s for s in snapshots if s[0] <= r.start] + [(end, r.conv)]
        messages = r.messages if r.messages is not None else messages
        answer = r.answer
    kv = {i: tuple(a[:, :, :len(tokens)] for a in pair) for i, pair in full.items()}
    return Replayed(tokens, kv, conv, snapshots, messages, answer)  # type: ignore[arg-type]
