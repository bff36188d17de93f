"""Conversation states kept between stateless requests, so a client that resends its history prefills only what
is new: the runtime's own Conversations (snapshots, rollback, the model's prefix cache), pooled.

A request's messages are rendered to token ids; the kept conversation whose state shares the longest prefix with
them is taken out of the pool, given the request's messages, tools and clock, and answers as it would any turn:
it rolls back to its newest snapshot at or before the first token that differs and prefills the rest. So the
answer is token for token what a fresh stateless generation over the same request gives (greedy), whether the
request extends an earlier one, branches from it, or shares nothing with it, wherever the graph's kernels give a
row the same result whatever rows share its step (runtime/README.md says where they do not). Idle conversations
are kept within `max_bytes` (their allocated KV buffers, conv buffers and snapshots), least recently used out.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from datetime import datetime
from typing import Any

from ..conversation import Conversation, common_prefix
from ..model import LfmModel

__all__ = ["Lease", "StatePool"]


class Lease:
    """A conversation taken for one request: its prompt ids (rendered as it will render them) and how many of them
    its state already holds."""

    def __init__(self, conversation: Conversation, prompt: list[int], shared: int):
        self.conversation, self.prompt, self.shared = conversation, prompt, shared


class StatePool:
    """Idle conversations of one model, at most `max_bytes` of state and `max_states` of them."""

    def __init__(self, model: LfmModel, max_bytes: int = 256 << 20, max_states: int = 32):
        if max_bytes < 0 or max_states < 0:
            raise ValueError(f"state budget must be >= 0, got {max_bytes} bytes and {max_states} states")
        self.model, self.max_bytes, self.max_states = model, max_bytes, max_states
        self._idle: OrderedDict[int, Conversation] = OrderedDict()
        self._lock = threading.Lock()
        self.taken = self.reused = self.created = self.evicted = 0

    def take(self, messages: list[dict[str, Any]], tools: list[dict] | None) -> Lease:
        """The idle conversation whose state shares the longest prefix with these messages' tokens (or a new one),
        out of the pool until `give` returns it."""
        started = time.time()
        prompt = self.model.prompt_ids(messages, tools, now=datetime.fromtimestamp(started))
        with self._lock:
            best, shared = None, 0
            for key, conv in self._idle.items():
                n = common_prefix(conv.tokens, prompt)
                if n > shared:
                    best, shared = key, n
            self.taken += 1
            if best is not None:
                conversation = self._idle.pop(best)
                self.reused += 1
            else:
                conversation = Conversation(self.model)
                self.created += 1
        conversation.messages = [dict(m) for m in messages]
        conversation.schemas = list(tools or [])
        conversation.functions = {}  # the client runs its tools
        conversation.template_vars = {}
        conversation.started = started  # the date the request renders with, as a stateless call would
        return Lease(conversation, prompt, shared)

    def give(self, lease: Lease) -> None:
        """Back into the pool (most recently used), then the least recently used go until the budget holds."""
        with self._lock:
            self._idle[id(lease.conversation)] = lease.conversation
            while self._idle and (len(self._idle) > self.max_states or self._bytes() > self.max_bytes):
                self._idle.popitem(last=False)
                self.evicted += 1

    def _bytes(self) -> int:
        return sum(c.memory_bytes for c in self._idle.values())

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {"kept": len(self._idle), "kept_bytes": self._bytes(), "budget_bytes": self.max_bytes,
                    "max_states": self.max_states, "requests": self.taken, "reused": self.reused,
                    "created": self.created, "evicted": self.evicted,
                    "prefix_cache_bytes": self.model.prefix_cache.nbytes if self.model.prefix_cache else 0}
