"""Download a bundle over HTTP(S): resumable, checked against its manifest, installed all at once.

`BASE_URL/manifest.json` lists every file with its size and sha256 (what `lfm-export` writes). Files go
into a hidden folder next to the destination (`.NAME.download`), so a transfer cut by a lost connection or
a killed app resumes with an HTTP Range request where it stopped. Only when every file has its size and
sha256 does the folder replace the destination in one rename: a half bundle is never where the app looks.
No Kivy here: the app runs this on a worker thread and tests run it against a local http.server.
"""

from __future__ import annotations

import http.client
import json
import shutil
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lfm_edge.runtime.bundle import sha256
from lfm_edge.runtime.files import install_folder

MANIFEST = "manifest.json"
CHUNK = 1 << 16


class DownloadError(Exception):
    """The bundle could not be fetched or did not check; the message names the file and what to do."""


class DownloadCancelled(DownloadError):
    """Stopped by the caller; what arrived so far stays for the next attempt to resume."""


@dataclass
class Progress:
    file: str
    file_index: int  # 1-based
    file_count: int
    done: int  # bytes of the whole bundle on disk so far
    total: int  # bytes of the whole bundle

    @property
    def fraction(self) -> float:
        return self.done / self.total if self.total else 0.0


def base_url(url: str) -> str:
    """The folder URL, whether the user gave the folder or its manifest.json."""
    url = url.strip()
    if url.endswith("/" + MANIFEST):
        url = url[: -len(MANIFEST)]
    return url if url.endswith("/") else url + "/"


def default_name(url: str) -> str:
    """A folder name for the bundle: the URL's last path segment."""
    path = urllib.parse.urlparse(base_url(url)).path.rstrip("/")
    return _safe_name(path.rsplit("/", 1)[-1] or "bundle")


def partial_folder(dest: Path) -> Path:
    return dest.parent / f".{dest.name}.download"


def fetch_bundle(url: str, dest: str | Path, progress: Callable[[Progress], None] = lambda p: None,
                 cancel: threading.Event | None = None, timeout: float = 30.0) -> Path:
    """Download the bundle at `url` into `dest` (replacing a bundle there only once the new one checks)."""
    dest = Path(dest)
    base = base_url(url)
    if urllib.parse.urlparse(base).scheme not in ("http", "https"):
        raise DownloadError(f"{url}: expected an http:// or https:// address")
    manifest_bytes = _get_small(base + MANIFEST, timeout)
    files = _files(manifest_bytes, base)
    work = partial_folder(dest)
    _start(work, manifest_bytes)
    total = sum(size for size, _ in files.values())
    done = sum(min((work / n).stat().st_size, files[n][0]) for n in files if (work / n).is_file())
    for index, (name, (size, digest)) in enumerate(files.items(), 1):
        path = work / name

        def report(now: int, name=name, index=index) -> None:
            if cancel is not None and cancel.is_set():
                raise DownloadCancelled(f"cancelled during {name}; download again to resume")
            progress(Progress(name, index, len(files), now, total))

        if path.is_file() and path.stat().st_size == size:
            if sha256(path) == digest:  # complete and correct from an earlier attempt
                report(done)
                continue
            path.unlink()
            done -= size
        done = _fetch_file(base + urllib.parse.quote(name), path, size, done, report, timeout)
        _check(path, name, size, digest)
        report(done)
    (work / MANIFEST).write_bytes(manifest_bytes)
    _install(work, dest)
    return dest


def _get_small(url: str, timeout: float) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.read(16 << 20)
    except urllib.error.HTTPError as e:
        raise DownloadError(f"{url}: the server answered {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise DownloadError(f"{url}: cannot connect ({reason})") from None


def _files(manifest_bytes: bytes, base: str) -> dict[str, tuple[int, str]]:
    """name -> (bytes, sha256) from the manifest, refusing names that would leave the bundle folder."""
    try:
        manifest = json.loads(manifest_bytes)
        files = {name: (int(info["bytes"]), str(info["sha256"]).lower()) for name, info in manifest["files"].items()}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise DownloadError(f"{base}{MANIFEST}: not a bundle manifest (needs 'files' with bytes and sha256 for "
                            f"each: {type(e).__name__} {e})") from None
    for name in files:
        if name != _safe_name(name) or name == MANIFEST:
            raise DownloadError(f"{base}{MANIFEST}: refusing the file name {name!r}")
    if not files:
        raise DownloadError(f"{base}{MANIFEST}: lists no files")
    return files


def _safe_name(name: str) -> str:
    name = name.replace("/", "_").replace("\\", "_").replace("\0", "_")
    return "_" + name if name in ("", ".", "..") or name.startswith(".") else name


def _start(work: Path, manifest_bytes: bytes) -> None:
    """Reuse a partial download of this very manifest; one of another bundle version is thrown away."""
    marker = work / (".expected-" + MANIFEST)
    if work.is_dir() and (not marker.is_file() or marker.read_bytes() != manifest_bytes):
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    marker.write_bytes(manifest_bytes)


def _fetch_file(url: str, path: Path, size: int, done: int, report: Callable[[int], None], timeout: float) -> int:
    """Append the missing tail of `path` (Range request), or fetch it whole when the server ignores Range."""
    have = path.stat().st_size if path.is_file() else 0
    if have > size:  # longer than the manifest says: not ours to trust
        done -= size
        path.unlink()
        have = 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # the server thinks we have everything: let the checksum decide
            return done
        raise DownloadError(f"{path.name}: the server answered {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError) as e:
        raise DownloadError(f"{path.name}: cannot connect ({getattr(e, 'reason', e)}); download again to "
                            "resume") from None
    with response:
        if have and response.status != 206:  # Range ignored: the body is the whole file
            done -= have
            have = 0
        elif have and not response.headers.get("Content-Range", "").startswith(f"bytes {have}-"):
            raise DownloadError(f"{path.name}: the server resumed at the wrong place "
                                f"({response.headers.get('Content-Range')!r}, expected byte {have})")
        with open(path, "ab" if have else "wb") as f:
            try:
                while chunk := response.read(min(CHUNK, size - have + 1)):
                    have += len(chunk)
                    if have > size:
                        raise DownloadError(f"{path.name}: the server sent more than the manifest's {size} bytes")
                    f.write(chunk)
                    done += len(chunk)
                    report(done)
            except (OSError, http.client.HTTPException) as e:  # a dropped connection, a timeout, a short body
                f.flush()
                raise DownloadError(f"{path.name}: transfer interrupted at {have} of {size} bytes ({e}); download "
                                    "again to resume") from None
    if have < size:
        raise DownloadError(f"{path.name}: transfer interrupted at {have} of {size} bytes; download again to resume")
    return done


def _check(path: Path, name: str, size: int, digest: str) -> None:
    got_size = path.stat().st_size
    got = sha256(path) if got_size == size else ""
    if got != digest:
        path.unlink()  # a corrupt file must not be resumed from
        what = f"sha256 {got[:12]}... instead of {digest[:12]}..." if got else f"{got_size} bytes, not {size}"
        raise DownloadError(f"{name}: checksum mismatch ({what}); the file was discarded, download again")


def _install(work: Path, dest: Path) -> None:
    """Replace `dest` with the checked folder; a previous bundle is put back if the swap fails."""
    (work / (".expected-" + MANIFEST)).unlink(missing_ok=True)
    install_folder(work, dest)
