"""What a bundle folder must hold, checked without onnxruntime (a phone build may reach onnxruntime through
Java or Objective-C instead of its Python binding, see runtime/backends).

Every field a runtime reads from a bundle is checked here, so a bad bundle is one BundleError naming the file
and the field rather than a traceback from deep inside a generation.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .files import describe, read_text
from .sampling import Sampling

# The oldest onnxruntime the bundles and the runtime are tested with; pyproject.toml's floor says the same
# (tests/test_bundle_version.py holds them together). Exports record it in manifest.json's "requires".
MIN_ONNXRUNTIME = "1.32"


class BundleError(ValueError):
    """A bundle that cannot be loaded; the message names the file (and the field)."""


@dataclass(frozen=True)
class StateSpec:
    """What the graph's inputs say about its state: layer index -> kind and fixed dims."""

    conv: dict[int, tuple[int, int]]  # layer -> (H, K-1)
    kv: dict[int, tuple[int, int]]  # layer -> (Hkv, D)


@dataclass(frozen=True)
class TokenBytes:
    """Bytes a decoded token reads (export/footprint.py computes them; manifest.json's `bytes_per_token` holds
    them): the total, by kind of weight, and the bytes of all weights stored."""

    total: float
    by_kind: dict[str, float]
    stored: int


def token_bytes(folder: str | Path) -> TokenBytes | None:
    """What the exporter recorded in manifest.json's `bytes_per_token`; None when there is none, when it is
    malformed, or when the graph file is no longer the one the manifest describes (another size)."""
    folder = Path(folder)
    try:
        manifest = json.loads(read_text(folder / "manifest.json", MAX_JSON_BYTES))
        entry, model = manifest["bytes_per_token"], manifest.get("model", "model.onnx")
        listed = manifest.get("files", {}).get(model, {}).get("bytes")
        if listed is not None and (folder / model).stat().st_size != listed:
            return None
        total, stored = entry["total"], entry["stored"]
        by_kind = {str(k): float(v) for k, v in entry["by_kind"].items()}
        if not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x >= 0
                   for x in (total, stored, *by_kind.values())):
            return None
        return TokenBytes(total, by_kind, int(stored))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


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

    @property
    def threads(self) -> int | None:
        """The decode threads the bundle's target starts with (session_options.intra_op_num_threads, written
        from export/options.py TARGET_THREADS); None where the bundle leaves it to the runtime."""
        return int(self.decoder.get("session_options", {}).get("intra_op_num_threads", 0)) or None


VERIFY_MODES = ("none", "size", "sampled", "sha256")


class UnverifiedBundle(UserWarning):
    """A bundle loaded without a manifest.json: nothing says its files are the ones an export wrote."""


def verify_bundle(folder: Path, mode: str = "sampled") -> dict:
    """Check the files manifest.json lists: "size" (sizes only), "sampled" (sizes and a hash of 64 spread
    64 KiB samples of each file: milliseconds, catches a file from another export or a torn download),
    "sha256" (every byte), or "none". Bundles without a manifest, e.g. from onnxruntime-genai's builder, are
    accepted as they are, with an UnverifiedBundle warning. Returns the manifest."""
    if mode not in VERIFY_MODES:
        raise ValueError(f"verify {mode!r}: expected one of {VERIFY_MODES}")
    path = folder / "manifest.json"
    if not path.is_file():
        if mode != "none":
            warnings.warn(f"{folder}: no manifest.json, so its files cannot be verified (lfm-export writes one; "
                          "a bundle from another builder, e.g. onnxruntime-genai's, has none)", UnverifiedBundle,
                          stacklevel=2)
        return {}
    manifest = read_object(path)
    files = _files(path, manifest.get("files", {}))
    if mode == "none":
        return manifest
    for name, info in files.items():
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


MAX_JSON_BYTES = 64 << 20  # a bundle's JSON files are kilobytes; anything past this is not one of them


def read_json(path: Path) -> Any:
    try:
        return json.loads(read_text(path, MAX_JSON_BYTES))
    except FileNotFoundError:
        raise BundleError(f"{path}: missing (is this a bundle folder?)") from None
    except OSError as e:  # a FIFO, a device, a folder, too large: refused before a byte is read
        raise BundleError(f"{path}: cannot read it ({describe(e)})") from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise BundleError(f"{path}: unreadable ({e})") from None


def read_object(path: Path) -> dict:
    """A JSON file that must hold an object (every bundle JSON file does)."""
    return _object(path, "the file", read_json(path))


# --- field checks: each names the file and the field ---------------------------------------------------------


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), type(value).__name__)


def _object(path: Path, field: str, value: Any) -> dict:
    if not isinstance(value, dict):
        shown = f" ({value!r:.60})" if value is not None else ""
        raise BundleError(f"{path}: {field} must be a JSON object, found {_kind(value)}{shown}")
    return value


def _int(path: Path, field: str, value: Any, minimum: int = 0) -> int:
    # bool is an int in Python, and "1" is not a number in JSON: both mean a broken file
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise BundleError(f"{path}: {field} must be an integer >= {minimum}, found {value!r:.60}")
    return value


def _number(path: Path, field: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise BundleError(f"{path}: {field} must be a number, found {value!r:.60}")
    return float(value)


def _bool(path: Path, field: str, value: Any) -> bool:
    if not isinstance(value, bool):  # bool("false") is True: a string here would silently flip the setting
        raise BundleError(f"{path}: {field} must be true or false, found {value!r:.60}")
    return value


def _inside(path: Path, field: str, name: Any) -> str:
    """A file name the bundle refers to: relative and inside the folder (never `../x` or `/etc/x`)."""
    if not isinstance(name, str) or not name or Path(name).is_absolute() or ".." in Path(name).parts:
        raise BundleError(f"{path}: {field} must name a file inside the bundle, found {name!r:.60}")
    return name


def _files(path: Path, files: Any) -> dict[str, dict]:
    for name, info in _object(path, "files", files).items():
        _inside(path, f"files[{name!r}]", name)
        _object(path, f"files[{name!r}]", info)
        _int(path, f"files[{name!r}].bytes", info.get("bytes"))
        for key in ("sha256", "sampled_sha256"):
            if key in info and not (isinstance(info[key], str) and re.fullmatch(r"[0-9a-f]{64}", info[key])):
                raise BundleError(f"{path}: files[{name!r}].{key} must be 64 hex digits, found {info[key]!r:.60}")
    return files


def _version(text: str) -> tuple[int, ...]:
    match = re.match(r"\d+(\.\d+)*", text)
    return tuple(int(part) for part in match.group(0).split(".")) if match else ()


def check_onnxruntime(manifest: dict, installed: str, folder: Path) -> None:
    """Refuse a bundle whose manifest asks for a newer onnxruntime than `installed` (its graph may use ops or
    attributes an older one rejects, or worse, runs differently)."""
    path = folder / "manifest.json"
    requires = _object(path, "requires", manifest.get("requires", {}))
    needed = requires.get("onnxruntime")
    if needed is None:
        return
    if not isinstance(needed, str) or not _version(needed):
        raise BundleError(f"{path}: requires.onnxruntime must be a version such as \"1.32\", found {needed!r:.60}")
    if _version(installed) < _version(needed):
        raise BundleError(f"{folder}: needs onnxruntime >= {needed} (manifest.json requires.onnxruntime), "
                          f"this is onnxruntime {installed}; upgrade it: pip install 'onnxruntime>={needed}'")


def read_bundle(folder: str | Path, verify: str = "sampled", onnxruntime_version: str | None = None
                ) -> BundleConfig:
    """genai_config.json and manifest.json of `folder`, the files checked as `verify` says (verify_bundle):
    what every backend reads before it touches a runtime. `onnxruntime_version`: the runtime's version, checked
    against the manifest's requires.onnxruntime."""
    folder = Path(folder)
    if not folder.is_dir():
        raise BundleError(f"{folder}: not a bundle folder")
    manifest = verify_bundle(folder, verify)
    if onnxruntime_version is not None:
        check_onnxruntime(manifest, onnxruntime_version, folder)
    path = folder / "genai_config.json"
    genai = read_object(path)
    model = _object(path, "model", genai.get("model", {}))
    decoder = _object(path, "model.decoder", model.get("decoder", {}))
    model_file = folder / _inside(path, "model.decoder.filename", decoder.get("filename", "model.onnx"))
    if not model_file.is_file():
        raise BundleError(f"{model_file}: missing (genai_config.json names it as the model)")
    for key in ("head_size", "hidden_size", "num_key_value_heads", "conv_cache_size"):
        if key in decoder:  # state dims where the graph leaves them symbolic (state_spec, plan.py)
            _int(path, f"model.decoder.{key}", decoder[key], minimum=1)
    if "layer_types" in decoder and not (isinstance(decoder["layer_types"], list)
                                         and all(isinstance(k, str) for k in decoder["layer_types"])):
        raise BundleError(f"{path}: model.decoder.layer_types must be a list of strings")
    options = _object(path, "model.decoder.session_options", decoder.get("session_options", {}))
    if "intra_op_num_threads" in options:
        _int(path, "model.decoder.session_options.intra_op_num_threads", options["intra_op_num_threads"])
    search = _object(path, "search", genai.get("search", {}))
    eos = model.get("eos_token_id", [])
    eos_ids = eos if isinstance(eos, list) else [eos]
    return BundleConfig(
        folder=folder, manifest=manifest, model_file=model_file, decoder=decoder,
        share_buffer=_bool(path, "search.past_present_share_buffer", search.get("past_present_share_buffer", False)),
        # a generation needs room for its prompt and at least one new token
        context_length=_int(path, "model.context_length", model.get("context_length", 4096), minimum=2),
        eos_token_ids=tuple(_int(path, "model.eos_token_id", e) for e in eos_ids),
        pad_token_id=_int(path, "model.pad_token_id", model.get("pad_token_id", 0)),
        vocab_size=_int(path, "model.vocab_size", model["vocab_size"], minimum=1) if "vocab_size" in model else None)


# generation_config.json fields the runtime reads (Sampling.from_generation_config) and what they must be
_GENERATION_NUMBERS = ("temperature", "top_p", "min_p", "repetition_penalty")
_GENERATION_INTS = ("top_k", "seed")


def read_generation_config(folder: str | Path) -> dict:
    """The checkpoint's sampling defaults (generation_config.json, optional), checked field by field."""

    path = Path(folder) / "generation_config.json"
    if not path.is_file():
        return {}
    config = read_object(path)
    for key in _GENERATION_NUMBERS + _GENERATION_INTS + ("do_sample",):
        value = config.get(key)
        if value is None:
            continue
        if key == "do_sample":
            _bool(path, key, value)
        elif key in _GENERATION_INTS:
            _int(path, key, value)
        else:
            _number(path, key, value)
    try:
        Sampling.from_generation_config(config)
    except ValueError as e:  # a value out of range, e.g. "top_p 1.5: expected 0 < top_p <= 1"
        raise BundleError(f"{path}: {e}") from None
    return config


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
    genai = read_object(folder / "genai_config.json")
    name = genai.get("model", {}).get("decoder", {}).get("filename", "model.onnx")
    h = hashlib.sha256()
    for path in sorted(p for p in folder.iterdir() if p.name.startswith(name) and p.is_file()):
        h.update(f"{path.name}:{sampled_sha256(path)};".encode())
    return h.hexdigest()
