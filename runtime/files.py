"""Files written whole or not at all, and files read only when they are what they claim to be.

Every file the project saves (a conversation, a prefix-cache entry, a report, a manifest) goes through
`write_atomic`: a temporary file of its own in the target's folder (a unique name per write, so two saves to
one path never share one), fsync, rename over the target, fsync of the folder. A reader sees the old file or
the new one, never a torn one; of concurrent saves the last rename wins, each complete. A write that fails
removes its temporary file; one killed mid-write leaves a `.NAME.PID-*.tmp` that the next write to the same
path removes once that process is gone. Writing through a symlink writes the file it points to (the link
stays a link). A whole folder (a bundle) is replaced the same way by `install_folder`.

Every file the project reads from users (saved conversations, GGUF files, tokenizers, JSON) is opened with
`open_regular`: a FIFO, a device or a folder is refused before a byte is read (a FIFO would block forever,
/dev/zero would be read until memory runs out), and its size is checked against a limit before anything is
allocated.
"""

from __future__ import annotations

import os
import secrets
import shutil
import stat
import sys
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

__all__ = ["alive", "describe", "fsync_folder", "install_folder", "open_regular", "read_bytes", "read_text",
           "write_atomic", "write_text"]


def write_atomic(path: str | Path, data: bytes | Callable[[BinaryIO], None]) -> int:
    """Write `data` (bytes, or a function that writes to the open file) to `path` atomically; returns the
    number of bytes written. `path` may be a symlink (its target is written) but not a folder or a special
    file; an OSError names the path."""
    target = _target(Path(path))
    folder = target.parent
    _remove_stale(folder, target.name)
    tmp = folder / f".{target.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp"
    try:
        with open(tmp, "xb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
            size = f.tell()
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_folder(folder)
    return size


def write_text(path: str | Path, text: str) -> int:
    return write_atomic(path, text.encode("utf-8"))


def _target(path: Path) -> Path:
    """The file a write to `path` replaces: the link's target for a symlink (dangling ones included)."""
    if path.is_symlink():
        path = Path(os.path.realpath(path))
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        if not path.parent.is_dir():
            raise FileNotFoundError(2, "its folder does not exist", str(path.parent)) from None
        return path
    if not stat.S_ISREG(mode):
        raise IsADirectoryError(21, f"not a regular file ({_kind(mode)}); refusing to replace it", str(path))
    return path


def _remove_stale(folder: Path, name: str) -> None:
    """Temporary files of earlier writes to `name` whose process is gone (killed mid-write)."""
    try:
        leftovers = list(folder.glob(f".{name}.*-*.tmp"))
    except OSError:
        return
    for leftover in leftovers:
        pid = leftover.name[len(name) + 2:].split("-")[0]
        if pid.isdigit() and int(pid) != os.getpid() and not alive(int(pid)):
            leftover.unlink(missing_ok=True)


def install_folder(new: Path, dest: Path) -> None:
    """Move the finished folder `new` to `dest`. A previous `dest` is kept aside as `.NAME.old-PID-*` until
    the new one is in place and put back if the move fails, so a bundle is never half-written where a user or
    an app expects a complete one (export/exporter.py recovers the aside copy after a kill between the two
    renames)."""
    old = None
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}-{secrets.token_hex(4)}")
        os.replace(dest, old)
    try:
        os.replace(new, dest)
    except BaseException:
        if old is not None:
            os.replace(old, dest)
        raise
    fsync_folder(dest.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def open_regular(path: str | Path, limit: int | None = None) -> BinaryIO:
    """`path` opened for reading, if it is a regular file of at most `limit` bytes; otherwise an OSError
    naming it. Opened without blocking (a FIFO's open would wait for a writer) and checked on the open file,
    so what is checked is what is read."""
    path = Path(path)
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise OSError(22, f"not a regular file ({_kind(info.st_mode)})", str(path))
        if limit is not None and info.st_size > limit:
            raise OSError(27, f"{info.st_size:,} bytes, more than the {limit:,} expected of it", str(path))
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_bytes(path: str | Path, limit: int) -> bytes:
    """The whole of a regular file of at most `limit` bytes (open_regular)."""
    with open_regular(path, limit) as f:
        return f.read(limit + 1)[:limit]


def read_text(path: str | Path, limit: int) -> str:
    """UTF-8 text of a regular file of at most `limit` bytes; UnicodeDecodeError if it is not text."""
    return read_bytes(path, limit).decode("utf-8")


def describe(error: OSError) -> str:
    """An OSError as one phrase: its reason, without Python's `[Errno N]` and the repeated path."""
    return str(error.strerror or error)


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "a special file"


def alive(pid: int) -> bool:
    """Whether process `pid` exists (on this machine)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def fsync_folder(folder: Path) -> None:
    """Make a rename in `folder` durable (POSIX; elsewhere the rename is what the platform gives)."""
    if not sys.platform.startswith(("linux", "darwin")):
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
