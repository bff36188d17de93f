"""Ours against onnxruntime-genai's own LFM2-MoE export of the same checkpoint (issue 28, item 4).

One checkpoint (`--random-weights lfm2.5-8b-a1b:LAYERS`: written once as safetensors, bfloat16, so both
exporters read the same weights; or `--checkpoint DIR`) is exported twice, each exporter in its own process:
`lfm-export --target android` (the phone bundle) and the builder's int4 CPU recipe (peers/genai_builder.py
CPU_INT4). Wall time and the process's peak RSS are each export's figures. Then:

- speed, alternated: both bundles loaded in this process, each in its own runtime (ours: LfmSession;
  theirs: onnxruntime-genai's Model and Generator, as its users run it), measured in turns per round on the
  same random prompt and the same decoded ids (neither samples): prefill of `--prompt` tokens in one call,
  then `--decode` tokens one per call, with the ratio taken per round (studies/ab.py's shape);
- memory running: each bundle in a fresh process (load, the prompt, the decode): its peak RSS;
- quality (`--quality-model`, the demo's 256-wide sibling): KL(fp32 || q) on the held-out text for our int4
  bundle and the builder's int4 export of the same checkpoint, against our fp32 export (the builder's fp32
  export against it too, to show the reference is common to both).

`python -m lfm_edge.device_bench.studies.genai_builder --random-weights lfm2.5-8b-a1b:8 --quality-model
build/quality-model --out build/bench/genai-builder.json` prints the table and writes JSON and Markdown.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ...export.exporter import export
from ...export.quality import MAX_TOKENS, WINDOW, compare, token_windows, window_logits
from ...runtime.backends.python import LfmSession
from ...runtime.files import write_text
from ...runtime.hugepages import reexec_with_hugepages
from ...runtime.memory import current_rss_mb, peak_rss_mb
from ..measure import device_info, timed
from ..peers.genai_builder import (
    CPU_INT4,
    GenaiModel,
    builder_command,
    ours_command,
    run_export,
    write_checkpoint,
)
from .ab import CopyBandwidth, alternated_rounds, our_run, ratios_per_round

OURS_ARGS = ("--target", "android")
PARTS = {"export", "memory", "speed", "quality"}


def export_both(checkpoint: Path, work: Path, reuse: bool, progress: Callable[[str], None],
                ours_args: tuple[str, ...] = OURS_ARGS) -> tuple[Path, Path, dict]:
    """Both exports of `checkpoint` in `work` (ours/, builder/), each in its own process; `reuse` keeps bundles
    that are there (their export figures then come from the JSON written beside them)."""
    bundles = {"ours": work / "ours", "builder": work / "builder"}
    runs = {}
    for label, out in bundles.items():
        record = work / f"{label}-export.json"
        if reuse and record.is_file() and (out / "genai_config.json").is_file():
            runs[label] = json.loads(record.read_text())
            progress(f"{label}: reusing {out}")
            continue
        shutil.rmtree(out, ignore_errors=True)
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        cache = work / "builder-cache"
        command = ours_command(checkpoint, tmp, ours_args) if label == "ours" else builder_command(checkpoint, tmp,
                                                                                                 cache)
        progress(f"{label}: exporting ({' '.join(command[1:])})")
        run = run_export(label, command, tmp, work / f"{label}-export.log")
        shutil.rmtree(cache, ignore_errors=True)
        tmp.rename(out)
        runs[label] = run.as_dict()
        write_text(record, json.dumps(runs[label], indent=2))
        progress(f"{label}: {run.seconds:.0f} s, peak RSS {run.peak_rss_mb:.0f} MB, {run.bundle_mb:.0f} MB on disk")
    return bundles["ours"], bundles["builder"], runs


def alternate(ours: Path, builder: Path, threads: int = 2, prompt: int = 512, decode: int = 128, rounds: int = 6,
              seed: int = 0, progress: Callable[[str], None] = lambda m: None) -> dict:
    """Both bundles in this process, measured in turns (order swapped every round) on the same ids."""
    session = LfmSession(ours, threads=threads, verify="none")
    theirs_model = GenaiModel(builder, threads)
    rng = np.random.default_rng(seed)
    high = min(session.vocab_size, theirs_model.vocab_size, 30000)
    low = min(100, high // 2)
    bandwidth = CopyBandwidth(threads)

    def theirs_run(ids: list[int], steps: list[int]) -> tuple[float, float]:
        gen = theirs_model.generator(len(ids) + len(steps) + 1)
        pre = timed(lambda: gen.append_tokens(np.array([ids], dtype=np.int32)), threads)[0]
        dec = timed(lambda: [gen.append_tokens(np.array([[t]], dtype=np.int32)) for t in steps], threads)[0]
        return len(ids) / pre, len(steps) / dec

    rows, med = alternated_rounds(our_run(session, threads), theirs_run, "builder", "builder", rounds, prompt, decode,
                                  rng, low, high, bandwidth, progress)
    return {"threads": threads, "prompt": prompt, "decode": decode, "rounds": rows, "median": med,
            **ratios_per_round(rows, "builder")}


def run_child(side: str, bundle: Path, threads: int, prompt: int, decode: int) -> dict:
    """In this (fresh) process: load `bundle` in its side's runtime, run the prompt and the decode; RSS figures."""
    rng = np.random.default_rng(1)
    if side == "ours":
        session = LfmSession(bundle, threads=threads, verify="none")
        after_load = current_rss_mb()
        ids = rng.integers(100, min(session.vocab_size, 30000), prompt + decode).tolist()
        cache = session.new_cache(1, prompt + decode)
        cache.step(np.array([ids[:prompt]]), last=1)
        for t in ids[prompt:]:
            cache.step(np.array([[t]]))
    else:
        model = GenaiModel(bundle, threads)
        after_load = current_rss_mb()
        ids = rng.integers(100, min(model.vocab_size, 30000), prompt + decode).tolist()
        gen = model.generator(prompt + decode + 1)
        gen.append_tokens(np.array([ids[:prompt]], dtype=np.int32))
        for t in ids[prompt:]:
            gen.append_tokens(np.array([[t]], dtype=np.int32))
    return {"rss_after_load_mb": round(after_load, 1), "peak_rss_mb": round(peak_rss_mb(), 1)}


def running_memory(bundles: dict[str, Path], threads: int, prompt: int, decode: int) -> dict:
    """Each side's `run_child` in a fresh process."""
    out = {}
    for side, bundle in bundles.items():
        command = [sys.executable, "-P", "-m", __spec__.name, "--child", side, str(bundle), "--threads", str(threads),
                   "--prompt", str(prompt), "--decode", str(decode)]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"{side} memory run failed ({' '.join(command)}):\n{result.stderr[-3000:]}")
        out[side] = json.loads(result.stdout.strip().splitlines()[-1])
    return out


def quality(checkpoint: Path, text: str, work: Path, progress: Callable[[str], None],
            ours_args: tuple[str, ...] = OURS_ARGS, window: int = WINDOW, max_tokens: int = MAX_TOKENS,
            made: dict[str, Path] | None = None) -> dict:
    """KL(fp32 || q) on `text`: our fp32 export is the reference; our bundle (lfm-export `ours_args`) and the
    builder's int4 (and fp32) exports of the same checkpoint are the candidates. `made`: candidates already
    exported from this checkpoint ("ours int4", "builder int4": the export part's, when it read the same one)."""
    made = made or {}
    work.mkdir(parents=True, exist_ok=True)
    progress("quality: our fp32 reference")
    fp32 = export(checkpoint, work / "fp32").bundle
    windows = token_windows(fp32 / "tokenizer.json", text, window, max_tokens)
    reference = window_logits(fp32, windows)
    rows = {}
    ours = made.get("ours int4")
    if ours is None:
        progress(f"quality: ours ({' '.join(ours_args)})")
        ours = work / "ours"
        subprocess.run(ours_command(checkpoint, ours, ours_args), check=True, capture_output=True)
    rows["ours int4"] = compare(reference, window_logits(ours, windows), windows)
    for precision in ("int4", "fp32"):
        out = made.get(f"builder {precision}")
        if out is None:
            progress(f"quality: builder {precision}")
            out = work / f"builder-{precision}"
            command = builder_command(checkpoint, out, work / "cache", CPU_INT4 if precision == "int4" else {})
            command[command.index("-p") + 1] = precision
            if precision == "fp32":
                command = command[:command.index("--extra_options")]
            subprocess.run(command, check=True, capture_output=True)
        rows[f"builder {precision}"] = compare(reference, GenaiModel(out, 2).window_logits(windows), windows)
    return rows


def report(result: dict) -> str:
    """The Markdown table of one run."""
    ex, mem, sp = result.get("export"), result.get("memory"), result.get("speed")
    lines = [f"# Ours against onnxruntime-genai's builder: {result.get('checkpoint', result.get('quality_model'))}", "",
             f"Builder: onnxruntime-genai {result['genai_version']}, `-p int4 -e cpu --extra_options "
             f"{' '.join(f'{k}={v}' for k, v in CPU_INT4.items())}`. Ours: `lfm-export {' '.join(OURS_ARGS)}`.", "",
             *(["| figure | ours | builder | ours / builder |", "|---|---|---|---|"] if ex or mem or sp else [])]
    if sp:
        m = sp["median"]
        lines += [f"| decode, {sp['decode']} tokens after {sp['prompt']} (tok/s, median of {len(sp['rounds'])} "
                  f"rounds) | {m['ours_decode']:.1f} | {m['builder_decode']:.1f} | "
                  f"**{sp['decode_ratio_per_round']:.2f}x** per round |",
                  f"| prefill, {sp['prompt']} tokens (tok/s) | {m['ours_prefill']:.0f} | {m['builder_prefill']:.0f} | "
                  f"**{sp['prefill_ratio_per_round']:.2f}x** per round |"]
    for key, name in (("rss_after_load_mb", "RSS after load"), ("peak_rss_mb", "peak RSS, prompt + decode")):
        if mem:
            o, b = mem["ours"][key], mem["builder"][key]
            lines.append(f"| {name} (MB) | {o:,.0f} | {b:,.0f} | {o / b:.2f}x |")
    o, b = (ex or {}).get("ours"), (ex or {}).get("builder")
    lines += [] if not ex else [f"| export peak RSS (MB) | {o['peak_rss_mb']:,.0f} | {b['peak_rss_mb']:,.0f} | "
              f"**{o['peak_rss_mb'] / b['peak_rss_mb']:.2f}x** |",
              f"| export time (s) | {o['seconds']:.0f} | {b['seconds']:.0f} | {o['seconds'] / b['seconds']:.2f}x |",
              f"| bundle on disk (MB) | {o['bundle_mb']:,.0f} | {b['bundle_mb']:,.0f} | "
              f"{o['bundle_mb'] / b['bundle_mb']:.2f}x |"]
    q = result.get("quality")
    if q:
        lines += ["", f"Quality ({result['quality_model']}, {q['ours int4']['tokens']:,} held-out tokens), "
                  "KL(our fp32 export || q):", "", "| export | KL | top-1 | perplexity (fp32) |", "|---|---|---|---|"]
        lines += [f"| {label} | {r['kl']:.4f} | {r['top1']:.1%} | {r['ppl']:.2f} ({r['ppl_fp32']:.2f}) |"
                  for label, r in q.items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lfm_edge.device_bench.studies.genai_builder", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--random-weights", metavar="PRESET[:LAYERS]", default="lfm2.5-8b-a1b:4",
                        help="write this random checkpoint (export/random_weights.py) and export it (default "
                        "%(default)s)")
    source.add_argument("--checkpoint", default=None, help="a Hugging Face lfm2_moe checkpoint folder instead")
    parser.add_argument("--work", default="build/genai-builder", help="checkpoint and bundles (kept for --reuse)")
    parser.add_argument("--reuse", action="store_true", help="keep a checkpoint and bundles already in --work")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--decode", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--quality-model", default=None, metavar="DIR",
                        help="also KL against fp32 on this checkpoint (build/quality-model) and its held-out text")
    parser.add_argument("--text", default=None, help="held-out text for --quality-model (default: DIR/heldout.txt)")
    parser.add_argument("--parts", default="export,memory,speed,quality",
                        help="what to run, comma-separated (a run of some parts adds them to --out's JSON)")
    parser.add_argument("--out", default="build/bench/genai-builder.json")
    parser.add_argument("--child", nargs=2, metavar=("SIDE", "BUNDLE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        side, bundle = args.child
        print(json.dumps(run_child(side, Path(bundle), args.threads, args.prompt, args.decode)))
        return 0
    if argv is None:
        reexec_with_hugepages()

    def progress(m: str) -> None:
        print(f"  {m}", file=sys.stderr, flush=True)

    import onnxruntime_genai as og

    parts = set(args.parts.split(","))
    if parts - PARTS:
        parser.error(f"--parts {args.parts!r}: expected some of {','.join(sorted(PARTS))}")
    out = Path(args.out)
    result = json.loads(out.read_text()) if parts != PARTS and out.is_file() else {}
    result.update(genai_version=getattr(og, "__version__", "?"), builder_options=CPU_INT4, ours_args=list(OURS_ARGS),
                  device=device_info(args.threads))
    made: dict[str, Path] = {}  # bundles of the export part, which quality reuses when it reads the same checkpoint
    if parts & {"export", "memory", "speed"}:
        work = Path(args.work)
        work.mkdir(parents=True, exist_ok=True)
        if args.checkpoint:
            checkpoint = Path(args.checkpoint)
        else:
            checkpoint = write_checkpoint(args.random_weights,
                                          work / ("ckpt-" + args.random_weights.replace(":", "-")), progress=progress)
        result["checkpoint"] = args.checkpoint or f"--random-weights {args.random_weights} (bfloat16 safetensors)"
        ours, builder, result["export"] = export_both(checkpoint, work, args.reuse or "export" not in parts, progress)
        if args.quality_model and Path(args.quality_model).resolve() == checkpoint.resolve():
            made = {"ours int4": ours, "builder int4": builder}
        if "memory" in parts:
            progress("memory: each bundle in a fresh process")
            result["memory"] = running_memory({"ours": ours, "builder": builder}, args.threads, args.prompt,
                                              args.decode)
        if "speed" in parts:
            result["speed"] = alternate(ours, builder, args.threads, args.prompt, args.decode, args.rounds,
                                        progress=progress)
    if "quality" in parts and args.quality_model:
        text = Path(args.text or Path(args.quality_model) / "heldout.txt").read_text(encoding="utf-8")
        result["quality_model"] = args.quality_model
        with tempfile.TemporaryDirectory(prefix="genai-builder-quality-") as tmp:
            result["quality"] = quality(Path(args.quality_model), text, Path(tmp), progress, made=made)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text(out, json.dumps(result, indent=2))
    md = report(result)
    write_text(out.with_suffix(".md"), md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
