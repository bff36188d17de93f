"""Checkpoint -> bundle: check everything cheap first, trace into a temporary folder, move into place.

A bundle is a folder: model.onnx + model.onnx.data, genai_config.json (onnxruntime-genai loads it),
the checkpoint's tokenizer and generation files, and manifest.json (what was exported, how, sizes and
sha256 of every file). A failed or interrupted export leaves any previous bundle at the target untouched.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import __version__
from ..quant.policy import Policy
from ..runtime.bundle import MIN_ONNXRUNTIME, sampled_sha256, sha256
from ..runtime.files import alive, install_folder
from . import footprint, quality
from .calibration import LayerHessians
from .checkpoint import BUNDLE_FILES, Checkpoint, CheckpointError, is_gguf, resolve
from .conversion import ConversionLog
from .genai_config import genai_config
from .graph import Graph
from .kv_cache import kv_cache_for
from .lfm2 import Lfm2Model
from .mobile import phone_extras
from .onnx_ops import ContribOps, PortableOps
from .options import GGUF_LAYOUTS, TARGET_THREADS, ExportError, ExportOptions
from .provenance import checkpoint_source
from .quant_ops import QuantizedOps, relaid, stored_in_blocks
from .random_tokenizer import NOTE, random_tokenizer_files
from .random_weights import RandomCheckpoint
from .template_check import check_template

if TYPE_CHECKING:
    from .gguf_checkpoint import GgufCheckpoint

OPS_BACKENDS = {"contrib": ContribOps, "portable": PortableOps}
MODEL_FILE, DATA_FILE, MANIFEST = "model.onnx", "model.onnx.data", "manifest.json"
BUNDLE_FORMAT = "lfm-edge-bundle/1"
CHECKPOINT_FILES = BUNDLE_FILES


@dataclass(frozen=True)
class ExportResult:
    bundle: Path
    seconds: float
    files: dict[str, int]
    warnings: list[str] = field(default_factory=list)  # what a user must know (e.g. a replaced chat template)


def export(checkpoint: str | Path | None, out: str | Path, options: ExportOptions | None = None,
           **settings: Any) -> ExportResult:
    """Export `checkpoint` to the bundle folder `out`, as `options` (options.py) say; keyword `settings` are
    ExportOptions fields (`export(ckpt, out, quant="int4", target="android")`) and override `options`.
    A `.gguf` checkpoint (or `org/name/file.gguf` on the hub) brings its own config and tokenizer, or takes
    the tokenizer from `tokenizer` (a tokenizer.json or its folder); conversion.json/.md say per tensor what its
    stored type became and at what error. `out` must be new, empty, or an earlier lfm-edge bundle (replaced
    whole at the end), unless `force`."""
    start = time.perf_counter()
    options = dataclasses.replace(options or ExportOptions(), **settings)
    out = Path(out)
    _check_out(out, options.force)
    if options.random_weights:
        try:
            ckpt = RandomCheckpoint(options.random_weights)
        except ValueError as e:
            raise ExportError(str(e)) from None
        source = {"random_weights": options.random_weights}
    else:
        ckpt = open_checkpoint(checkpoint, options.tokenizer)
        source = checkpoint_source(checkpoint, ckpt.folder)
    options = options.resolved(quantized_gguf=not options.random_weights and is_gguf(checkpoint) and ckpt.is_quantized)
    policy, progress = options.policy, options.progress
    model = Lfm2Model(ckpt.config)
    for w in model.weights():  # headers only: a missing or misshapen tensor fails before any tracing
        ckpt.check(w.name, w.shape)
    side_files = ckpt.files()
    if not options.random_weights and "tokenizer.json" not in side_files:
        raise CheckpointError(f"{ckpt.folder}: no tokenizer.json (the bundle needs the tokenizer)")
    try:
        kv = kv_cache_for(options.kv_cache, ckpt, options.kv_calibration_text, options.kv_margin)
    except ValueError as e:
        raise ExportError(str(e)) from None
    hessians, calibration = None, None

    relayout = frozenset(GGUF_LAYOUTS[options.gguf_layout]) if options.gguf_layout else frozenset()

    def calibrated(name: str) -> bool:  # GPTQ weights the checkpoint holds in floats, or re-laid from its blocks
        return policy.calibrated(name) and (relaid(ckpt, policy, relayout, name) or not stored_in_blocks(ckpt, name))

    if options.quantized:  # computed a layer at a time as the trace reaches each layer (calibration.py)
        hessians = LayerHessians(ckpt, calibrated, tokens=options.calibration_tokens,
                                 progress=progress or (lambda m: None))
        calibration = hessians.source
    parent = _writable_parent(out)
    _recover_interrupted(out)

    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-{os.getpid()}-", dir=parent))
    try:
        graph = Graph(tmp / DATA_FILE)
        if options.quantized:
            backend = QuantizedOps(graph, ckpt, policy, transform=options.transform, progress=progress, kv_cache=kv,
                                   hessians=hessians, relayout=relayout, vocabulary_rows=options.vocabulary_rows)
        else:
            backend = OPS_BACKENDS[options.ops](graph, ckpt, transform=options.transform, progress=progress,
                                           **({"kv_cache": kv} if options.ops == "contrib" else {}))
        backend.trace(model)
        # a GGUF's blocks kept as they are: the policy chose none of their layouts, so its name is not the quant's
        quant_name = policy.name if options.gguf_layout in (None, "fast") else f"gguf-{options.gguf_layout}"
        graph.save(tmp / MODEL_FILE, producer=f"lfm-edge {__version__}",
                   metadata={"lfm_edge.ops": options.ops, "lfm_edge.quant": quant_name, "lfm_edge.kv_cache": kv.name})
        if options.random_weights:
            (tmp / "config.json").write_text(json.dumps(ckpt.raw_config, indent=2))
            # without a tokenizer no tool of ours could open the bundle (see random_tokenizer.py)
            for name, text in random_tokenizer_files(ckpt.raw_config).items():
                (tmp / name).write_text(text, encoding="utf-8")
        for name, data in side_files.items():
            (tmp / name).write_bytes(data)
        template = check_template(tmp)  # code from a download: checked in the sandbox, or replaced (said so)
        warnings = [f"the chat template was replaced by LFM2's ChatML layout: {template['reason']}"] \
            if template["source"] == "fallback" else []
        config = genai_config(ckpt, share_buffer=backend.share_buffer)
        if TARGET_THREADS[options.target]:
            config["model"]["decoder"]["session_options"]["intra_op_num_threads"] = TARGET_THREADS[options.target]
        (tmp / "genai_config.json").write_text(json.dumps(config, indent=2))
        log = getattr(backend, "conversions", None) or ConversionLog(ckpt)
        named = source.get("hub_id") or source.get("name") or "checkpoint"  # never a local path (provenance.py)
        against_exact = None
        if relayout and options.eval_text:  # what re-laying costs, against the file's blocks exactly
            against_exact = _against_exact(checkpoint, tmp, options, parent)
        conversion = log.write(tmp, [w.name for w in model.weights()], named, layout=options.gguf_layout,
                               against_exact=against_exact) if log.active else None
        if options.eval_text and options.quantized and isinstance(ckpt, Checkpoint):  # against a float checkpoint
            _quality_report(checkpoint, tmp, options.eval_text, options.eval_text_name, policy, parent)
        extras = phone_extras(tmp, MODEL_FILE, DATA_FILE) if options.target in ("android", "ios") else {}
        if options.random_weights:
            extras["tokenizer"] = NOTE
        if conversion is not None:
            extras["conversion"] = conversion  # from a GGUF: how many tensors are the file's values exactly
        if options.gguf_layout is not None:
            extras["gguf_layout"] = options.gguf_layout
        written = getattr(backend, "written", None)
        if written:  # each part's layout as the graph holds it, whatever the policy asked
            extras["layout"] = {part: sorted(kinds) for part, kinds in sorted(written.items())}
        if calibration is not None:
            extras["gptq_calibration"] = calibration  # what the linears' GPTQ was calibrated on
        rescored = policy.rescore is not None and "vocabulary (rescoring copy)" in (written or {})
        rescore_top = policy.rescore.top if rescored else 0
        files = _write_manifest(tmp, ckpt, source=source, ops=options.ops, quant=quant_name,
                                quant_policy=_applied(policy, options.gguf_layout, relayout), kv_cache=kv.describe(),
                                target=options.target, rescore_top=rescore_top, chat_template=template, **extras)
        install_folder(tmp, out)
    except OSError as e:  # a full disk, a quota, a file-size limit: nothing was replaced
        shutil.rmtree(tmp, ignore_errors=True)
        raise ExportError(f"--out {out}: writing the bundle failed ({e.strerror or e}); the previous bundle, if "
                          "any, is untouched") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ExportResult(out, time.perf_counter() - start, files, warnings)


def _quality_report(checkpoint: str | Path, bundle: Path, text: str, text_name: str | None, policy: Policy,
                    parent: Path) -> None:
    """quality.json/.md/.png in `bundle`: it against an fp32 export of the same checkpoint (made beside it)."""
    work = Path(tempfile.mkdtemp(prefix=".lfm-quality-", dir=parent))
    try:
        reference = export(checkpoint, work / "fp32").bundle
        result = quality.measure(reference, bundle, text, policy.name, policy)
        quality.write_report([result], bundle, f"{policy.name} against fp32, {Path(str(checkpoint)).name}",
                             quality.describe_text(text_name or "the --eval-text", text))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _applied(policy: Policy, gguf_layout: str | None, relayout: frozenset[str]) -> dict[str, Any] | None:
    """The policy as far as it decided the layout: over a GGUF's blocks kept as they are it chose nothing, and the
    manifest must not say it did."""
    if gguf_layout is None:
        return policy.describe()
    if not relayout:
        return None
    applied = policy.describe()
    for kept, key in (("experts", "experts"), ("linears", "linears"), ("vocabulary", "embedding")):
        if kept not in relayout:
            applied[key] = "the file's blocks"
    if "vocabulary" not in relayout:
        applied["rescore"] = None
    return applied


def _against_exact(checkpoint: str | Path, bundle: Path, options: ExportOptions, parent: Path) -> dict[str, Any]:
    """KL(the file's blocks exactly || `bundle`) on the eval text: `bundle` re-laid (`--gguf-layout fast`) against
    an export of the same GGUF in `exact` layout (made beside it), which computes what llama.cpp computes on the
    file (device_bench/README.md, "GGUF in")."""
    work = Path(tempfile.mkdtemp(prefix=".lfm-exact-", dir=parent))
    try:
        exact = export(checkpoint, work / "exact", dataclasses.replace(
            options, gguf_layout="exact", eval_text=None, progress=None, force=False)).bundle
        windows = quality.token_windows(exact / "tokenizer.json", options.eval_text, quality.WINDOW,
                                        quality.MAX_TOKENS)
        if not windows:
            raise ExportError("--eval-text: too short to measure on (it needs at least two tokens)")
        result = quality.compare(quality.window_logits(exact, windows), quality.window_logits(bundle, windows),
                                 windows)
        return {"kl": result["kl"], "top1": result["top1"], "tokens": result["tokens"],
                "text": quality.describe_text(options.eval_text_name or "the --eval-text", options.eval_text)}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _check_out(out: Path, force: bool) -> None:
    """`--out` may be new, an empty folder, or an lfm-edge bundle (its manifest says so): anything else would be
    deleted when the new bundle takes its place, so it is refused unless `force`."""
    if force or not out.is_dir():
        return
    try:
        names = sorted(p.name for p in out.iterdir())
    except OSError as e:
        raise ExportError(f"--out {out}: cannot read the folder ({e.strerror or e})") from None
    if not names:
        return
    try:
        manifest = json.loads((out / MANIFEST).read_text())
        if isinstance(manifest, dict) and str(manifest.get("format", "")).startswith("lfm-edge-bundle/"):
            return
    except (OSError, ValueError):
        pass
    shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
    raise ExportError(f"--out {out}: the folder holds files that are not an lfm-edge bundle ({shown}); exporting "
                      "there would replace them. Choose a new or empty folder, or pass --force to replace it")


def open_checkpoint(spec: str | Path, tokenizer: str | Path | None = None) -> Checkpoint | GgufCheckpoint:
    """A checkpoint folder or hub id, or a GGUF file (local, or `org/name/file.gguf` on the hub)."""
    if is_gguf(spec):  # gguf-py is imported only for GGUF input
        from .gguf_checkpoint import GgufCheckpoint, resolve_gguf  # gguf-py, for GGUF input only

        return GgufCheckpoint(resolve_gguf(str(spec)), tokenizer=tokenizer)
    if tokenizer is not None:
        raise ExportError("--tokenizer is for GGUF files; a checkpoint folder brings its own tokenizer.json")
    if spec is None:
        raise ExportError("no checkpoint: give a checkpoint folder, hub id or .gguf file (or random_weights)")
    return Checkpoint(resolve(spec))


def _recover_interrupted(out: Path) -> None:
    """Clean up after an export that was killed (SIGKILL leaves no chance to clean up): remove its partial
    folders, and if it died between the two renames of `install_folder`, put the previous bundle back."""
    for leftover in out.parent.glob(f".{out.name}.*-*"):
        kind, _, rest = leftover.name[len(out.name) + 2:].partition("-")
        pid = rest.split("-")[0]
        if kind not in ("partial", "old") or not pid.isdigit() or alive(int(pid)):
            continue
        if kind == "old" and not out.exists():
            os.replace(leftover, out)
        else:
            shutil.rmtree(leftover, ignore_errors=True)


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


def _write_manifest(folder: Path, ckpt: Checkpoint | RandomCheckpoint, source: dict, rescore_top: int,
                    **settings: Any) -> dict[str, int]:
    import onnx

    cfg = ckpt.config
    files = {p.name: {"bytes": p.stat().st_size, "sha256": sha256(p), "sampled_sha256": sampled_sha256(p)}
             for p in sorted(folder.iterdir())}
    manifest = {
        "format": BUNDLE_FORMAT,
        "model_type": cfg.model_type,
        "source": source,  # never a local path: see provenance.py
        **settings,
        "model": MODEL_FILE,
        "layer_types": list(cfg.layer_types),
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_position_embeddings,
        # the roofline's input, computed once here (footprint.py) and read by everyone from here (runtime/bundle.py)
        "bytes_per_token": asdict(footprint.bytes_per_token(folder, rescore_top)),
        # the runtime refuses the bundle on an older onnxruntime (runtime/bundle.py check_onnxruntime)
        "requires": {"onnxruntime": MIN_ONNXRUNTIME},
        "versions": {"lfm_edge": __version__, "onnx": onnx.__version__, "onnxruntime": _installed("onnxruntime")},
        "files": files,
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return {name: info["bytes"] for name, info in files.items()} | {MANIFEST: (folder / MANIFEST).stat().st_size}
