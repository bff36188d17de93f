"""Saved state: one safetensors file (tensors + a JSON document in its metadata), read and written with numpy.

The runtime must run where only onnxruntime, numpy, tokenizers and jinja2 exist (a phone's Python), so the
format is written here rather than through the `safetensors` package; the tests read our files with that
package to hold us to the format. Safetensors has no checksum: the metadata carries the sha256 of the tensor
header, the document and the data (`checksum`), so a truncated, altered or edited file is refused, never
half-used. Files written before that carry `data_sha256` (the data's alone) and are still read; new files
carry both.

Reading checks before it allocates: the file is a regular file within the caller's size limit, the header
fits in it, every tensor entry has a known dtype, a shape of non-negative integers and offsets that tile the
data section exactly; only then is the data read. Writes go through files.write_atomic.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np

from .files import describe, open_regular, write_atomic

DTYPES = {"F32": np.float32, "F16": np.float16, "I8": np.int8, "U8": np.uint8, "I64": np.int64, "I32": np.int32}
NAMES = {np.dtype(v): k for k, v in DTYPES.items()}
KEY = "lfm_edge"  # the metadata entry holding our JSON document
CHECKSUM = "checksum"  # the document's entry holding "sha256:<hex>" of header, document and data
MAX_HEADER = 100 << 20
MAX_TENSORS, MAX_DIMS = 1 << 16, 8


class StateFileError(ValueError):
    """A saved-state file that cannot be used; the message names the file and what is wrong."""


def state_tensors(kv: dict[int, tuple[np.ndarray, np.ndarray]], conv: dict[int, np.ndarray]) -> dict[str, np.ndarray]:
    """A model state's tensors under the names saved files use: `kv.{layer}.key/value`, `conv.{layer}`."""
    tensors = {f"conv.{i}": a for i, a in conv.items()}
    for i, (k, v) in kv.items():
        tensors[f"kv.{i}.key"], tensors[f"kv.{i}.value"] = k, v
    return tensors


def write(path: str | Path, tensors: dict[str, np.ndarray], document: dict[str, Any]) -> int:
    """Write `tensors` and `document` to `path` atomically (files.write_atomic); returns the file's size."""
    entries: dict[str, Any] = {}
    offset = 0
    arrays = []
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name])
        if a.dtype not in NAMES:
            raise ValueError(f"tensor {name!r}: dtype {a.dtype} cannot be saved (expected one of {sorted(DTYPES)})")
        entries[name] = {"dtype": NAMES[a.dtype], "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
        arrays.append(a)
    data_digest = hashlib.sha256()
    for a in arrays:
        data_digest.update(memoryview(a).cast("B"))
    # data_sha256 (the data's alone) lets lfm-edge 0.1's first readers check a file of this version too
    document = dict({k: v for k, v in document.items() if k != CHECKSUM}, data_sha256=data_digest.hexdigest())
    digest = _digest(entries, document)
    for a in arrays:
        digest.update(memoryview(a).cast("B"))
    header = dict(entries, __metadata__={KEY: json.dumps(dict(document, **{CHECKSUM: f"sha256:{digest.hexdigest()}"}))})
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format asks for 8-byte alignment of the data section

    def body(f) -> None:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for a in arrays:
            f.write(memoryview(a).cast("B"))

    return write_atomic(path, body)


def _digest(entries: dict[str, Any], document: dict[str, Any]) -> Any:
    """sha256 over the tensor entries and the document, canonically serialised, to be continued with the data."""
    h = hashlib.sha256()
    h.update(json.dumps(entries, sort_keys=True, separators=(",", ":")).encode())
    h.update(json.dumps(document, sort_keys=True, separators=(",", ":")).encode())
    return h


def read(path: str | Path, limit: int | None = None) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """(tensors, document) of a file `write` made; StateFileError names what is wrong with any other.
    `limit`: the largest file the caller can have written (a bigger one is refused before it is read)."""
    path = Path(path)
    try:
        with open_regular(path, limit) as f:
            size = os.fstat(f.fileno()).st_size
            entries, document, n = _header(path, f, size)
            data = f.read(size - 8 - n)
    except OSError as e:
        raise StateFileError(f"{path}: cannot read ({describe(e)})") from None
    tensors = {}
    for name, (dtype, shape, start, stop) in entries.items():
        count = (stop - start) // dtype.itemsize
        tensors[name] = (np.frombuffer(data, dtype, count, start) if count else np.zeros(0, dtype)).reshape(shape)
    if CHECKSUM in document:
        raw = {name: {"dtype": NAMES[dtype], "shape": list(shape), "data_offsets": [start, stop]}
               for name, (dtype, shape, start, stop) in entries.items()}
        digest = _digest(raw, {k: v for k, v in document.items() if k != CHECKSUM})
        digest.update(data)
        ok = document[CHECKSUM] == f"sha256:{digest.hexdigest()}"
    else:  # version 1 files: the data's checksum only
        ok = document.get("data_sha256") == hashlib.sha256(data).hexdigest()
    if not ok:
        raise StateFileError(f"{path}: the file does not match its checksum (truncated, altered or edited)")
    return tensors, document


def read_document(path: str | Path, limit: int | None = None) -> dict[str, Any]:
    """The JSON document alone, with the header checked but neither the tensors read nor the checksum: for
    indexing files (the checksum is checked when the file is used, by `read`)."""
    path = Path(path)
    try:
        with open_regular(path, limit) as f:
            return _header(path, f, os.fstat(f.fileno()).st_size)[1]
    except OSError as e:
        raise StateFileError(f"{path}: cannot read ({describe(e)})") from None


def _header(path: Path, f: Any, size: int) -> tuple[dict[str, tuple[np.dtype, tuple[int, ...], int, int]],
                                                      dict[str, Any], int]:
    """(tensor entries by name: dtype, shape, start, stop), the document and the header's length, from a file
    of `size` bytes positioned at its start; every field checked against the file before anything is read."""
    if size < 8:
        raise StateFileError(f"{path}: {size} bytes, too short for a saved state (truncated?)")
    (n,) = struct.unpack("<Q", f.read(8))
    if n > min(MAX_HEADER, size - 8):
        if n > MAX_HEADER:
            raise StateFileError(f"{path}: not a saved state of lfm-edge (it does not start with a safetensors "
                                 "header)")
        raise StateFileError(f"{path}: its header says {n:,} bytes but the file has {size - 8:,} after it "
                             "(truncated?)")
    try:
        header = json.loads(f.read(n))
    except (ValueError, RecursionError):
        raise StateFileError(f"{path}: not a saved state of lfm-edge (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise StateFileError(f"{path}: not a saved state of lfm-edge (its header is not a JSON object)")
    metadata = header.pop("__metadata__", None)
    text = metadata.get(KEY) if isinstance(metadata, dict) else None
    if not isinstance(text, str):
        raise StateFileError(f"{path}: not a saved state of lfm-edge (no {KEY!r} entry in its metadata)")
    try:
        document = json.loads(text)
    except (ValueError, RecursionError):
        raise StateFileError(f"{path}: its {KEY!r} metadata is not JSON") from None
    if not isinstance(document, dict):
        raise StateFileError(f"{path}: its {KEY!r} metadata must be a JSON object")
    if len(header) > MAX_TENSORS:
        raise StateFileError(f"{path}: {len(header):,} tensors, more than the {MAX_TENSORS:,} a state can hold")
    entries = {}
    for name, info in header.items():
        entries[name] = _entry(path, name, info)
    data_size, end = size - 8 - n, 0
    for name, (dtype, shape, start, stop) in sorted(entries.items(), key=lambda e: (e[1][2], e[1][3])):
        if start != end:
            raise StateFileError(f"{path}: tensor {name!r} starts at byte {start:,} of the data, expected {end:,} "
                                 "(overlapping, or a gap: altered)")
        if stop - start != math.prod(shape) * dtype.itemsize:
            raise StateFileError(f"{path}: tensor {name!r} spans {stop - start:,} bytes, its shape {list(shape)} "
                                 f"of {NAMES[dtype]} needs {math.prod(shape) * dtype.itemsize:,}")
        if stop > data_size:
            raise StateFileError(f"{path}: tensor {name!r} lies at bytes {start:,}..{stop:,} of a {data_size:,}-byte "
                                 "data section (truncated)")
        end = stop
    if end != data_size:
        raise StateFileError(f"{path}: the data section has {data_size:,} bytes, the tensors account for {end:,} "
                             "(truncated or altered)")
    return entries, document, n


def _entry(path: Path, name: str, info: Any) -> tuple[np.dtype, tuple[int, ...], int, int]:
    where = f"{path}: tensor {name!r}"
    if not isinstance(info, dict):
        raise StateFileError(f"{where}: its entry must be an object, found {type(info).__name__}")
    if not isinstance(info.get("dtype"), str) or info["dtype"] not in DTYPES:
        raise StateFileError(f"{where}: dtype {info.get('dtype')!r:.40}, expected one of {sorted(DTYPES)}")
    shape, offsets = info.get("shape"), info.get("data_offsets")
    if not (isinstance(shape, list) and len(shape) <= MAX_DIMS and all(_count(d) for d in shape)):
        raise StateFileError(f"{where}: shape must be a list of at most {MAX_DIMS} integers >= 0, found {shape!r:.60}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_count(o) for o in offsets)
            and offsets[0] <= offsets[1]):
        raise StateFileError(f"{where}: data_offsets must be [start, stop] with 0 <= start <= stop, found "
                             f"{offsets!r:.60}")
    return np.dtype(DTYPES[info["dtype"]]), tuple(shape), offsets[0], offsets[1]


def _count(value: Any) -> bool:
    return type(value) is int and value >= 0
