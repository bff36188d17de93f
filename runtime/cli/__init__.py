"""The runtime's commands: lfm-chat (chat.py), lfm-generate (generate.py), lfm-serve (serve.py)."""

from __future__ import annotations

import sys
import warnings
from typing import Any


def warn_in_one_line(prog: str) -> None:
    """Show the runtime's warnings (e.g. runtime/bundle.py's UnverifiedBundle) as `prog: warning: ...`, one line,
    instead of Python's file:line form with a line of source."""

    def show(message: Any, category: type, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
        print(f"{prog}: warning: {message}", file=file or sys.stderr)

    warnings.showwarning = show
