"""What a bundle folder must hold, checked without onnxruntime (a phone build may reach onnxruntime through
Java or Objective-C instead of its Python binding, see mobile_app/backends)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class BundleError(ValueError):
    """A bundle that cannot be loaded; the message names the file."""


@dataclass(frozen=True)
class StateSpec:
    """What the graph's inputs say about its state: layer index -> kind and fixed dims."""

    conv: dict[int, tuple[int, int]]  # layer -> (H, K-1)
    kv: dict[int, tuple[int, int]]  # layer -> (Hkv, D)


@dataclass(frozen=True)
class BundleConfig:
    """What genai_config.json and manifest.json say, as every backend reads them (read_bundle)."""

    folder: Path
    manifest: dict
    model_file: Path
    decoder: dict
    share_buffer: bool
    context_length: int
    eos_token_ids: tuple[int, ...]
    pad_token_id: int
    vocab_size: int | None  # genai_config's model.vocab_size; the graph's logits shape wins where static


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


def read_bundle(folder: str | Path, verify: str = "sampled") -> BundleConfig:
    """genai_config.json and manifest.json of `folder`, the files checked as `verify` says (verify_bundle):
    what every backend reads before it touches a runtime."""
    folder = Path(folder)
    if not folder.is_dir():
        raise BundleError(f"{folder}: not a bundle folder")
    manifest = verify_bundle(folder, verify)
    genai = read_json(folder / "genai_config.json")
    model = genai.get("model", {})
    decoder = model.get("decoder", {})
    model_file = folder / decoder.get("filename", "model.onnx")
    if not model_file.is_file():
        raise BundleError(f"{model_file}: missing (genai_config.json names it as the model)")
    eos = model.get("eos_token_id", [])
    return BundleConfig(
        folder=folder, manifest=manifest, model_file=model_file, decoder=decoder,
        share_buffer=bool(genai.get("search", {}).get("past_present_share_buffer", False)),
        context_length=int(model.get("context_length", 4096)),
        eos_token_ids=tuple(eos if isinstance(eos, list) else [eos]),
        pad_token_id=int(model.get("pad_token_id", 0)),
        vocab_size=int(model["vocab_size"]) if "vocab_size" in model else None)


def _static(d: Any) -> int | None:
    """A dimension as the runtimes report it: int (Python), -1 (Java's TensorInfo.getShape), or a name/None."""
    return int(d) if isinstance(d, int) and d >= 0 else None


def state_spec(inputs: Iterable[tuple[str, Sequence[Any]]], decoder: dict) -> StateSpec:
    """State dims from the graph's (input name, shape) pairs, as any runtime reports them;
    a symbolic KV head count or head size (the genai builder leaves the head size so) comes from
    genai_config.json's decoder section."""
    fallback = {1: decoder.get("num_key_value_heads"), 3: decoder.get("head_size")}
    conv, kv = {}, {}
    for name, shape in inputs:
        parts = name.split(".")
        if name.startswith("past.") and parts[-1] == "conv":
            h, k = _static(shape[1]), _static(shape[2])
            if h is None or k is None:
                raise BundleError(f"{name}: conv state dims must be static, the graph says {list(shape)}")
            conv[int(parts[1])] = (h, k)
        elif name.startswith("past_key_values.") and parts[-1] == "key":
            dims = []
            for axis in (1, 3):
                d = _static(shape[axis])
                if d is None:
                    if fallback[axis] is None:
                        raise BundleError(f"{name}: dimension {axis} is symbolic and genai_config.json gives no "
                                          f"{'num_key_value_heads' if axis == 1 else 'head_size'}")
                    d = int(fallback[axis])
                dims.append(d)
            kv[int(parts[1])] = (dims[0], dims[1])
    return StateSpec(conv, kv)


def bundle_identity(folder: str | Path) -> str:
    """A fingerprint of the bundle's graph and weights (sampled hashes of model.onnx and its data files): what a
    saved conversation's KV rows and conv state are only valid with. Milliseconds, even for a 5 GB bundle."""
    folder = Path(folder)
    genai = read_json(folder / "genai_config.json")
    name = genai.get("model", {}).get("decoder", {}).get("filename", "model.onnx")
    h = hashlib.sha256()
    for path in sorted(p for p in folder.iterdir() if p.name.startswith(name) and p.is_file()):
        h.update(f"{path.name}:{sampled_sha256(path)};".encode())
    return h.hexdigest()
