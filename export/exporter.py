"""Checkpoint -> bundle: check everything cheap first, trace into a temporary folder, move into place.

A bundle is a folder: model.onnx + model.onnx.data, genai_config.json (onnxruntime-genai loads it),
the checkpoint's tokenizer and generation files, and manifest.json (what was exported, how, sizes and
sha256 of every file). A failed or interrupted export leaves any previous bundle at the target untouched.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .. import __version__
from ..device_bench import roofline
from ..quant.policy import POLICIES, Policy, get_policy
from ..runtime.bundle import MIN_ONNXRUNTIME, sampled_sha256, sha256
from ..runtime.files import install_folder
from .calibration import linear_hessians
from .checkpoint import BUNDLE_FILES, Checkpoint, CheckpointError, is_gguf, resolve
from .conversion import ConversionLog
from .genai_config import genai_config
from .graph import Graph
from .kernel_support import check_policy
from .kv_cache import DEFAULT_MARGIN, KV_CACHES, kv_cache_for
from .lfm2 import Lfm2Model
from .mobile import phone_extras
from .onnx_ops import ContribOps, PortableOps, WeightTransform
from .provenance import checkpoint_source
from .quant_ops import QuantizedOps, stored_in_blocks
from .random_tokenizer import NOTE, random_tokenizer_files
from .random_weights import RandomCheckpoint

if TYPE_CHECKING:
    from .gguf_checkpoint import GgufCheckpoint

OP_SETS = {"contrib": ContribOps, "portable": PortableOps}
QUANTS = tuple(POLICIES)
TARGETS = ("desktop", "android", "ios")
# Decode threads a target's runtime starts with (genai_config's session_options; LfmSession reads it too):
# phones decode fastest on their big cores only (4 on current Snapdragon/Dimensity/Tensor parts, Apple's 2
# performance cores); on a desktop onnxruntime's default, one thread per physical core, is right.
TARGET_THREADS = {"desktop": None, "android": 4, "ios": 2}
MODEL_FILE, DATA_FILE, MANIFEST = "model.onnx", "model.onnx.data", "manifest.json"
CHECKPOINT_FILES = BUNDLE_FILES


class ExportError(ValueError):
    """An export that cannot proceed; the message names the argument, file or tensor."""


@dataclass(frozen=True)
class ExportResult:
    bundle: Path
    seconds: float
    files: dict[str, int]


def export(checkpoint: str | Path | None, out: str | Path, *, ops: str = "contrib", quant: str | Policy = "fp32",
           target: str = "desktop", transform: WeightTransform | None = None, random_weights: str | None = None,
           eval_text: str | None = None, progress: Callable[[str], None] | None = None,
           tokenizer: str | Path | None = None, kv_cache: str = "fp32", kv_calibration_text: str | None = None,
           kv_margin: float = DEFAULT_MARGIN) -> ExportResult:
    """Export `checkpoint` to the bundle folder `out`. `quant` names a policy (quant/policy.py) or is one;
    `transform` rewrites each float weight as it is read (tests use it for fake quantization);
    `random_weights` (a preset of random_weights.py) replaces the checkpoint for benchmarks;
    `eval_text` adds a quantization quality report (quality.json/.md/.png) measured against fp32;
    `kv_cache` is the KV cache precision (kv_cache.py), its scales calibrated on `kv_calibration_text`.
    A `.gguf` checkpoint (or `org/name/file.gguf` on the hub) brings its own config and tokenizer, or takes
    the tokenizer from `tokenizer` (a tokenizer.json or its folder); conversion.json/.md say per tensor what
    its stored type became and at what error."""
    start = time.perf_counter()
    if target not in TARGETS:
        raise ExportError(f"--target {target!r}: expected one of {TARGETS}")
    if ops not in OP_SETS:
        raise ExportError(f"--ops {ops!r}: expected one of {sorted(OP_SETS)}")
    try:
        policy = quant if isinstance(quant, Policy) else get_policy(quant)
    except ValueError as e:
        raise ExportError(str(e)) from None
    quantized = any((policy.experts, policy.linears, policy.embedding))
    if quantized and ops != "contrib":
        raise ExportError(f"--quant {policy.name} needs --ops contrib (its kernels are onnxruntime contrib ops)")
    if quantized:
        try:  # before any tracing: the installed onnxruntime runs every kernel the policy needs
            check_policy(policy)
        except ValueError as e:
            raise ExportError(str(e)) from None
    if kv_cache not in KV_CACHES:
        raise ExportError(f"--kv-cache {kv_cache!r}: expected one of {KV_CACHES}")
    if kv_cache != "fp32" and ops != "contrib":
        raise ExportError(f"--kv-cache {kv_cache} needs --ops contrib: the quantized cache is GroupQueryAttention's "
                          "(com.microsoft); the portable op set has no standard op that attends over an int8 cache, "
                          "so it keeps --kv-cache fp32")
    out = Path(out)
    if random_weights:
        try:
            ckpt = RandomCheckpoint(random_weights)
        except ValueError as e:
            raise ExportError(str(e)) from None
        source = {"random_weights": random_weights}
    else:
        ckpt = open_checkpoint(checkpoint, tokenizer)
        source = checkpoint_source(checkpoint, ckpt.folder)
    model = Lfm2Model(ckpt.config)
    for w in model.weights():  # headers only: a missing or misshapen tensor fails before any tracing
        ckpt.check(w.name, w.shape)
    side_files = ckpt.files()
    if not random_weights and "tokenizer.json" not in side_files:
        raise CheckpointError(f"{ckpt.folder}: no tokenizer.json (the bundle needs the tokenizer)")
    try:
        kv = kv_cache_for(kv_cache, ckpt, kv_calibration_text, kv_margin)
    except ValueError as e:
        raise ExportError(str(e)) from None
    hessians, calibration = {}, None

    def calibrated(name: str) -> bool:  # GPTQ weights the checkpoint holds in floats
        return policy.calibrated(name) and not stored_in_blocks(ckpt, name)

    if quantized:
        hessians, calibration = linear_hessians(ckpt, calibrated, progress=progress or (lambda m: None))
    parent = _writable_parent(out)
    _recover_interrupted(out)

    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-{os.getpid()}-", dir=parent))
    try:
        graph = Graph(tmp / DATA_FILE)
        if quantized:
            backend = QuantizedOps(graph, ckpt, policy, transform=transform, progress=progress, kv_cache=kv,
                                   hessians=hessians)
        elif ops == "contrib":
            backend = ContribOps(graph, ckpt, transform=transform, progress=progress, kv_cache=kv)
        else:
            backend = PortableOps(graph, ckpt, transform=transform, progress=progress)
        backend.trace(model)
        graph.save(tmp / MODEL_FILE, producer=f"lfm-edge {__version__}",
                   metadata={"lfm_edge.ops": ops, "lfm_edge.quant": policy.name, "lfm_edge.kv_cache": kv.name})
        if random_weights:
            (tmp / "config.json").write_text(json.dumps(ckpt.raw_config, indent=2))
            # without a tokenizer no tool of ours could open the bundle (see random_tokenizer.py)
            for name, text in random_tokenizer_files(ckpt.raw_config).items():
                (tmp / name).write_text(text, encoding="utf-8")
        for name, data in side_files.items():
            (tmp / name).write_bytes(data)
        log = getattr(backend, "conversions", None) or ConversionLog(ckpt)
        named = source.get("hub_id") or source.get("name") or "checkpoint"  # never a local path (provenance.py)
        conversion = log.write(tmp, [w.name for w in model.weights()], named) if log.active else None
        config = genai_config(ckpt, share_buffer=backend.share_buffer)
        if TARGET_THREADS[target]:
            config["model"]["decoder"]["session_options"]["intra_op_num_threads"] = TARGET_THREADS[target]
        (tmp / "genai_config.json").write_text(json.dumps(config, indent=2))
        if eval_text and quantized and isinstance(ckpt, Checkpoint):  # needs a float checkpoint folder
            from ..quant.quality import measure_bundle, write_report

            write_report([measure_bundle(ckpt.folder, tmp, eval_text, policy.name)], tmp,
                         f"{policy.name} against fp32, {ckpt.folder.name}")
        extras = phone_extras(tmp, MODEL_FILE, DATA_FILE) if target in ("android", "ios") else {}
        if random_weights:
            extras["tokenizer"] = NOTE
        if conversion is not None:
            extras["conversion"] = conversion  # from a GGUF: how many tensors are the file's values exactly
        if calibration is not None:
            extras["gptq_calibration"] = calibration  # what the linears' GPTQ was calibrated on
        files = _write_manifest(tmp, ckpt, source=source, ops=ops, quant=policy.name, quant_policy=policy.describe(),
                                kv_cache=kv.describe(), target=target, **extras)
        install_folder(tmp, out)
    except OSError as e:  # a full disk, a quota, a file-size limit: nothing was replaced
        shutil.rmtree(tmp, ignore_errors=True)
        raise ExportError(f"--out {out}: writing the bundle failed ({e.strerror or e}); the previous bundle, if "
                          "any, is untouched") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ExportResult(out, time.perf_counter() - start, files)


def open_checkpoint(spec: str | Path, tokenizer: str | Path | None = None) -> Checkpoint | GgufCheckpoint:
    """A checkpoint folder or hub id, or a GGUF file (local, or `org/name/file.gguf` on the hub)."""
    if is_gguf(spec):  # gguf-py is imported only for GGUF input
        from .gguf_checkpoint import GgufCheckpoint, resolve_gguf

        return GgufCheckpoint(resolve_gguf(str(spec)), tokenizer=tokenizer)
    if tokenizer is not None:
        raise ExportError("--tokenizer is for GGUF files; a checkpoint folder brings its own tokenizer.json")
    return Checkpoint(resolve(spec))


def _recover_interrupted(out: Path) -> None:
    """Clean up after an export that was killed (SIGKILL leaves no chance to clean up): remove its partial
    folders, and if it died between the two renames of `install_folder`, put the previous bundle back."""
    for leftover in out.parent.glob(f".{out.name}.*-*"):
        kind, _, rest = leftover.name[len(out.name) + 2:].partition("-")
        pid = rest.split("-")[0]
        if kind not in ("partial", "old") or not pid.isdigit() or _alive(int(pid)):
            continue
        if kind == "old" and not out.exists():
            os.replace(leftover, out)
        else:
            shutil.rmtree(leftover, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _writable_parent(out: Path) -> Path:
    parent = out.resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ExportError(f"--out {out}: cannot create its parent folder ({e.strerror})") from None
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out}: exists and is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ExportError(f"--out {out}: the folder {parent} is not writable")
    return parent


def _installed(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _write_manifest(folder: Path, ckpt: Checkpoint | RandomCheckpoint, source: dict,
                    **settings) -> dict[str, int]:
    import onnx

    cfg = ckpt.config
    files = {p.name: {"bytes": p.stat().st_size, "sha256": sha256(p), "sampled_sha256": sampled_sha256(p)}
             for p in sorted(folder.iterdir())}
    manifest = {
        "format": "lfm-edge-bundle/1",
        "model_type": cfg.model_type,
        "source": source,  # never a local path: see provenance.py
        **settings,
        "model": MODEL_FILE,
        "layer_types": list(cfg.layer_types),
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_position_embeddings,
        # the roofline's input, so a phone without the onnx package can compute it (device_bench/roofline.py)
        roofline.MANIFEST_KEY: roofline.manifest_entry(roofline.graph_bytes_per_token(folder)),
        # the runtime refuses the bundle on an older onnxruntime (runtime/bundle.py check_onnxruntime)
        "requires": {"onnxruntime": MIN_ONNXRUNTIME},
        "versions": {"lfm_edge": __version__, "onnx": onnx.__version__, "onnxruntime": _installed("onnxruntime")},
        "files": files,
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return {name: info["bytes"] for name, info in files.items()}
