"""Exports killed mid-write (SIGINT, SIGKILL) or starved of disk leave the previous bundle intact."""

from __future__ import annotations

import hashlib
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from lfm_edge.export.cli import demo_model_path
from lfm_edge.export.exporter import export


def _snapshot(folder: Path) -> dict[str, str]:
    # digests, not bytes: a failing comparison of megabytes would spend minutes in pytest's diff
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _start_export(out: Path, preexec_fn=None) -> subprocess.Popen:
    # int4 with a quality section over four copies of the held-out text: seconds of work after the data file
    # appears, so the signal lands mid-export even on a fast or a busy machine
    text = Path(tempfile.gettempdir()) / "lfm-edge-heldout-x4.txt"
    text.write_text((demo_model_path() / "heldout.txt").read_text() * 4)
    return subprocess.Popen([sys.executable, "-m", "lfm_edge.export.cli", str(demo_model_path()), "--quant", "int4",
                             "--eval-text", str(text), "--out", str(out), "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: _child_setup(preexec_fn))


def _child_setup(then) -> None:
    # A shell running the tests in the background ignores SIGINT for its children, and Python then keeps
    # ignoring it: give the export the default disposition so SIGINT interrupts it as it would a user's.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    if then:
        then()


def _wait_for_partial(parent: Path, proc: subprocess.Popen) -> None:
    deadline = time.time() + 60
    while not any(p.name.startswith(".bundle.partial-") and (p / "model.onnx.data").exists()
                  for p in parent.iterdir()):
        assert proc.poll() is None and time.time() < deadline, "the export ended before it could be interrupted"
        time.sleep(0.01)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
@pytest.mark.slow
def test_killed_export_keeps_the_previous_bundle(tmp_path, sig):
    out = tmp_path / "bundle"
    export(demo_model_path(), out)  # the user's working fp32 bundle
    before = _snapshot(out)
    proc = _start_export(out)
    _wait_for_partial(tmp_path, proc)
    proc.send_signal(sig)
    proc.wait(timeout=60)
    assert _snapshot(out) == before
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "bundle"]
    if sig == signal.SIGINT:
        assert leftovers == []  # it cleaned up after itself
    else:
        assert leftovers and all(".partial-" in n for n in leftovers)  # nothing can clean up after SIGKILL...
        export(demo_model_path(), out, ops="portable")  # ...so the next export does
        assert [p.name for p in tmp_path.iterdir()] == ["bundle"]


def test_interrupted_swap_is_recovered(tmp_path):
    """A kill between moving the old bundle aside and moving the new one in leaves no bundle at the target:
    the next export (here, its recovery step) puts the old one back."""
    from lfm_edge.export.exporter import _recover_interrupted

    out = tmp_path / "bundle"
    export(demo_model_path(), out)
    before = _snapshot(out)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    os.replace(out, tmp_path / f".bundle.old-{dead}")
    os.mkdir(tmp_path / f".bundle.partial-{dead}-x")
    _recover_interrupted(out)
    assert _snapshot(out) == before and [p.name for p in tmp_path.iterdir()] == ["bundle"]
    os.mkdir(tmp_path / f".bundle.partial-{os.getpid()}-y")  # a live export's folder is left alone
    _recover_interrupted(out)
    assert (tmp_path / f".bundle.partial-{os.getpid()}-y").exists()


@pytest.mark.slow
def test_full_disk_fails_cleanly(tmp_path):
    """A file-size limit makes writes fail the way a full disk does (EFBIG instead of ENOSPC)."""
    out = tmp_path / "bundle"
    export(demo_model_path(), out)
    before = _snapshot(out)

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (400_000, 400_000))

    proc = _start_export(out, preexec_fn=limit)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert "lfm-export: error: --out" in err and "writing the bundle failed (File too large)" in err
    assert "Traceback" not in err
    assert _snapshot(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]


def test_real_full_disk_fails_cleanly(tmp_path):
    """A 12 MB tmpfs holds one 9 MB demo bundle but not a second copy: the re-export runs out of space."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        out = disk / "bundle"
        export(demo_model_path(), out)
        before = _snapshot(out)
        from lfm_edge.export.exporter import ExportError

        with pytest.raises(ExportError, match=r"writing the bundle failed \(No space left on device\)"):
            export(demo_model_path(), out, ops="portable")
        assert _snapshot(out) == before
        assert [p.name for p in disk.iterdir()] == ["bundle"]
    finally:
        subprocess.run(["umount", str(disk)], check=False)
