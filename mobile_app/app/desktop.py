"""What `lfm-app` settles before Kivy starts on a desktop: that a window can open at all, the window's size and
the UI's scale, and Kivy's start-up noise about optional pieces a desktop does not need. No Kivy import at
module level: Kivy reads its environment at import, so all of this runs first.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Mapping

# the layout's size at density 1: what `--size` is scaled against (the default window)
LAYOUT_WIDTH, LAYOUT_HEIGHT = 480, 900


def on_phone(environ: Mapping[str, str]) -> bool:
    """Whether this is Android or iOS, as kivy.utils.platform decides it (readable before Kivy is imported)."""
    return (environ.get("KIVY_BUILD", "") in ("android", "ios") or "P4A_BOOTSTRAP" in environ
            or "ANDROID_ARGUMENT" in environ)


def display_problem(environ: Mapping[str, str], platform: str = sys.platform) -> str | None:
    """Why no window can open here, or None. On a Linux desktop SDL2 needs an X or Wayland display; without one
    the app used to run with no window and say nothing. SDL_VIDEODRIVER set: the user chose a driver."""
    if not platform.startswith("linux") or on_phone(environ) or environ.get("SDL_VIDEODRIVER"):
        return None
    if environ.get("DISPLAY") or environ.get("WAYLAND_DISPLAY"):
        return None
    return ("no display: DISPLAY is not set (nor WAYLAND_DISPLAY); run lfm-app in a desktop session, or under a "
            "virtual display: xvfb-run lfm-app")


def window_size(text: str) -> tuple[int, int]:
    """An argparse type for --size: "WIDTHxHEIGHT" in pixels."""
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        width = height = 0
    if width <= 0 or height <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected WIDTHxHEIGHT in pixels, e.g. 1080x1920")
    return width, height


def density_for(width: int, height: int) -> float:
    """The UI scale that shows the 480x900 layout at `width` x `height` pixels: a phone-sized window (1080x1920)
    gets a phone's density instead of a tiny UI in its corner. Kivy's default on a desktop is 1."""
    return round(min(width / LAYOUT_WIDTH, height / LAYOUT_HEIGHT), 2)


class KnownNoise(logging.Filter):
    """Kivy's start on a Linux desktop logs two missing optional pieces as an ERROR and a CRITICAL with
    tracebacks, on every start: libmtdev (multitouch devices read through mtdev) and xclip / xsel (the X
    primary selection, Kivy's "cut buffer": middle-click paste). The app needs neither: the mouse, touch, the
    keyboard and the clipboard work through SDL2. Each such record becomes one INFO line saying so; any other
    failure of the same providers is left as Kivy logs it."""

    MTDEV = "Input: no libmtdev, so multitouch devices are not read through mtdev (not needed: SDL2 reads input)"
    CUTBUFFER = ("Cutbuffer: no xclip or xsel, so middle-click paste of the X selection is off (not needed: the "
                 "clipboard works through SDL2)")

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        error = str(record.exc_info[1]) if record.exc_info and record.exc_info[1] else ""
        if message.startswith("Input: MTDev is not supported") and "libmtdev" in error:
            return self._explain(record, self.MTDEV)
        missing = ("xclip - FileNotFoundError", "xsel - FileNotFoundError")
        if message.startswith("Cutbuffer: Unable to find any valuable") and all(m in message for m in missing):
            return self._explain(record, self.CUTBUFFER)
        return True

    @staticmethod
    def _explain(record: logging.LogRecord, text: str) -> bool:
        record.msg, record.args = text, ()
        record.levelno, record.levelname = logging.INFO, "INFO"
        record.exc_info = record.exc_text = None
        return True
