"""Where a bundle came from, said without the exporting machine's paths.

A bundle travels (to a phone, to a colleague, into a bug report); "/home/alice/ckpt" identifies nothing
there and tells strangers about the exporter's disk. A hub id, or a folder's name plus the sha256 of the
checkpoint's config and weights, identifies the checkpoint wherever the bundle goes.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from ..runtime.bundle import sha256

# huggingface_hub's cache keeps each LFS file as blobs/<sha256 of its content>; snapshots/<commit>/ links there.
_SHA256_NAME = re.compile(r"[0-9a-f]{64}")
_HUB_SNAPSHOT = re.compile(r"[0-9a-f]{40}")
_SPLIT = re.compile(r"(.+)-\d{5}-of-(\d{5})\.gguf")


def file_sha256(path: Path) -> str:
    """sha256 of a file's content; a hub cache symlink already carries it as its target's name."""
    if path.is_symlink():
        target = path.resolve()
        if _SHA256_NAME.fullmatch(target.name) and target.parent.name == "blobs":
            return target.name
    return sha256(path)


def checkpoint_source(spec: str | Path, folder: Path) -> dict[str, Any]:
    """The manifest's "source": `hub_id` (and the snapshot's `revision`) when `spec` named the hub, else the
    folder's `name`; then `config_sha256` and the sha256 of each safetensors file."""
    if folder.is_file():  # a GGUF file (the first of a split's parts): the file is the checkpoint
        source = {"hub_id": str(spec)} if not Path(spec).exists() else {"name": folder.name}
        split = _SPLIT.fullmatch(folder.name)
        parts = sorted(folder.parent.glob(f"{split.group(1)}-*-of-{split.group(2)}.gguf")) if split else [folder]
        source["gguf_sha256"] = {p.name: file_sha256(p) for p in parts}
        return source
    if not Path(spec).exists():  # resolve() downloaded it: spec is the hub id
        source: dict[str, Any] = {"hub_id": str(spec)}
        if _HUB_SNAPSHOT.fullmatch(folder.name) and folder.parent.name == "snapshots":
            source["revision"] = folder.name
    else:
        source = {"name": folder.resolve().name}
    source["config_sha256"] = sha256(folder / "config.json")
    source["weights_sha256"] = {p.name: file_sha256(p) for p in sorted(folder.glob("*.safetensors"))}
    return source
