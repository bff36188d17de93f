"""runtime/README.md's examples run as written, against the int4 demo bundle."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from shared_bundles import demo_bundle

README = Path(__file__).resolve().parent.parent / "runtime" / "README.md"


def _build_folder(cwd: Path, tmp_path_factory, *kinds: str) -> None:
    """cwd/build/demo_model-{kind}-contrib as `make export` names them: links to the session's shared bundles
    (the examples read them, never write into them)."""
    (cwd / "build").mkdir()
    for kind in kinds:
        (cwd / "build" / f"demo_model-{kind}-contrib").symlink_to(demo_bundle(tmp_path_factory.getbasetemp(), kind))


@pytest.mark.slow
def test_readme_examples_run(tmp_path, tmp_path_factory, monkeypatch, capsys):
    _build_folder(tmp_path, tmp_path_factory, "int4")
    monkeypatch.chdir(tmp_path)
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 4
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)  # the project's own documentation, not model output
    out = capsys.readouterr().out
    assert "no accelerator provider installed" in out and "tok/s" in out


@pytest.mark.slow
def test_top_level_readme_python_runs(tmp_path, tmp_path_factory, monkeypatch, capsys):
    """Every Python block of README.md; the lfm-serve client example against `lfm-serve` started as the README
    starts it (on a free port instead of 8000)."""
    import socket
    import subprocess
    import sys
    import time

    import httpx2

    _build_folder(tmp_path, tmp_path_factory, "fp32", "int4")
    monkeypatch.chdir(tmp_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([str(Path(sys.executable).parent / "lfm-serve"), "build/demo_model-int4-contrib",
                               "--port", str(port)], stderr=subprocess.DEVNULL)
    try:
        for _ in range(600):
            try:
                httpx2.get(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except httpx2.HTTPError:
                time.sleep(0.1)
        readme = README.parent.parent / "README.md"
        namespace: dict = {}
        blocks = re.findall(r"```python\n(.*?)```", readme.read_text(), flags=re.S)
        for block in blocks:
            block = block.replace("127.0.0.1:8000", f"127.0.0.1:{port}")
            exec(compile(block, str(readme), "exec"), namespace)  # the project's own documentation
    finally:
        server.terminate()
        server.wait(30)
    assert any("OpenAI(" in b for b in blocks) and namespace["answer"].choices[0].message.content
    assert namespace["done"].stats.constraint_satisfied and isinstance(namespace["done"].parsed["city"], str)
    assert (tmp_path / "chat.safetensors").is_file()
