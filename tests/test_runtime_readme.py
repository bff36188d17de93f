"""runtime/README.md's examples run as written, against the int4 demo bundle."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from lfm_edge.export.cli import demo_model_path
from lfm_edge.export.exporter import export

README = Path(__file__).resolve().parent.parent / "runtime" / "README.md"


@pytest.mark.slow
def test_readme_examples_run(tmp_path, monkeypatch, capsys):
    export(demo_model_path(), tmp_path / "build" / "demo_model-int4-contrib", quant="int4")
    monkeypatch.chdir(tmp_path)
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 4
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)  # the project's own documentation, not model output
    out = capsys.readouterr().out
    assert "no accelerator provider installed" in out and "tok/s" in out


@pytest.mark.slow
def test_top_level_readme_python_runs(tmp_path, monkeypatch, capsys):
    export(demo_model_path(), tmp_path / "build" / "demo_model-fp32-contrib")
    monkeypatch.chdir(tmp_path)
    readme = README.parent.parent / "README.md"
    namespace: dict = {}
    for block in re.findall(r"```python\n(.*?)```", readme.read_text(), flags=re.S):
        exec(compile(block, str(readme), "exec"), namespace)  # the project's own documentation
    assert namespace["done"].stats.constraint_satisfied and isinstance(namespace["done"].parsed["city"], str)
    assert (tmp_path / "chat.safetensors").is_file()
