"""The runtime installs and runs with onnxruntime, numpy, tokenizers and jinja2 only: what a phone carries."""

from __future__ import annotations

import json
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from lfm_edge.export.exporter import export
from lfm_edge.runtime.backends.python import LfmSession
from lfm_edge.runtime.generate import generate
from tiny_models import build

ROOT = Path(__file__).resolve().parent.parent
RUNTIME_DEPS = ["onnxruntime", "numpy", "tokenizers", "jinja2"]

PROBE = """
import importlib.util, json, sys
from lfm_edge.runtime.backends.python import LfmSession
from lfm_edge.runtime.generate import generate
import lfm_edge.runtime, lfm_edge.runtime.templates, lfm_edge.runtime.toolcalls, lfm_edge.runtime.cli.chat
heavy = [m for m in ("torch", "transformers", "onnx") if importlib.util.find_spec(m) is not None]
tokens = generate(LfmSession(sys.argv[1]), [[5, 6, 7, 8]], 8, eos_token_ids=[])[0]
print(json.dumps({"heavy": heavy, "tokens": tokens, "loaded": sorted(m for m in sys.modules if m in
      ("torch", "transformers", "onnx"))}))
"""


@pytest.mark.slow
def test_runtime_runs_in_a_clean_environment_without_torch(tmp_path):
    build("moe_mixed", tmp_path / "ckpt")
    bundle = export(tmp_path / "ckpt", tmp_path / "bundle", quant="int4").bundle
    expected = generate(LfmSession(bundle), [[5, 6, 7, 8]], 8, eos_token_ids=[])[0]

    env = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env)  # this pip installs into it (--python): no ensurepip, ~8 s loaded
    py = str(env / "bin" / "python")
    # --no-compile: byte-compiling numpy and onnxruntime was half of the install (13.6 -> 6.9 s); the probe's
    # imports compile what they use
    pip = [sys.executable, "-m", "pip", "--python", py, "install", "-q", "--disable-pip-version-check", "--no-compile"]
    subprocess.run(pip + RUNTIME_DEPS, check=True, timeout=600)
    subprocess.run(pip + ["--no-deps", str(ROOT)], check=True, timeout=600)  # a real wheel build, not editable
    out = subprocess.run([py, "-c", PROBE, str(bundle)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["heavy"] == [] and result["loaded"] == []
    assert result["tokens"] == expected


def test_the_runtime_imports_without_onnxruntimes_python_binding():
    """A phone build may reach onnxruntime through Java or Objective-C (runtime/backends): the runtime's face, the
    generation loop, the bundle checks and the app's model layer must import without `onnxruntime`."""
    from without_module import run_without

    code = ("import sys\n"
            "import lfm_edge.runtime, lfm_edge.runtime.generate, lfm_edge.runtime.bundle\n"
            "import lfm_edge.runtime.backends as b\n"
            "assert 'onnxruntime' not in sys.modules and 'python' not in b.available()\n"
            "print('ok')\n")
    out = run_without("onnxruntime", code)
    assert out.stdout.strip() == "ok", out.stderr[-2000:]
