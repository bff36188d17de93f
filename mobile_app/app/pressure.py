"""What the app does when the system runs short of memory (no Kivy in the logic; `watch_platform` is the glue).

On the first warning it saves the open conversation (the low-memory killer may follow without another
callback), then on every warning it trims the model's memory as far as the level says (runtime/pressure.py:
the prefix cache, snapshots, unused KV rows; answers never change) and shows a notice with what it released.
Where the warnings come from:
- Android: onTrimMemory(level) through a ComponentCallbacks2 the Java backend registers on the activity
  (runtime/backends/java.py `watch_trim_memory`), mapped by TrimLevel.from_android;
- iOS, and Android's onLowMemory: SDL turns them into Kivy's `Window.on_memorywarning` (no level: COMPLETE);
- a desktop: nothing; `lfm_edge.runtime.memory_warning(level)` is what a test or a host program calls.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lfm_edge.runtime.pressure import TrimLevel, memory_warning, on_memory_warning


class MemoryWatch:
    """Registered with runtime.on_memory_warning while the app runs: `model()` is the loaded LfmModel or None,
    `save()` saves the open conversation (True when it did), `notice(text)` shows a line to the user (the app
    points it at the UI thread)."""

    def __init__(self, model: Callable[[], Any], save: Callable[[], bool], notice: Callable[[str], None]):
        self.model, self.save, self.notice = model, save, notice
        self.warnings = 0
        self.saved = False
        self.freed = 0  # bytes, over every warning
        self._remove = on_memory_warning(self.handle)

    def handle(self, level: TrimLevel) -> int:
        self.warnings += 1
        if not self.saved:
            self.saved = bool(self.save())
        model = self.model()
        freed = model.trim_memory(level) if model is not None else 0
        self.freed += freed
        saved = "conversation saved; " if self.saved and self.warnings == 1 else ""
        self.notice(f"Low memory ({level.name.lower()}): {saved}released {freed / 1e6:.1f} MB of cached state")
        return freed

    def close(self) -> None:
        self._remove()


def watch_platform() -> list[Any]:
    """Connect the platform's memory warnings to runtime.memory_warning; returns what must stay referenced.
    Kivy's Window.on_memorywarning everywhere (iOS's warning, Android's onLowMemory), and on Android the
    leveled onTrimMemory through the Java backend."""
    from kivy.core.window import Window  # the glue only: the logic above has no Kivy
    from kivy.utils import platform

    Window.bind(on_memorywarning=lambda *_: memory_warning(TrimLevel.COMPLETE))
    held: list[Any] = []
    if platform == "android":
        from lfm_edge.runtime.backends.java import watch_trim_memory  # pyjnius: on Android only

        def trimmed(android_level: int) -> None:
            level = TrimLevel.from_android(android_level)
            if level is not None:
                memory_warning(level)

        held.append(watch_trim_memory(trimmed))
    return held
