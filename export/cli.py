"""`lfm-export`: a checkpoint folder, hub id or llama.cpp GGUF file -> an ONNX bundle."""

from __future__ import annotations

import argparse
import re
import shutil
import sys
from pathlib import Path
from typing import TextIO

from ..quant.blocks import METHODS
from ..quant.policy import POLICIES, get_policy
from ..runtime.files import describe, read_text
from ..runtime.memory import children_peak_rss_mb, peak_rss_mb
from .calibration import GPTQ_TOKENS
from .checkpoint import CheckpointError, is_gguf
from .config import ConfigError
from .exporter import export
from .kv_cache import DEFAULT_MARGIN, KV_CACHES
from .options import GGUF_LAYOUTS, OP_SETS, TARGET_QUANT, TARGETS, ExportError, ExportOptions

MAX_TEXT_BYTES = 256 << 20  # --eval-text / --kv-calibration: text, not a disk image


def demo_model_path() -> Path:
    """The small LFM2-MoE the project trains and ships (see demo_model/README.md)."""
    from importlib.resources import files

    return Path(str(files("lfm_edge.demo_model")))


class Progress:
    """Tensor-by-tensor progress on stderr. A terminal gets one line redrawn in place; a pipe or a file (CI, a
    log, an app reading the output) gets one plain line per stage (the embedding, each layer, the final norm),
    since carriage returns there pile up as one unreadable line."""

    _LAYER = re.compile(r"\blayers\.(\d+)\.")

    def __init__(self, stream: TextIO, quiet: bool = False):
        self.stream, self.quiet = stream, quiet
        self.tty = stream.isatty()
        self.count = 0
        self.stage: str | None = None

    def __call__(self, tensor: str) -> None:
        self.count += 1
        if self.quiet:
            return
        if self.tty:
            width = max(20, shutil.get_terminal_size().columns - 10)  # never wider than the terminal: no wrap
            print(f"\r  [{self.count:4d}] {tensor[:width]:<{width}}", end="", file=self.stream, flush=True)
            return
        match = self._LAYER.search(tensor)
        stage = f"layer {match.group(1)}" if match else tensor.removesuffix(".T").removesuffix(".weight")
        if stage != self.stage:
            self.stage = stage
            print(f"  [{self.count:4d}] {stage}", file=self.stream, flush=True)

    def end(self) -> None:
        """Finish the redrawn line, if there is one, so what follows starts on a line of its own."""
        if self.tty and self.count and not self.quiet:
            print(file=self.stream, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lfm-export", description=__doc__)
    parser.add_argument("checkpoint", nargs="?", help="checkpoint folder or hub id, or a .gguf file (local, or "
                        "org/name/file.gguf on the hub) (default: the bundled demo model)")
    parser.add_argument("--out", default=None, help="bundle folder to write (default: build/<checkpoint name>); "
                        "it must be new, empty or an earlier lfm-edge bundle (replaced whole at the end)")
    parser.add_argument("--force", action="store_true", help="replace --out even when it holds other files")
    parser.add_argument("--ops", choices=OP_SETS, default="contrib",
                        help="contrib: onnxruntime's fused CPU kernels; portable: standard ONNX ops only")
    parser.add_argument("--target", choices=TARGETS, default="desktop",
                        help="where the bundle runs; sets the default --quant (phones: int4) and --kv-cache")
    parser.add_argument("--quant", choices=sorted(POLICIES), default=None,
                        help="quantization policy (quant/policy.py; default by --target, int4 for a quantized "
                        "GGUF); int4 needs --ops contrib")
    parser.add_argument("--block-size", type=int, choices=(16, 32, 64, 128, 256), default=None,
                        help="override the policy's block size")
    parser.add_argument("--quant-method", choices=METHODS, default=None,
                        help="rtn (symmetric), rtn-asym, mse (clipping searched per block), or gptq (mse's grid, "
                             "the linears' codes by error feedback from calibration text; experts and vocabulary "
                             "take mse)")
    parser.add_argument("--calibration-tokens", type=int, default=GPTQ_TOKENS,
                        help=f"tokens of calibration text GPTQ reads (default {GPTQ_TOKENS}; fewer: a faster export, "
                             "a noisier estimate of each linear's inputs)")
    parser.add_argument("--accuracy-level", type=int, choices=(0, 1, 2, 3, 4), default=None,
                        help="MatMulNBits/QMoE activation precision: 4 = int8 (fastest), 0 = fp32")
    parser.add_argument("--kv-cache", choices=KV_CACHES, default=None,
                        help="KV cache precision (default by --target: desktop fp32, phones int8); int8/int4 need "
                             "--ops contrib")
    parser.add_argument("--kv-margin", type=float, default=DEFAULT_MARGIN,
                        help="int8/int4 cache: scale = calibrated max x this margin / qmax")
    parser.add_argument("--kv-calibration", metavar="FILE", default=None,
                        help="int8/int4 cache: text to calibrate the scales on (default: CPython's documentation "
                             "topics, without the demo model's held-out ones)")
    parser.add_argument("--random-weights", metavar="PRESET[:LAYERS]", default=None,
                        help="random weights of a real geometry instead of a checkpoint: lfm2.5-8b-a1b, "
                             "lfm2-8b-a1b or the dense lfm2-1.2b (:LAYERS keeps the first LAYERS layers; the first "
                             "two are conv layers with a dense FFN, so keep at least 3 for an attention layer and an "
                             "MoE one)")
    parser.add_argument("--eval-text", metavar="FILE", default=None,
                        help="held-out text: measure the quantized bundle against fp32 (quality.md in the bundle); "
                             "the demo model uses its own heldout.txt")
    parser.add_argument("--tokenizer", metavar="PATH", default=None,
                        help="for a GGUF without usable tokenizer metadata: the model's tokenizer.json (or its folder)")
    parser.add_argument("--gguf-layout", choices=tuple(GGUF_LAYOUTS), default=None,
                        help="a quantized GGUF's weights: exact keeps the file's blocks (the values llama.cpp "
                             "computes with); fast re-quantizes them into the policy's layout from the file's values "
                             "(wider blocks, a rescored int4 head; error and KL in the bundle's conversion.md, "
                             "with --eval-text); head and experts re-lay only those parts. Default by --target: "
                             "phones experts, desktop exact")
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    args = parser.parse_args(argv)
    checkpoint = args.checkpoint
    try:
        if checkpoint is not None and is_gguf(checkpoint) and not args.random_weights:
            from .gguf_checkpoint import resolve_gguf  # gguf-py: imported for GGUF input only

            checkpoint = resolve_gguf(checkpoint)
    except (CheckpointError, OSError) as e:
        print(f"lfm-export: error: {e}", file=sys.stderr)
        return 2
    if args.random_weights:
        checkpoint = None
        name = "random-" + args.random_weights.replace(":", "-")
    elif checkpoint is None:
        checkpoint = demo_model_path()
        print(f"No checkpoint given: exporting the bundled demo model ({checkpoint}).")
        if args.eval_text is None and (args.quant or TARGET_QUANT[args.target]) != "fp32":
            args.eval_text = str(checkpoint / "heldout.txt")
    if checkpoint is not None:
        name = Path(str(checkpoint).rstrip("/")).name or "model"
        name = name[:-len(".gguf")] if is_gguf(name) else name
    quant_name = args.quant or ("int4" if checkpoint is not None and is_gguf(checkpoint) else TARGET_QUANT[args.target])
    out = Path(args.out) if args.out else Path("build") / f"{name}-{quant_name}-{args.ops}"

    progress = Progress(sys.stderr, args.quiet)
    try:
        overrides = (args.block_size, args.quant_method, args.accuracy_level)
        quant = get_policy(quant_name).with_overrides(*overrides) \
            if args.quant or any(o is not None for o in overrides) else None
        options = ExportOptions(
            ops=args.ops, quant=quant, target=args.target, kv_cache=args.kv_cache, kv_margin=args.kv_margin,
            calibration_tokens=args.calibration_tokens,
            kv_calibration_text=_text("--kv-calibration", args.kv_calibration),
            eval_text=_text("--eval-text", args.eval_text),
            eval_text_name=Path(args.eval_text).name if args.eval_text else None, tokenizer=args.tokenizer,
            random_weights=args.random_weights, progress=progress, force=args.force, gguf_layout=args.gguf_layout)
        result = export(checkpoint, out, options)
    except (ExportError, CheckpointError, ConfigError, ValueError, OSError) as e:
        progress.end()
        print(f"lfm-export: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        progress.end()
        print(f"lfm-export: interrupted; {out} is as it was before", file=sys.stderr)
        return 130
    progress.end()
    for warning in result.warnings:
        print(f"lfm-export: warning: {warning}", file=sys.stderr)
    size = sum(result.files.values())
    # this process's peak and, for a phone target, the largest child's: onnxruntime's mobile checker and
    # ORT-format converter run in processes of their own and load the whole model (both in MiB)
    children = children_peak_rss_mb() / 1024
    child = f" (the largest child process, onnxruntime's tools: {children:.2f} GiB)" if children >= 0.01 else ""
    print(f"Wrote {result.bundle} ({size / 1e6:.1f} MB, {len(result.files)} files) in {result.seconds:.2f} s; "
          f"peak memory {peak_rss_mb() / 1024:.2f} GiB{child}.")
    return 0


def _text(option: str, path: str | None) -> str | None:
    """The text of a file an option names; ExportError names the option and the file."""
    if path is None:
        return None
    try:
        return read_text(path, MAX_TEXT_BYTES)
    except FileNotFoundError:
        raise ExportError(f"{option} {path}: no such file") from None
    except OSError as e:
        raise ExportError(f"{option} {path}: cannot read it ({describe(e)})") from None
    except UnicodeDecodeError:
        raise ExportError(f"{option} {path}: not UTF-8 text") from None


if __name__ == "__main__":
    sys.exit(main())
