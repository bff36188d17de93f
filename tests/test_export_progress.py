"""`lfm-export`'s progress reads well in a log (one line per stage) and on a terminal (one line redrawn)."""

from __future__ import annotations

import os
import pty
import re
import subprocess
import sys
from pathlib import Path

import pytest

LFM_EXPORT = str(Path(sys.executable).parent / "lfm-export")


@pytest.mark.slow
def test_piped_output_has_no_carriage_returns(tmp_path):
    result = subprocess.run([LFM_EXPORT, "--out", str(tmp_path / "bundle")], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, timeout=600, check=True)
    out = result.stdout
    assert b"\r" not in out
    lines = out.decode().splitlines()
    stages = [line.split("] ", 1)[1] for line in lines if line.startswith("  [")]
    assert stages == ["model.embed_tokens", *(f"layer {i}" for i in range(6)), "model.embedding_norm"]
    assert all(line == line.rstrip() for line in lines)  # no padding to a fixed width
    assert lines[-1].startswith("Wrote ")
    files = int(re.search(r"MB, (\d+) files\)", lines[-1]).group(1))
    assert files == len(list((tmp_path / "bundle").iterdir()))  # manifest.json counted too


@pytest.mark.slow
def test_terminal_output_redraws_one_line(tmp_path):
    main, replica = pty.openpty()
    try:
        process = subprocess.Popen([LFM_EXPORT, "--out", str(tmp_path / "bundle")], stdout=subprocess.DEVNULL,
                                   stderr=replica)
        os.close(replica)
        chunks = []
        while True:
            try:
                chunk = os.read(main, 4096)
            except OSError:  # the terminal closes when the process exits
                break
            if not chunk:
                break
            chunks.append(chunk)
        assert process.wait(timeout=600) == 0
    finally:
        os.close(main)
    out = b"".join(chunks).decode()
    assert out.count("\r") >= 60  # one redraw per tensor
    assert out.count("\n") == 1  # and one newline when done
