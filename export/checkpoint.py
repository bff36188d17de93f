"""Checkpoints: a Hugging Face folder (or hub id) read one tensor at a time from safetensors.

The reader is a few lines of numpy, so the exporter needs neither torch nor the whole model in memory,
handles bf16 (which numpy lacks), and can name the file and tensor when something is off.
Pickled weights (*.bin, *.pt) are never opened.
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from .config import Lfm2Config

# Only what safetensors can hold and a float model uses; integer tensors are not weights here.
_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64}
# transformers 5 saves experts fused: gate_up_proj [E, 2I, H] (gate rows first) and down_proj [E, H, I].
_EXPERT = re.compile(r"(.*\.experts)\.(\d+)\.(w1|w3|w2)\.weight")
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer*", "*.txt", "*.model"]
# Rows of a vocabulary table read (and quantized, export/quant_ops.py) at a time: 32 MB of floats at a hidden size of
# 2048, where the whole LFM2.5-8B-A1B table is 1 GB (128K rows). Nothing computed depends on it, only memory.
VOCABULARY_ROWS = 4096
# what a bundle carries from the checkpoint besides the weights
BUNDLE_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "special_tokens_map.json",
                "chat_template.jinja", "config.json")


def is_gguf(spec: str | Path) -> bool:
    """A llama.cpp GGUF file (local or `org/name/file.gguf` on the hub) rather than a checkpoint folder."""
    return str(spec).lower().endswith(".gguf")


class CheckpointError(ValueError):
    """A checkpoint that cannot be exported; the message names the file or tensor."""


class SafetensorsFile:
    """One .safetensors file: the header parsed up front, each tensor read when asked for."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self._file = open(path, "rb")
            size = path.stat().st_size
            (header_len,) = struct.unpack("<Q", self._file.read(8))
            if header_len > size - 8:
                raise CheckpointError(f"{path}: header length {header_len} exceeds the file size {size}")
            header = json.loads(self._file.read(header_len))
        except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
        header.pop("__metadata__", None)
        self._data_start = 8 + header_len
        self.entries: dict[str, dict] = header
        for name, info in header.items():
            begin, end = info["data_offsets"]
            if self._data_start + end > size:
                raise CheckpointError(f"{path}: tensor {name!r} ends past the end of the file (truncated?)")

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name]["shape"])

    def read(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """The tensor as a new float32 array; `start`/`stop`: only those rows (along the first axis), which are
        consecutive bytes in the file (safetensors is row-major), so a 1 GB table can be read a slice at a time.

        Read with pread, not through the memory map: pages touched through a map stay in the process's
        resident set, and an exporter that walks a 17 GB checkpoint must not look like it holds it."""
        info = self.entries[name]
        dtype = _DTYPES.get(info["dtype"])
        if dtype is None:
            raise CheckpointError(f"{self.path}: tensor {name!r} has dtype {info['dtype']}, expected a float type")
        begin, end = info["data_offsets"]
        shape = list(info["shape"])
        if start or stop is not None:
            rows = shape[0] if shape else 1
            stop = rows if stop is None else stop
            if not shape or not 0 <= start <= stop <= rows:
                raise CheckpointError(f"{self.path}: rows {start}:{stop} of tensor {name!r}, which has shape {shape}")
            row_bytes = (end - begin) // rows
            begin, end, shape[0] = begin + start * row_bytes, begin + stop * row_bytes, stop - start
        raw = np.empty(shape, dtype=dtype)
        view = memoryview(raw.reshape(-1).view(np.uint8))
        done = 0
        while done < end - begin:
            got = os.preadv(self._file.fileno(), [view[done:]], self._data_start + begin + done)
            if got <= 0:
                raise CheckpointError(f"{self.path}: tensor {name!r} could not be read (truncated?)")
            done += got
        if info["dtype"] == "BF16":  # bf16 is the top half of a float32: widen in slices to bound memory
            out = np.empty(raw.shape, np.float32)
            flat_in, flat_out = raw.reshape(-1), out.reshape(-1).view(np.uint32)
            for i in range(0, flat_in.size, 1 << 24):
                flat_out[i:i + (1 << 24)] = flat_in[i:i + (1 << 24)].astype(np.uint32) << 16
            return out
        return raw if dtype == np.float32 else raw.astype(np.float32)


class Checkpoint:
    """A checkpoint folder: config, tokenizer files, and an index of every tensor in its safetensors."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise CheckpointError(f"{self.folder}: not a checkpoint folder")
        self.config = Lfm2Config.from_file(self.folder / "config.json")
        files = sorted(self.folder.glob("*.safetensors"))
        if not files:
            pickles = [p.name for p in self.folder.glob("*.bin")] + [p.name for p in self.folder.glob("*.pt")]
            hint = f" (found {pickles[0]}: pickled weights are never loaded)" if pickles else ""
            raise CheckpointError(f"{self.folder}: no *.safetensors weights{hint}")
        # canonical name -> (file, name as stored)
        self._index: dict[str, tuple[SafetensorsFile, str]] = {}
        for path in files:
            st = SafetensorsFile(path)
            for name in st.entries:
                self._index[_canonical(name)] = (st, name)

    def __contains__(self, name: str) -> bool:
        return name in self._index or self._fused(name) is not None

    def files(self) -> dict[str, bytes]:
        """The tokenizer and config files a bundle carries, as the folder has them."""
        return {n: (self.folder / n).read_bytes() for n in BUNDLE_FILES if (self.folder / n).is_file()}

    def names(self) -> Iterator[str]:
        return iter(self._index)

    def shape(self, name: str) -> tuple[int, ...]:
        fused = self._fused(name)
        if fused is not None:
            return fused[0]
        st, stored = self._locate(name)
        return st.shape(stored)

    def check(self, name: str, shape: tuple[int, ...]) -> None:
        """Raise unless the tensor exists with a float dtype and this shape; reads only the header."""
        st, stored = self._locate(self._fused(name)[1] if self._fused(name) else name)
        if st.entries[stored]["dtype"] not in _DTYPES:
            raise CheckpointError(f"{st.path}: tensor {name!r} has dtype {st.entries[stored]['dtype']}, "
                                  "expected a float type")
        if self.shape(name) != tuple(shape):
            raise CheckpointError(f"{st.path}: tensor {name!r} has shape {list(self.shape(name))}, "
                                  f"expected {list(shape)}")

    def tensor(self, name: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
        """One tensor as float32, checked against the shape the model expects."""
        if shape is not None:
            self.check(name, shape)
        fused = self._fused(name)
        if fused is not None:  # one expert's rows of the fused [E, ...] tensor, never all E of them as float32
            _, source, (j, *within) = fused
            st, stored = self._locate(source)
            return st.read(stored, j, j + 1)[(0, *within)]
        st, stored = self._locate(name)
        return st.read(stored)

    def rows(self, name: str, start: int, stop: int, shape: tuple[int, ...] | None = None) -> np.ndarray:
        """Rows start..stop of a tensor as float32, read from the file alone: the same values as
        `tensor(name)[start:stop]` at the memory of the rows (the vocabulary is quantized by rows)."""
        if self._fused(name) is not None:
            return self.tensor(name, shape)[start:stop]
        st, stored = self._locate(name)
        return st.read(stored, start, stop)

    def _fused(self, name: str) -> tuple[tuple[int, ...], str, tuple] | None:
        """(shape, fused tensor, index) for a per-expert name held only in the fused layout."""
        m = _EXPERT.fullmatch(name)
        if m is None or name in self._index:
            return None
        prefix, j, which = m.group(1), int(m.group(2)), m.group(3)
        source = f"{prefix}.down_proj" if which == "w2" else f"{prefix}.gate_up_proj"
        if source not in self._index:
            return None
        st, stored = self._index[source]
        e, rows, cols = st.shape(stored)
        if j >= e:
            return None
        if which == "w2":
            return (rows, cols), source, (j,)
        half = rows // 2
        rows_slice = slice(0, half) if which == "w1" else slice(half, rows)
        return (half, cols), source, (j, rows_slice)

    def _locate(self, name: str) -> tuple[SafetensorsFile, str]:
        if name not in self._index:
            raise CheckpointError(f"{self.folder}: tensor {name!r} is missing from the safetensors files")
        return self._index[name]


def _canonical(name: str) -> str:
    """Map a checkpoint's tensor name onto the names the model definition uses.

    Liquid's own exports and transformers agree except for the prefix of the decoder stack.
    """
    if name.startswith("model.") or name.startswith("lm_head."):
        return name
    return "model." + name


def resolve(spec: str | Path) -> Path:
    """A local checkpoint folder, or a hub id (`org/name`) downloaded with huggingface_hub.

    Only safetensors, JSON and tokenizer files are fetched; pickled weights are skipped on purpose.
    """
    path = Path(spec)
    if path.exists():
        return path
    text = str(spec)
    if text.count("/") != 1 or text.startswith((".", "/")):
        raise CheckpointError(f"{spec}: no such checkpoint folder (and not a hub id of the form org/name)")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CheckpointError(f"{spec}: downloading a hub id needs huggingface_hub (pip install 'lfm-edge[export]')") \
            from None
    try:
        return Path(snapshot_download(repo_id=text, allow_patterns=_HUB_PATTERNS))
    except Exception as e:  # the hub client raises many types; all mean the same to the user
        raise CheckpointError(f"{spec}: could not download from the Hugging Face hub ({type(e).__name__}: {e})") \
            from None
