"""Memory pressure: what the runtime gives back when the system asks, and how the platforms' signals map to it.

Phones end apps with large anonymous memory first (Android's lmkd, iOS's jetsam). Beyond the weights and the
live state of each conversation, the runtime holds memory that only saves time: the prefix cache's RAM tier,
the conv snapshots a conversation rolls back to, and KV buffers grown beyond the rows in use.
`LfmModel.trim_memory(level)` releases them in that order, as far as `level` says, and returns the bytes
released; trimming never changes an answer, it only costs a re-prefill later.

| TrimLevel | releases | Android onTrimMemory (ComponentCallbacks2 TRIM_MEMORY_*) | iOS |
|---|---|---|---|
| MODERATE (1) | the prefix cache's RAM tier | RUNNING_MODERATE (5), UI_HIDDEN (20) | |
| BACKGROUND (2) | + conv snapshots (the live state stays) | RUNNING_LOW (10), BACKGROUND (40) | |
| COMPLETE (3) | + unused KV rows | RUNNING_CRITICAL (15), MODERATE (60), COMPLETE (80); onLowMemory | warning |

iOS sends one warning with no level, and jetsam follows without another: it is COMPLETE. The platform glue
(the app: mobile_app/app/app.py) calls `memory_warning(level)`; whoever registered with `on_memory_warning` (the
app, to trim its model and save its conversation) is called in order. On a desktop nothing calls it by
itself: a test or a host program does.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from enum import IntEnum

__all__ = ["TrimLevel", "memory_warning", "on_memory_warning"]

# android.content.ComponentCallbacks2's TRIM_MEMORY_* values
ANDROID_LEVELS = {"RUNNING_MODERATE": 5, "RUNNING_LOW": 10, "RUNNING_CRITICAL": 15, "UI_HIDDEN": 20,
                  "BACKGROUND": 40, "MODERATE": 60, "COMPLETE": 80}


class TrimLevel(IntEnum):
    """How much `trim_memory` releases; each level includes the ones below it."""

    MODERATE = 1  # the prefix cache's RAM tier
    BACKGROUND = 2  # + snapshots other than the live state
    COMPLETE = 3  # + grown-but-unused KV rows

    @classmethod
    def of(cls, level: TrimLevel | int | str) -> TrimLevel:
        """A TrimLevel from itself, its value (1..3) or its name (any case); ValueError names what is accepted."""
        if isinstance(level, str):
            try:
                return cls[level.upper()]
            except KeyError:
                pass
        elif isinstance(level, int) and not isinstance(level, bool):
            try:
                return cls(level)
            except ValueError:
                pass
        raise ValueError(f"trim level {level!r}: expected a TrimLevel, 1..3 or one of "
                         f"{', '.join(m.name.lower() for m in cls)}")

    @classmethod
    def from_android(cls, level: int) -> TrimLevel | None:
        """The level for Android's onTrimMemory(level) (the table above; onLowMemory is 80, COMPLETE). None for a
        value below RUNNING_MODERATE (nothing asked)."""
        if level >= ANDROID_LEVELS["MODERATE"] or level == ANDROID_LEVELS["RUNNING_CRITICAL"]:
            return cls.COMPLETE
        if level >= ANDROID_LEVELS["BACKGROUND"] or level == ANDROID_LEVELS["RUNNING_LOW"]:
            return cls.BACKGROUND
        if level >= ANDROID_LEVELS["RUNNING_MODERATE"]:
            return cls.MODERATE
        return None

    @classmethod
    def from_ios(cls) -> TrimLevel:
        """iOS's didReceiveMemoryWarning: the only warning before jetsam."""
        return cls.COMPLETE


Listener = Callable[[TrimLevel], int | None]
_listeners: list[Listener] = []
_lock = threading.Lock()


def on_memory_warning(listener: Listener) -> Callable[[], None]:
    """Call `listener(level)` at every `memory_warning`; it returns the bytes it freed (or None). Returns a
    function that unregisters it."""
    with _lock:
        _listeners.append(listener)

    def remove() -> None:
        with _lock:
            if listener in _listeners:
                _listeners.remove(listener)
    return remove


def memory_warning(level: TrimLevel | int | str) -> int:
    """What the platform glue calls when the system is short of memory (any thread): every registered
    listener runs, in order of registration; returns the bytes they freed."""
    level = TrimLevel.of(level)
    with _lock:
        listeners = list(_listeners)
    return sum(listener(level) or 0 for listener in listeners)
