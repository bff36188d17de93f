"""lfm-app on a desktop, before any window: no display fails in one line, --size and the UI's scale, and Kivy's
start-up noise about optional pieces turned into one line each (mobile_app/app/desktop.py). The app under a
display: tests/test_mobile_app_gui.py."""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys

import pytest

from lfm_edge.mobile_app.app.desktop import KnownNoise, density_for, display_problem, window_size


def test_without_a_display_lfm_app_fails_in_one_line_naming_display():
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY", "SDL_VIDEODRIVER")}
    out = subprocess.run([sys.executable, "-m", "lfm_edge.mobile_app.app"], env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1
    assert out.stderr.startswith("lfm-app: error: no display: DISPLAY is not set") and "xvfb-run" in out.stderr


def test_which_systems_need_a_display():
    assert display_problem({}, "linux") is not None
    assert display_problem({"DISPLAY": ":0"}, "linux") is None
    assert display_problem({"WAYLAND_DISPLAY": "wayland-0"}, "linux") is None
    assert display_problem({"SDL_VIDEODRIVER": "offscreen"}, "linux") is None  # a driver chosen by the user
    assert display_problem({"P4A_BOOTSTRAP": "sdl2"}, "linux") is None  # Android: linux, no X
    assert display_problem({}, "darwin") is None and display_problem({}, "win32") is None


def test_size_and_the_scale_that_shows_the_layout_at_it():
    assert window_size("1080x1920") == (1080, 1920) and window_size("480X900") == (480, 900)
    for bad in ("1080by1920", "1080x", "0x900", "-5x10", "1x2x3"):
        with pytest.raises(argparse.ArgumentTypeError, match="expected WIDTHxHEIGHT in pixels"):
            window_size(bad)
    assert density_for(480, 900) == 1.0  # the default window: Kivy's own scale
    assert density_for(1080, 1920) == 2.13  # a phone's pixels: a phone's scale, limited by the height
    assert density_for(960, 900) == 1.0  # wider only: more room, same scale


def record(message: str, level: int, error: BaseException | None = None) -> logging.LogRecord:
    exc_info = (type(error), error, None) if error else None
    return logging.LogRecord("kivy", level, __file__, 1, message, (), exc_info)


def test_kivys_known_start_noise_becomes_one_info_line_each():
    noise = KnownNoise()
    mtdev = record("Input: MTDev is not supported by your version of linux", logging.ERROR,
                   OSError("libmtdev.so.1: cannot open shared object file: No such file or directory"))
    cut = record("Cutbuffer: Unable to find any valuable Cutbuffer provider. Please enable debug logging\n"
                 "xclip - FileNotFoundError: [Errno 2] No such file or directory: 'xclip'\n  File ...\n"
                 "xsel - FileNotFoundError: [Errno 2] No such file or directory: 'xsel'\n  File ...", logging.CRITICAL)
    for r, text in ((mtdev, KnownNoise.MTDEV), (cut, KnownNoise.CUTBUFFER)):
        assert noise.filter(r) and r.getMessage() == text and "\n" not in text
        assert (r.levelno, r.levelname, r.exc_info) == (logging.INFO, "INFO", None)
    # anything else from the same providers stays as Kivy logged it
    other = record("Input: MTDev is not supported by your version of linux", logging.ERROR, ValueError("bad device"))
    broken = record("Cutbuffer: Unable to find any valuable Cutbuffer provider\nxclip - RuntimeError: boom",
                    logging.CRITICAL)
    for r in (other, broken):
        level, message = r.levelno, r.getMessage()
        assert noise.filter(r) and (r.levelno, r.getMessage()) == (level, message)
