"""`lfm-app [BUNDLE]`: the demo app (chat with tools, on-device benchmark, model download).

Without BUNDLE it loads the demo bundle `lfm-export --target android` (or `make export`) wrote under
build/, else the newest bundle it downloaded before, and otherwise opens on the Model screen.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .model import check_folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lfm-app", description=__doc__)
    parser.add_argument("bundle", nargs="?", help="bundle folder to load at start")
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime threads for chat (default: its own)")
    parser.add_argument("--max-new-tokens", type=int, default=512, help="longest answer per chat round")
    parser.add_argument("--downloads", type=Path, default=None, help="where downloaded bundles go "
                        "(default: the app's data folder)")
    parser.add_argument("--size", default="480x900", help="window size on a desktop, WIDTHxHEIGHT")
    parser.add_argument("--autopilot", type=Path, default=None, help="JSON list of steps to run (see autopilot.py)")
    parser.add_argument("--prepack-cache", choices=["off", "use", "auto"], default="off",
                        help="map the weights from a prepack cache next to the bundle (runtime/backends/prepack.py): "
                        "mostly reclaimable memory, at 2.1x the disk and slower decode as measured so far")
    parser.add_argument("--conversation-file", type=Path, default=None, help="where the chat is saved when the app "
                        "is paused or closed, and restored from at start (default: the app's data folder)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)

    if args.bundle and (problem := check_folder(args.bundle)):
        print(f"lfm-app: error: {problem}", file=sys.stderr)
        return 2
    steps = json.loads(args.autopilot.read_text()) if args.autopilot else None

    # Kivy reads its own options from sys.argv and sizes the window at import: both settled first.
    os.environ.setdefault("KIVY_NO_ARGS", "1")
    if sys.platform.startswith("linux"):
        os.environ.setdefault("KIVY_CLIPBOARD", "sdl2")  # not xclip / xsel, which a desktop may lack
    from kivy.config import Config
    from kivy.utils import platform

    if platform not in ("android", "ios"):
        width, height = (int(v) for v in args.size.lower().split("x"))
        Config.set("graphics", "width", str(width))
        Config.set("graphics", "height", str(height))
    Config.set("input", "mouse", "mouse,multitouch_on_demand")  # no red dots on right click

    from .app import LfmApp  # Kivy: after its Config is set, as Kivy requires

    app = LfmApp(bundle=Path(args.bundle) if args.bundle else None, threads=args.threads, downloads=args.downloads,
                 autopilot=steps, max_new_tokens=args.max_new_tokens, conversation_file=args.conversation_file,
                 prepack_cache=args.prepack_cache)
    app.run()
    return app.exit_code


if __name__ == "__main__":
    sys.exit(main())
