"""The state after shared conversation prefixes (system prompt and tool schemas), for new conversations.

A RAM tier bounded by bytes (least recently used out) and, with a folder, a disk tier in the saved-state
format (statefile.py) that survives restarts: an app's first conversation after a start prefills only what
follows its system prompt. Disk entries are tied to the bundle's fingerprint. Whatever is wrong with a file in
the folder (unreadable, damaged, edited, another bundle's, not ours at all, a FIFO or a folder under an
entry's name) makes it a miss, never an error of LfmModel or of a conversation, never a wrong continuation:
damaged entries are removed, foreign ones ignored.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import statefile
from .statefile import StateFileError

FORMAT, VERSION = "lfm-edge prefix", 1
MAX_FILE_BYTES = 4 << 30  # an entry holds a system prompt's state; a bigger file is not one of ours


@dataclass
class PrefixEntry:
    tokens: tuple[int, ...]
    kv: dict[int, tuple[np.ndarray, np.ndarray]]
    conv: dict[int, np.ndarray]

    @property
    def nbytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in self.kv.values()) + sum(a.nbytes for a in self.conv.values())

    def fits(self, cache: Any, state: Any) -> bool:
        """Whether this state's layers, shapes and dtypes are those of `cache` (a backend's Cache) over a model
        whose state layout is `state` (a file edited to pass its checksum would otherwise be fed in)."""
        n = len(self.tokens)
        return self.kv.keys() == state.kv.keys() and self.conv.keys() == state.conv.keys() and all(
            a.shape == (1, h, n, d) and a.dtype == cache.kv_dtype[i]
            for i, (h, d) in state.kv.items() for a in self.kv[i]) and all(
            self.conv[i].shape == (1, h, k) and self.conv[i].dtype == cache.conv_dtype[i]
            for i, (h, k) in state.conv.items())


class PrefixCache:
    """`max_bytes` of RAM (0 keeps nothing: every conversation prefills its prefix); with `folder`, also up to
    `max_disk_bytes` of files there, valid for the bundle whose fingerprint is `identity`."""

    def __init__(self, max_bytes: int = 64 << 20, folder: str | Path | None = None, identity: str | None = None,
                 max_disk_bytes: int = 512 << 20):
        if max_bytes < 0 or max_disk_bytes < 0:
            raise ValueError(f"prefix cache budgets must be >= 0, got {max_bytes} and {max_disk_bytes} bytes")
        if folder is not None and not identity:
            raise ValueError("a prefix cache folder needs the bundle's identity (its entries are valid only there)")
        self.max_bytes, self.max_disk_bytes, self.identity = max_bytes, max_disk_bytes, identity
        self.folder = Path(folder) if folder is not None else None
        self._entries: OrderedDict[tuple[int, ...], PrefixEntry] = OrderedDict()
        self._disk: dict[tuple[int, ...], Path] = {}
        self._lock = threading.Lock()
        self.hits = self.misses = self.disk_hits = 0
        if self.folder is not None:
            try:
                self.folder.mkdir(parents=True, exist_ok=True)
                paths = list(self.folder.glob("prefix-*.safetensors"))
            except OSError as e:
                raise ValueError(f"prefix_cache_dir {self.folder}: cannot use it as a folder ({e.strerror or e})") \
                    from None
            for path in paths:
                tokens = _index(path, identity)
                if tokens is not None:
                    self._disk[tokens] = path

    def lookup(self, prompt: Sequence[int], limit: int, longer_than: int = 0) -> PrefixEntry | None:
        """The longest stored prefix of `prompt` of more than `longer_than` and at most `limit` tokens."""
        with self._lock:
            best = _longest(self._entries, prompt, limit, longer_than)
            on_disk = _longest(self._disk, prompt, limit, len(best) if best else longer_than)
            if on_disk is not None:
                entry = self._load(on_disk)
                if entry is not None:
                    self.disk_hits += 1
                    self._remember(entry)
                    best = on_disk
            if best is None:
                self.misses += 1
                return None
            self.hits += 1
            self._entries.move_to_end(best)
            return self._entries[best]

    def __contains__(self, tokens: Sequence[int]) -> bool:
        with self._lock:
            return tuple(tokens) in self._entries

    def store(self, entry: PrefixEntry) -> None:
        with self._lock:
            self._remember(entry)
            if self.folder is not None and entry.tokens not in self._disk and self.max_disk_bytes:
                self._write(entry)

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(e.nbytes for e in self._entries.values())

    def trim(self) -> int:
        """Empty the RAM tier (memory pressure); the disk tier stays. Returns the bytes released."""
        with self._lock:
            freed = sum(e.nbytes for e in self._entries.values())
            self._entries.clear()
            return freed

    def _remember(self, entry: PrefixEntry) -> None:
        if entry.nbytes > self.max_bytes:
            return
        self._entries[entry.tokens] = entry
        self._entries.move_to_end(entry.tokens)
        while sum(e.nbytes for e in self._entries.values()) > self.max_bytes:
            self._entries.popitem(last=False)

    def _write(self, entry: PrefixEntry) -> None:
        name = hashlib.sha256(np.array(entry.tokens, np.int64).tobytes()).hexdigest()[:24]
        path = self.folder / f"prefix-{name}.safetensors"
        tensors = statefile.state_tensors(entry.kv, entry.conv)
        try:
            statefile.write(path, tensors, {"format": FORMAT, "version": VERSION, "bundle": self.identity,
                                            "tokens": list(entry.tokens)})
        except OSError:  # a full or read-only disk: the RAM tier still serves
            return
        self._disk[entry.tokens] = path
        sizes = {}
        for p in self._disk.values():
            try:
                info = p.stat()
                sizes[p] = (info.st_mtime, info.st_size)
            except OSError:
                continue
        files = sorted(sizes, key=lambda p: sizes[p][0])
        while files and sum(sizes[p][1] for p in files) > self.max_disk_bytes:
            old = files.pop(0)
            _remove(old)
            self._disk = {t: p for t, p in self._disk.items() if p != old}

    def discard(self, tokens: Sequence[int]) -> None:
        """Forget an entry that turned out unusable (conversation.py checks an entry against its cache): from
        RAM, and its file removed."""
        with self._lock:
            self._entries.pop(tuple(tokens), None)
            path = self._disk.pop(tuple(tokens), None)
            if path is not None:
                _remove(path)

    def _load(self, tokens: tuple[int, ...]) -> PrefixEntry | None:
        path = self._disk[tokens]
        try:
            tensors, doc = statefile.read(path, MAX_FILE_BYTES)
            if doc.get("bundle") != self.identity or doc.get("tokens") != list(tokens):
                raise StateFileError(f"{path}: not this prefix")
            kv = {int(n.split(".")[1]): (tensors[n], tensors[n[:-3] + "value"]) for n in tensors if n.endswith(".key")}
            conv = {int(n.split(".")[1]): tensors[n].copy() for n in tensors if n.startswith("conv.")}
            if len(kv) + len(conv) != len(tensors) - sum(n.endswith(".value") for n in tensors):
                raise StateFileError(f"{path}: unexpected tensors")
        except (StateFileError, KeyError, ValueError, IndexError):
            del self._disk[tokens]
            _remove(path)  # damaged: a miss now, and not read again
            return None
        return PrefixEntry(tokens, kv, conv)


def _index(path: Path, identity: str | None) -> tuple[int, ...] | None:
    """The prefix a file in the folder holds, if it is an entry of this bundle (else None: ignored)."""
    try:
        doc = statefile.read_document(path, MAX_FILE_BYTES)
    except StateFileError:
        return None
    tokens = doc.get("tokens")
    if doc.get("format") != FORMAT or doc.get("version") != VERSION or doc.get("bundle") != identity or \
            not isinstance(tokens, list) or not tokens or not all(type(t) is int and t >= 0 for t in tokens):
        return None
    return tuple(tokens)


def _remove(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError:  # a folder under an entry's name, a read-only disk: it stays a miss
        pass


def _longest(keys, prompt: Sequence[int], limit: int, longer_than: int) -> tuple[int, ...] | None:
    best = None
    for key in keys:
        n = len(key)
        if longer_than < n <= limit and (best is None or n > len(best)) and tuple(prompt[:n]) == key:
            best = key
    return best
