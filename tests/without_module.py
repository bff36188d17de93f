"""Run Python code in a fresh interpreter where importing a given package fails, as on a phone build that
does not carry it (onnxruntime's Python binding, onnx)."""

from __future__ import annotations

import subprocess
import sys


def run_without(package: str, code: str, timeout: float = 120) -> subprocess.CompletedProcess:
    blocker = ("import sys\n"
               "class Block:\n"
               "    def find_spec(self, name, path=None, target=None):\n"
               f"        if name.split('.')[0] == {package!r}: raise ImportError('blocked: ' + name, name=name)\n"
               "sys.meta_path.insert(0, Block())\n")
    return subprocess.run([sys.executable, "-c", blocker + code], capture_output=True, text=True, timeout=timeout)
