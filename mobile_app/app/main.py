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

from .desktop import KnownNoise, density_for, display_problem, on_phone, window_size
from .model import check_folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lfm-app", description=__doc__)
    parser.add_argument("bundle", nargs="?", help="bundle folder to load at start")
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime threads for chat (default: measured "
                        "on this device the first time a bundle loads, runtime/threads.py)")
    parser.add_argument("--max-new-tokens", type=int, default=512, help="longest answer per chat round")
    parser.add_argument("--downloads", type=Path, default=None, help="where downloaded bundles go "
                        "(default: the app's data folder)")
    parser.add_argument("--size", type=window_size, default=(480, 900), help="window size on a desktop, "
                        "WIDTHxHEIGHT pixels (default 480x900)")
    parser.add_argument("--density", type=float, default=None, help="UI scale on a desktop (default on Linux: what "
                        "shows the 480x900 layout at --size, so --size 1080x1920 looks as on a phone)")
    parser.add_argument("--autopilot", type=Path, default=None, help="JSON list of steps to run (see autopilot.py)")
    parser.add_argument("--prepack-cache", choices=["off", "use", "auto"], default="off",
                        help="map the weights from a prepack cache next to the bundle (runtime/backends/prepack.py): "
                        "mostly reclaimable memory, at 2.1x the disk and slower decode as measured so far")
    parser.add_argument("--conversation-file", type=Path, default=None, help="where the chat is saved when the app "
                        "is paused or closed, and restored from at start (default: the app's data folder)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)

    problem = (check_folder(args.bundle) if args.bundle else None) or display_problem(os.environ)
    if problem:
        print(f"lfm-app: error: {problem}", file=sys.stderr)
        return 2
    try:
        steps = json.loads(args.autopilot.read_text()) if args.autopilot else None
    except (OSError, ValueError) as e:
        print(f"lfm-app: error: --autopilot {args.autopilot}: {e}", file=sys.stderr)
        return 2

    # Kivy reads its own options from sys.argv, its scale from the environment and sizes the window at import:
    # all settled first.
    os.environ.setdefault("KIVY_NO_ARGS", "1")
    if sys.platform.startswith("linux"):
        os.environ.setdefault("KIVY_CLIPBOARD", "sdl2")  # not xclip / xsel, which a desktop may lack
    desktop = not on_phone(os.environ)
    if desktop and args.density is not None:
        os.environ["KIVY_METRICS_DENSITY"] = str(args.density)
    elif desktop and sys.platform.startswith("linux"):  # Kivy's density there is 1 (macOS, Windows: the dpi's)
        os.environ.setdefault("KIVY_METRICS_DENSITY", str(density_for(*args.size)))
    from kivy.logger import Logger

    Logger.addFilter(KnownNoise())  # before the window and its input providers are set up
    from kivy.config import Config

    if desktop:
        Config.set("graphics", "width", str(args.size[0]))
        Config.set("graphics", "height", str(args.size[1]))
    Config.set("input", "mouse", "mouse,multitouch_on_demand")  # no red dots on right click

    from .app import LfmApp  # Kivy: after its Config is set, as Kivy requires

    app = LfmApp(bundle=Path(args.bundle) if args.bundle else None, threads=args.threads, downloads=args.downloads,
                 autopilot=steps, max_new_tokens=args.max_new_tokens, conversation_file=args.conversation_file,
                 prepack_cache=args.prepack_cache)
    app.run()
    return app.exit_code


if __name__ == "__main__":
    sys.exit(main())
