"""Saved state: one safetensors file (tensors + a JSON document in its metadata), read and written with numpy.

The runtime must run where only onnxruntime, numpy, tokenizers and jinja2 exist (a phone's Python), so the
format is written here rather than through the `safetensors` package; the tests read our files with that
package to hold us to the format. Safetensors has no checksum: the metadata carries the sha256 of the
data section, so a truncated or altered file is refused, never half-used. Writes are atomic (a temporary
file in the same folder, fsync, rename).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np

DTYPES = {"F32": np.float32, "F16": np.float16, "I8": np.int8, "U8": np.uint8, "I64": np.int64, "I32": np.int32}
NAMES = {np.dtype(v): k for k, v in DTYPES.items()}
KEY = "lfm_edge"  # the metadata entry holding our JSON document
MAX_HEADER = 100 << 20


class StateFileError(ValueError):
    """A saved-state file that cannot be used; the message names the file and what is wrong."""


def state_tensors(kv: dict[int, tuple[np.ndarray, np.ndarray]], conv: dict[int, np.ndarray]) -> dict[str, np.ndarray]:
    """A model state's tensors under the names saved files use: `kv.{layer}.key/value`, `conv.{layer}`."""
    tensors = {f"conv.{i}": a for i, a in conv.items()}
    for i, (k, v) in kv.items():
        tensors[f"kv.{i}.key"], tensors[f"kv.{i}.value"] = k, v
    return tensors


def write(path: str | Path, tensors: dict[str, np.ndarray], document: dict[str, Any]) -> int:
    """Write `tensors` and `document` to `path` atomically; returns the file's size."""
    path = Path(path)
    header: dict[str, Any] = {}
    offset = 0
    digest = hashlib.sha256()
    arrays = []
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name])
        if a.dtype not in NAMES:
            raise ValueError(f"tensor {name!r}: dtype {a.dtype} cannot be saved (expected one of {sorted(DTYPES)})")
        header[name] = {"dtype": NAMES[a.dtype], "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
        digest.update(memoryview(a).cast("B"))
        arrays.append(a)
    header["__metadata__"] = {KEY: json.dumps(dict(document, data_sha256=digest.hexdigest()))}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format asks for 8-byte alignment of the data section
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            for a in arrays:
                f.write(memoryview(a).cast("B"))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return 8 + len(raw) + offset


def read(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """(tensors, document) of a file `write` made; StateFileError names what is wrong with any other."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise StateFileError(f"{path}: cannot read ({e.strerror or e})") from None
    if len(data) < 8:
        raise StateFileError(f"{path}: {len(data)} bytes, too short for a saved state (truncated?)")
    (n,) = struct.unpack("<Q", data[:8])
    if n > min(MAX_HEADER, len(data) - 8):
        raise StateFileError(f"{path}: header of {n} bytes does not fit in the file (truncated, or not a saved "
                             "state)")
    try:
        header = json.loads(data[8:8 + n])
        document = json.loads(header.pop("__metadata__")[KEY])
    except (ValueError, KeyError, TypeError, AttributeError):
        raise StateFileError(f"{path}: not a saved state of lfm-edge (no readable header)") from None
    body = memoryview(data)[8 + n:]
    tensors, digest, end = {}, hashlib.sha256(), 0
    for name, info in sorted(header.items(), key=lambda kv: kv[1].get("data_offsets", [0])[0]):
        try:
            dtype, shape = np.dtype(DTYPES[info["dtype"]]), tuple(int(d) for d in info["shape"])
            start, stop = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise StateFileError(f"{path}: tensor {name!r} has a malformed entry {info!r}") from None
        if start != end or stop - start != int(np.prod(shape)) * dtype.itemsize or stop > len(body):
            raise StateFileError(f"{path}: tensor {name!r} lies at bytes {start}..{stop} of a {len(body)}-byte "
                                 "data section (truncated or altered)")
        digest.update(body[start:stop])
        tensors[name] = np.frombuffer(body[start:stop], dtype=dtype).reshape(shape)
        end = stop
    if end != len(body) or digest.hexdigest() != document.get("data_sha256"):
        raise StateFileError(f"{path}: the data does not match its checksum (truncated or altered)")
    return tensors, document


def read_document(path: str | Path) -> dict[str, Any]:
    """The JSON document alone (the header), without reading or checking the tensors: for indexing files."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > min(MAX_HEADER, path.stat().st_size - 8):
                raise StateFileError(f"{path}: header of {n} bytes does not fit in the file")
            return json.loads(json.loads(f.read(n))["__metadata__"][KEY])
    except StateFileError:
        raise
    except (OSError, struct.error, ValueError, KeyError, TypeError) as e:
        raise StateFileError(f"{path}: not a saved state of lfm-edge ({e})") from None
