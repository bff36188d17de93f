"""A copy of a bundle's weights in onnxruntime's prepacked layout, written once next to the bundle and mapped at
every later load, so the weights are served from the file mapping instead of copied into anonymous memory.

Why: onnxruntime's CPU kernels (MatMulNBits, QMoE, MatMul) repack every constant weight into the layout they
compute from when a session is created, into memory from malloc: the full LFM2.5-8B-A1B holds ~5 GB of
anonymous memory, which a phone's low-memory killer counts against the app. onnxruntime can write those
repacked buffers into an external data file (`session.save_external_prepacked_constant_initializers`) and,
loading that file, maps them instead of keeping its own copy.

What it does not do (measured, device_bench/results/notes/2026-11-29-cold-start.md): make loading faster. onnxruntime
1.32 finds a saved
buffer by the hash of the buffer PrePack produces, so it still repacks every weight at load (the same CPU work)
and only then swaps its copy for the mapped one. The stored layout cannot be consumed directly either:
MatMulNBits `weight_prepacked` 1/2 are CUDA layouts the CPU kernel ignores, QMoE `weights_prepacked` 1 makes
the CPU kernel read the bytes as another layout (other results, 27x slower), and -1/0 are the raw layout.

The cache depends on the CPU (the packed layout follows the kernels MLAS picks for its instruction set), the
onnxruntime version and the bundle's bytes; all three are recorded in cache.json and checked at load, with
the files' sizes and a sampled hash (onnxruntime itself does not validate the saved buffers). Anything that
does not match is refused with the reason, and the session repacks into memory as without a cache. A cache is
written only where the bundle's folder is writable and has room, into a temporary folder that is renamed into
place once complete and checked: a failed write (full disk, killed process) never leaves a cache that is used.
It costs about 2.1x the bundle's weights on disk: onnxruntime keeps the raw weights beside the packed ones in
the same file, because it hashes the raw weights' packing to find the packed ones.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import platform
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..bundle import sampled_sha256, sha256
from ..files import alive, fsync_folder, read_text

FORMAT = "lfm-edge-prepacked/1"
FOLDER = "prepacked"  # inside the bundle folder
MODEL, DATA, INFO = "model.onnx", "model.onnx.data", "cache.json"
SAMPLES = 256  # sampled hash of the cache's data file: 256 x 64 KiB, ~10 ms from the page cache
# room the write needs: the raw weights again plus their packed copy (~1.05-1.1x at block 128), and a margin
# so that a cache never fills the device
SPACE_FACTOR, SPACE_MARGIN = 2.3, 512 << 20


@dataclass
class PrepackStatus:
    """What happened to the prepack cache at this load. `state`: "mapped" (an existing cache was used),
    "written" (written now and used), "off" (not asked for), "not written" (no cache, and why), "refused"
    (a cache was there but did not fit this CPU / runtime / bundle, or was damaged: `reason` says which)."""

    state: str
    reason: str = ""
    folder: Path | None = None
    disk_bytes: int = 0  # the cache's size on disk

    @property
    def mapped(self) -> bool:
        return self.state in ("mapped", "written")

    def message(self) -> str:
        text = {"mapped": "weights mapped from the prepack cache", "written": "prepack cache written and mapped",
                "off": "prepack cache off: weights repacked into memory",
                "not written": "no prepack cache: weights repacked into memory",
                "refused": "prepack cache refused: weights repacked into memory"}[self.state]
        return f"{text} ({self.reason})" if self.reason else text


def cpu_identity() -> dict[str, str]:
    """What the packed layout depends on: the architecture and the instruction-set features MLAS dispatches on
    (x86 `flags`, arm64 `Features`, the union over all cores), hashed; the model name for messages."""
    features: set[str] = set()
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip().lower()
            if key in ("flags", "features"):
                features.update(value.split())
            elif key in ("model name", "hardware", "cpu model") and value.strip():
                name = value.strip()
    except OSError:  # macOS / iOS: no cpuinfo; the platform string stands in
        features.add(platform.platform())
    digest = hashlib.sha256(" ".join(sorted(features)).encode()).hexdigest()[:16]
    return {"machine": platform.machine(), "features": digest, "name": name}


def bundle_identity(model_file: Path, manifest: dict) -> dict[str, Any]:
    """The bytes the cache was made from: the manifest's size and sha256 of the graph and its data files when
    it lists them (lfm-export bundles), else their sizes and sampled hashes."""
    files = manifest.get("files", {}) if isinstance(manifest.get("files"), dict) else {}
    out = {}
    for path in sorted(p for p in model_file.parent.iterdir() if p.name.startswith(model_file.name) and p.is_file()):
        info = files.get(path.name)
        if isinstance(info, dict) and "sha256" in info:
            out[path.name] = f"{info.get('bytes')}:{info['sha256']}"
        else:
            out[path.name] = f"{path.stat().st_size}:{sampled_sha256(path)}"
    return out


def cache_key(model_file: Path, manifest: dict, onnxruntime_version: str, options_key: str) -> dict[str, Any]:
    return {"format": FORMAT, "onnxruntime": onnxruntime_version, "cpu": cpu_identity(),
            "bundle": bundle_identity(model_file, manifest), "session": options_key}


def _differences(saved: dict, key: dict) -> str:
    """Why a saved key does not fit, in words."""
    if saved.get("format") != key["format"]:
        return f"format {saved.get('format')!r}, this lfm-edge writes {key['format']!r}"
    if saved.get("onnxruntime") != key["onnxruntime"]:
        return f"written by onnxruntime {saved.get('onnxruntime')}, this is {key['onnxruntime']}"
    cpu, here = saved.get("cpu") or {}, key["cpu"]
    if cpu.get("machine") != here["machine"] or cpu.get("features") != here["features"]:
        return (f"written on another CPU ({cpu.get('name')}, {cpu.get('machine')}, features {cpu.get('features')}; "
                f"this is {here['name']}, {here['machine']}, features {here['features']}): its packed layout "
                "may not fit this CPU's kernels")
    if saved.get("bundle") != key["bundle"]:
        return "made from other model files (another bundle, or the bundle changed since)"
    if saved.get("session") != key["session"]:
        return f"made with session options {saved.get('session')!r}, these are {key['session']!r}"
    return ""


def find(bundle: Path, key: dict, verify: str) -> tuple[Path | None, PrepackStatus | None]:
    """The cache's model file if a valid cache for `key` is there; else None and, when one was there but is
    refused, the status saying why (None when there is none)."""
    folder = bundle / FOLDER
    if not folder.is_dir():
        return None, None
    try:
        saved = json.loads(read_text(folder / INFO, 1 << 20))
        if not isinstance(saved, dict):
            raise ValueError("not an object")
    except FileNotFoundError:
        return None, PrepackStatus("refused", f"{folder}: no {INFO} (an unfinished write?)", folder)
    except (OSError, ValueError) as e:
        return None, PrepackStatus("refused", f"{folder / INFO}: unreadable ({e})", folder)
    why = _differences(saved, key)
    if not why:  # sizes always (a truncated file must never be mapped), hashes as `verify` says
        why = _check_files(folder, saved.get("files", {}), verify)
    if why:
        return None, PrepackStatus("refused", why, folder)
    return folder / MODEL, None


def _check_files(folder: Path, files: Any, verify: str) -> str:
    if not isinstance(files, dict) or set(files) != {MODEL, DATA}:
        return f"{folder / INFO}: files must list {MODEL} and {DATA}"
    for name, info in files.items():
        path = folder / name
        try:
            size = path.stat().st_size
        except OSError:
            return f"{path}: missing"
        if size != info.get("bytes"):
            return f"{path}: {size} bytes, {INFO} says {info.get('bytes')} (truncated or replaced?)"
        if verify == "sha256" and sha256(path) != info.get("sha256"):
            return f"{path}: sha256 differs from {INFO} (corrupted or replaced)"
        if verify == "sampled" and sampled_sha256(path, SAMPLES) != info.get("sampled_sha256"):
            return f"{path}: content differs from {INFO} (sampled hash; corrupted or replaced)"
    return ""


def free_bytes(folder: Path) -> int:
    stats = os.statvfs(folder)
    return stats.f_bavail * stats.f_frsize


@dataclass
class Writer:
    """A cache being written: onnxruntime writes into `temp` while it creates the session (`options`)."""

    bundle: Path
    temp: Path
    key: dict
    status: PrepackStatus = field(default_factory=lambda: PrepackStatus("not written"))

    def configure(self, options: Any) -> None:
        # onnxruntime warns that a graph optimized for this machine should stay on it: the cache's key (CPU,
        # onnxruntime version) is what keeps it there, so the warning is noise in every first load's output
        options.log_severity_level = 3
        options.optimized_model_filepath = str(self.temp / MODEL)
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name", DATA)
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        options.add_session_config_entry("session.save_external_prepacked_constant_initializers", "1")

    def finish(self) -> Path | None:
        """After the session was created: check what onnxruntime wrote, record it and move it into place.
        Returns the cache's model file, or None (the temporary folder removed, `status` says why)."""
        try:
            why = self._written_whole()
            if why:
                raise OSError(why)
            files = {}
            for name in (MODEL, DATA):
                path = self.temp / name
                with open(path, "rb+") as f:
                    os.fsync(f.fileno())
                files[name] = {"bytes": path.stat().st_size, "sha256": sha256(path),
                               "sampled_sha256": sampled_sha256(path, SAMPLES)}
            info = self.temp / INFO
            info.write_text(json.dumps({**self.key, "files": files}, indent=1))
            with open(info, "rb+") as f:
                os.fsync(f.fileno())
            final = self.bundle / FOLDER
            if final.exists():  # a refused cache: replaced, never mixed with the new one
                shutil.rmtree(final)
            os.replace(self.temp, final)
            fsync_folder(self.bundle)
        except OSError as e:
            self.abandon(f"writing it failed: {e}")
            return None
        self.status = PrepackStatus("written", "", final, disk_bytes(final))
        return final / MODEL

    def _written_whole(self) -> str:
        """Whether every byte the written graph refers to is in its data file (a full disk truncates it)."""
        model, data = self.temp / MODEL, self.temp / DATA
        if not model.is_file() or not data.is_file():
            return "onnxruntime wrote no complete model (see its log)"
        size, end = data.stat().st_size, 0
        for fields in external_data(model.read_bytes()):
            if "offset" in fields:
                end = max(end, int(fields["offset"]) + int(fields.get("length", 0)))
            for k, v in fields.items():
                if k.startswith("prepacked_"):
                    for part in v.split("|")[1:]:
                        offset, length, _ = part.split(";")
                        end = max(end, int(offset) + int(length))
        if not end:
            return "onnxruntime saved no weights to the data file"
        if size < end:
            return f"{data.name} is {size} bytes, its graph refers to {end} (disk full?)"
        return ""

    def abandon(self, reason: str) -> None:
        shutil.rmtree(self.temp, ignore_errors=True)
        self.status = PrepackStatus("not written", reason)


def external_data(model: bytes) -> list[dict[str, str]]:
    """The external_data entries of every initializer of a serialized ONNX model, read from the protobuf wire
    format directly (ModelProto.graph = 7, GraphProto.initializer = 5, TensorProto.external_data = 13,
    StringStringEntryProto key = 1, value = 2): the onnx package is not part of a phone's runtime."""

    def fields(buf: memoryview):
        i = 0
        while i < len(buf):
            tag, i = _varint(buf, i)
            number, kind = tag >> 3, tag & 7
            if kind == 0:
                _, i = _varint(buf, i)
            elif kind == 1:
                i += 8
            elif kind == 5:
                i += 4
            elif kind == 2:
                length, i = _varint(buf, i)
                yield number, buf[i:i + length]
                i += length
            else:
                raise ValueError(f"protobuf wire type {kind} at byte {i}")

    out = []
    view = memoryview(model)
    for number, graph in fields(view):
        if number != 7:
            continue
        for number, tensor in fields(graph):
            if number != 5:
                continue
            entries = {}
            for number, entry in fields(tensor):
                if number == 13:
                    kv = {n: bytes(v).decode() for n, v in fields(entry)}
                    entries[kv.get(1, "")] = kv.get(2, "")
            out.append(entries)
    return out


def raw_ranges(model_file: Path) -> list[tuple[int, int]]:
    """(offset, end) in the data file of every initializer's raw bytes, as opposed to the packed buffers
    (`prepacked_*` entries) the kernels read every token."""
    return [(int(e["offset"]), int(e["offset"]) + int(e.get("length", 0)))
            for e in external_data(model_file.read_bytes()) if "offset" in e]


def _varint(buf: memoryview, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[i]
        i += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, i
        shift += 7


def writer(bundle: Path, key: dict, data_bytes: int) -> Writer | PrepackStatus:
    """A Writer for a new cache in `bundle`, or the status saying why none can be written there."""
    needed = int(data_bytes * SPACE_FACTOR) + SPACE_MARGIN
    try:
        free = free_bytes(bundle)
        if free < needed:
            return PrepackStatus("not written", f"{bundle}: {free / 1e9:.1f} GB free, a cache needs "
                                                f"{needed / 1e9:.1f} GB (weights x{SPACE_FACTOR} and a margin)")
        temp = bundle / f".{FOLDER}-writing-{os.getpid()}"
        shutil.rmtree(temp, ignore_errors=True)
        temp.mkdir()
        probe = temp / ".probe"  # mkdir can succeed where files cannot be written (e.g. a quota)
        probe.write_bytes(b"0")
        probe.unlink()
    except OSError as e:
        return PrepackStatus("not written", f"{bundle} is not writable ({e.strerror or e})")
    return Writer(bundle, temp, key)


def remove_stale(bundle: Path) -> None:
    """Temporary folders of writes that never finished (a killed process): never used, removed."""
    for path in bundle.glob(f".{FOLDER}-writing-*"):
        pid = path.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def remove(bundle: Path) -> None:
    shutil.rmtree(bundle / FOLDER, ignore_errors=True)


def disk_bytes(folder: Path) -> int:
    """Bytes the files take on disk (allocated blocks, where the platform reports them)."""
    total = 0
    for path in folder.iterdir():
        st = path.stat()
        total += st.st_blocks * 512 if hasattr(st, "st_blocks") else st.st_size
    return total



def load(mode: str, folder: Path, manifest: dict, model_file: Path, *, verify: str, cpu_only: bool,
         onnxruntime_version: str, options: Any, fresh_options: Callable[[], Any],
         open_graph: Callable[[Path, Any], Any], probe: Callable[[Any], Any]) -> tuple[Any, PrepackStatus]:
    """The session for `model_file` and what happened to the cache, as `mode` asks ("off", "use", "auto").

    `options` are the session's options (a cache's key includes their optimization level); `fresh_options()`
    makes another set (a retry without the cache's settings); `open_graph(path, options)` creates a session or
    raises BundleError; `probe(session)` runs a short fixed step and returns its logits. A cache written now
    is kept only if the mapped session answers the probe exactly as the one that repacked in memory (same
    kernels, same packed bytes: bit-identical logits). A cache never stops a bundle from loading."""
    status, cached, writer = _plan(mode, folder, manifest, model_file, verify, cpu_only, onnxruntime_version,
                                   int(options.graph_optimization_level))
    if writer is not None:
        writer.configure(options)
    if cached is not None:
        try:
            return open_graph(cached, options), status
        except ValueError as e:  # refused like any mismatch (a BundleError): the bundle itself still loads
            status, options = PrepackStatus("refused", str(e), cached.parent), fresh_options()
    try:
        session = open_graph(model_file, options)
    except ValueError as e:
        if writer is None:
            raise
        # onnxruntime may fail while saving (a full disk): the bundle must load without a cache
        writer.abandon(f"onnxruntime failed while writing it ({e})")
        return open_graph(model_file, fresh_options()), writer.status
    if writer is None:
        return session, status
    written = writer.finish()
    if written is None:
        return session, writer.status
    try:
        mapped = open_graph(written, fresh_options())
    except ValueError as e:
        remove(folder)
        return session, PrepackStatus("not written", f"the written cache did not load: {e}")
    expected = probe(session)
    if not np.array_equal(probe(mapped), expected):
        remove(folder)
        return session, PrepackStatus("not written", "the written cache's output differed from the bundle's "
                                      "(removed)")
    del session
    gc.collect()  # the repacked copy in memory goes; the mapped one serves
    return mapped, writer.status


def _plan(mode: str, folder: Path, manifest: dict, model_file: Path, verify: str, cpu_only: bool,
          onnxruntime_version: str, optimization_level: int) -> tuple[PrepackStatus, Path | None, Writer | None]:
    """(status so far, a valid cache's model file to load, or a Writer to make one while loading)."""
    if mode == "off":
        return PrepackStatus("off"), None, None
    if not cpu_only:
        return PrepackStatus("not written", "a cache is for onnxruntime's CPU provider only"), None, None
    key = cache_key(model_file, manifest, onnxruntime_version, f"graph_optimization_level={optimization_level}")
    writable = mode == "auto"
    if writable:
        remove_stale(folder)
    cached, refused = find(folder, key, verify)
    if cached is not None:
        return PrepackStatus("mapped", "", cached.parent, disk_bytes(cached.parent)), cached, None
    if not writable:
        return refused or PrepackStatus("not written", "prepack_cache='use' never writes one"), None, None
    data_bytes = sum(p.stat().st_size for p in folder.iterdir() if p.name.startswith(model_file.name)
                     and p != model_file)
    made = writer(folder, key, data_bytes)
    if isinstance(made, PrepackStatus):  # cannot write here: say so, and why any old one was refused
        if refused is not None:
            made = PrepackStatus("refused", f"{refused.reason}; not rewritten: {made.reason}", refused.folder)
        return made, None, None
    if refused is not None:
        made.status = PrepackStatus("not written", f"replacing a refused cache: {refused.reason}")
    return made.status, None, made
