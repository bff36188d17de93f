"""What a bundle folder must hold, checked without onnxruntime (a phone build may reach onnxruntime through
Java or Objective-C instead of its Python binding, see mobile_app/backends)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path


class BundleError(ValueError):
    """A bundle that cannot be loaded; the message names the file."""


@dataclass(frozen=True)
class StateSpec:
    """What the graph's inputs say about its state: layer index -> kind and fixed dims."""

    conv: dict[int, tuple[int, int]]  # layer -> (H, K-1)
    kv: dict[int, tuple[int, int]]  # layer -> (Hkv, D)


VERIFY_MODES = ("none", "size", "sampled", "sha256")


def verify_bundle(folder: Path, mode: str = "sampled") -> dict:
    """Check the files manifest.json lists: "size" (sizes only), "sampled" (sizes and a hash of 64 spread
    64 KiB samples of each file: milliseconds, catches a file from another export or a torn download),
    "sha256" (every byte), or "none". Bundles without a manifest, e.g. from onnxruntime-genai's builder, are
    accepted as they are. Returns the manifest."""
    if mode not in VERIFY_MODES:
        raise ValueError(f"verify {mode!r}: expected one of {VERIFY_MODES}")
    path = folder / "manifest.json"
    if not path.is_file():
        return {}
    manifest = read_json(path)
    if mode == "none":
        return manifest
    for name, info in manifest.get("files", {}).items():
        file = folder / name
        if not file.is_file():
            raise BundleError(f"{file}: listed in manifest.json but missing")
        size = file.stat().st_size
        if size != info["bytes"]:
            raise BundleError(f"{file}: {size} bytes, manifest.json says {info['bytes']} (truncated or replaced?)")
        if mode == "sha256" and sha256(file) != info["sha256"]:
            raise BundleError(f"{file}: sha256 differs from manifest.json (corrupted or replaced)")
        if mode == "sampled" and "sampled_sha256" in info and sampled_sha256(file) != info["sampled_sha256"]:
            raise BundleError(f"{file}: content differs from manifest.json (sampled hash; corrupted, or the "
                              "manifest belongs to another bundle)")
    return manifest


def sampled_sha256(path: Path, samples: int = 64, chunk: int = 1 << 16) -> str:
    """sha256 of the size and `samples` evenly spread chunks: a cheap fingerprint of a multi-GB file."""
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        for i in range(samples):
            f.seek(max(0, size - chunk) * i // max(1, samples - 1))
            h.update(f.read(chunk))
    return h.hexdigest()


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise BundleError(f"{path}: missing (is this a bundle folder?)") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{path}: unreadable ({e})") from None


def install_folder(new: Path, dest: Path) -> None:
    """Move the finished folder `new` to `dest`. A previous `dest` is kept aside as `.NAME.old-PID` until the
    new one is in place and put back if the move fails, so a bundle is never half-written where a user or an
    app expects a complete one (export/exporter.py recovers the aside copy after a kill between the renames)."""
    old = None
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        os.replace(dest, old)
    try:
        os.replace(new, dest)
    except BaseException:
        if old is not None:
            os.replace(old, dest)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
