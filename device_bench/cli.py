"""`lfm-bench BUNDLE`: speed against the memory roofline (and onnxruntime-genai on the same bundle).

Writes bench.json (schema "lfm-bench/1", documented in device_bench/README.md), bench.md and bench.png
(decode tok/s against context depth, with the roofline and the 30 tok/s target).
`--adb SERIAL` runs the same benchmark on an Android phone's Python (Termux) and pulls the JSON.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

from ..runtime.bundle import BundleError, read_bundle
from ..runtime.hugepages import reexec_with_hugepages
from . import roofline
from .bench import device_info, run
from .report import write_markdown, write_plot

SCHEMA = "lfm-bench/1"


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers") from None


def main(argv: list[str] | None = None) -> int:
    if argv is None:  # run as a command: restart with huge pages for the weights (runtime/hugepages.py)
        reexec_with_hugepages()
    parser = argparse.ArgumentParser(prog="lfm-bench", description=__doc__)
    parser.add_argument("bundle")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3, help="measured runs after one warm-up")
    parser.add_argument("--prompts", type=_ints, default=[128, 512, 2048], help="prefill lengths")
    parser.add_argument("--depths", type=_ints, default=[0, 512, 2048], help="context depths for decode")
    parser.add_argument("--decode", type=_ints, default=[128, 256], help="tokens decoded per measurement")
    parser.add_argument("--bandwidth", type=float, default=None, help="GB/s; default: measured here")
    parser.add_argument("--peer", choices=["none", "genai", "llama", "all"], default="genai",
                        help="also run onnxruntime-genai on the same bundle, and/or llama.cpp on --gguf")
    parser.add_argument("--gguf", help="llama.cpp peer: a GGUF of the same weights (device_bench/gguf_writer.py, "
                                       "then llama_cpp_peer.quantize_q4_0)")
    parser.add_argument("--prepack-cache", choices=["off", "use", "auto"], default="off",
                        help="map onnxruntime's repacked weights from BUNDLE/prepacked/ (runtime/prepack.py); "
                             "'auto' writes it at the warm-up load if missing")
    parser.add_argument("--conversation", metavar="TURNS:USER:ANSWER",
                        help="instead of the speed workload: time to first token per turn of a scripted conversation "
                             "(e.g. 10:400:128), state kept vs re-prefilled vs llama.cpp (--peer llama --gguf); "
                             "--runs conversations")
    parser.add_argument("--reasoning", type=int, default=0, metavar="R",
                        help="--conversation: each answer is a <think> block of R tokens, then the rest")
    parser.add_argument("--restore-tokens", type=int, default=0, metavar="N",
                        help="--conversation: also save a conversation of N tokens, then restore and continue it "
                             "against re-prefilling it")
    parser.add_argument("--restore-follow", type=int, default=16, metavar="N",
                        help="--restore-tokens: tokens of the user message that continues the restored conversation")
    parser.add_argument("--compare-turns", type=_ints, default=None, metavar="LIST",
                        help="--conversation: turns at which the re-prefilled and llama.cpp systems run (their cost "
                             "grows with the history; the first and last always); default every turn")
    parser.add_argument("--restore-runs", type=int, default=2, metavar="N",
                        help="--restore-tokens: restores measured after one warm-up (re-prefills: N after the first "
                             "one, which builds the conversation)")
    parser.add_argument("--llama-rollback", type=int, default=0, metavar="N",
                        help="--conversation with --peer llama: llama.cpp keeps N recurrent-state snapshots per "
                             "sequence (n_rs_seq, experimental) so it can roll back up to N tokens instead of "
                             "re-evaluating the whole history; default 0, llama-cpp-python's default. "
                             "llama-cpp-python 0.3.36 aborts at LFM2.5-8B-A1B's full depth with any N > 0")
    parser.add_argument("--long-context", type=_ints, metavar="DEPTHS",
                        help="instead of the speed workload: a prompt of each depth (e.g. 0,8192,32768), then "
                             "min(--decode) decode steps, each system and depth in a process of its own; with "
                             "--peer llama --gguf, llama.cpp's f16 cache and its q8_0 cache with flash attention")
    parser.add_argument("--synthetic-depths", type=_ints, default=[], metavar="DEPTHS",
                        help="--long-context: also depths (ours only) whose KV rows are written directly, then 512 "
                             "real tokens prefilled and decoded after (e.g. the 128K context)")
    parser.add_argument("--attention-kernel", choices=["flash", "unfused", "both"], default="flash",
                        help="GroupQueryAttention's kernel (runtime/kernels.py); 'both' (--long-context only) runs "
                             "ours once with each")
    parser.add_argument("--out", default="build/bench", help="folder for bench.json / .md / .png")
    parser.add_argument("--adb", metavar="SERIAL", help="run on an Android device over adb (Termux python)")
    args = parser.parse_args(argv)
    bundle = Path(args.bundle)
    if args.adb:
        return run_on_device(args.adb, bundle, Path(args.out), argv or sys.argv[1:])
    if args.peer in ("llama", "all") and not args.gguf:  # before minutes of measuring, whatever the workload
        print("lfm-bench: error: --peer llama needs --gguf FILE", file=sys.stderr)
        return 2
    if not (bundle / "model.onnx").is_file() and not (bundle / "genai_config.json").is_file():
        print(f"lfm-bench: error: {bundle}: not a bundle folder", file=sys.stderr)
        return 2

    def progress(message: str) -> None:
        print(f"  {message}", file=sys.stderr, flush=True)

    import onnxruntime as ort

    try:  # a bad bundle is one line naming the file and field, before minutes of measuring
        read_bundle(bundle, onnxruntime_version=ort.__version__)
        if args.conversation:
            return conversation_main(args, bundle, progress)
        if args.long_context is not None:
            return long_context_main(args, bundle, progress)
        if args.attention_kernel == "both":
            print("lfm-bench: error: --attention-kernel both is for --long-context", file=sys.stderr)
            return 2
        progress("measuring read bandwidth")
        bandwidth = args.bandwidth or roofline.read_bandwidth()
        tokens = roofline.bytes_per_token(bundle)
        def open_session(folder: Path, threads: int):
            from ..runtime.backends.python import LfmSession

            session = LfmSession(folder, threads=threads, verify="none", prepack_cache=args.prepack_cache,
                                 attention_kernel=args.attention_kernel)
            progress(session.prepack.message())
            return session

        metrics = run(bundle, args.threads, args.prompts, args.depths, args.decode, args.runs, progress,
                      open_session=open_session)
    except BundleError as e:
        print(f"lfm-bench: error: {e}", file=sys.stderr)
        return 2
    summary = {k: m.summary() for k, m in metrics.items()}
    peers = {}
    if args.peer in ("genai", "all"):
        from .peers import genai_decode

        progress("onnxruntime-genai on the same bundle")
        peers["onnxruntime-genai"] = genai_decode(bundle, args.threads, min(args.prompts), max(args.decode),
                                                  args.runs)
    if args.peer in ("llama", "all"):
        try:
            import llama_cpp  # noqa: F401  (the peer runs in a subprocess; fail early here when it is missing)

            from .llama_cpp_peer import llama_decode_in_subprocess

            progress("llama.cpp on the GGUF (in a process of its own, so RSS is its own)")
            peers["llama.cpp"] = llama_decode_in_subprocess(args.gguf, args.threads, args.prompts, max(args.decode),
                                                            args.runs)
        except ImportError:
            peers["llama.cpp"] = {"error": "llama-cpp-python is not installed (pip install 'lfm-edge[llama]')"}
        except RuntimeError as e:
            peers["llama.cpp"] = {"error": str(e)}
    decode_keys = [k for k in summary if k.startswith("decode/")]
    best_decode = max(summary[k]["median"] for k in decode_keys) if decode_keys else 0.0
    ceiling = roofline.ceiling(bandwidth, tokens.total)
    fraction = best_decode / ceiling if ceiling else 0.0
    # phones: LFM2.5-8B-A1B int4's decode, at this bundle's efficiency only if it is memory-bound (roofline.py)
    prediction = asdict(roofline.phone_prediction(bundle, tokens, fraction))
    result = {
        "schema": SCHEMA,
        "device": device_info(args.threads),
        "bundle": {"path": str(bundle), "manifest": _manifest(bundle), "weights_bytes": tokens.stored,
                   "bytes_per_token": tokens.total, "bytes_per_token_by_kind": tokens.by_kind},
        "roofline": {"read_bandwidth_gbs": bandwidth, "ceiling_tps": ceiling,
                     "fraction_reached": fraction, "target_tps": roofline.TARGET_TOKENS_PER_SECOND,
                     "phones": prediction.pop("phones"), "phone_prediction": prediction},
        "results": summary,
        "memory": memory(summary, tokens.stored) | prepack_disk(bundle, args.prepack_cache),
        "peers": peers,
        "ratios": {name: ratios(summary, peer) for name, peer in peers.items() if peer.get("decode_tps")},
        "settings": {"threads": args.threads, "runs": args.runs, "prompts": args.prompts, "depths": args.depths,
                     "decode": args.decode, "prepack_cache": args.prepack_cache,
                     "attention_kernel": args.attention_kernel},
    }
    return _write_reports(result, Path(args.out), write_markdown, write_plot)


def conversation_main(args: argparse.Namespace, bundle: Path, progress) -> int:
    """`--conversation`: bench.json with the `conversation` section instead of the speed workload's."""
    from . import convbench
    from .report import write_conversation_markdown, write_conversation_plot

    try:
        convbench.parse_spec(args.conversation)
    except ValueError as e:
        print(f"lfm-bench: error: {e}", file=sys.stderr)
        return 2
    gguf = args.gguf if args.peer in ("llama", "all") else None
    section = convbench.run(bundle, args.conversation, args.threads, args.runs, args.reasoning, gguf,
                            args.restore_tokens, args.restore_follow, args.restore_runs,
                            llama_rollback=args.llama_rollback, compare_turns=args.compare_turns,
                            progress=progress)
    result = {
        **_common(args, bundle, section["memory"]["weights_bytes"]),
        "conversation": section,
        "settings": {"threads": args.threads, "runs": args.runs, "conversation": args.conversation,
                     "reasoning": args.reasoning, "restore_tokens": args.restore_tokens,
                     "restore_follow": args.restore_follow, "peer": args.peer, "gguf": args.gguf,
                     "llama_rollback": args.llama_rollback, "compare_turns": args.compare_turns,
                     "restore_runs": args.restore_runs},
    }
    return _write_reports(result, Path(args.out), write_conversation_markdown, write_conversation_plot)


def long_context_main(args: argparse.Namespace, bundle: Path, progress) -> int:
    """`--long-context`: bench.json with the `long_context` section (device_bench/longctx.py)."""
    from . import longctx
    from .report import write_long_markdown, write_long_plot

    gguf = args.gguf if args.peer in ("llama", "all") else None
    limit = longctx.geometry(bundle)["context_length"]
    decode = min(args.decode)
    for depth in args.long_context + args.synthetic_depths:
        if depth < 0 or depth + decode + 1 > limit:
            print(f"lfm-bench: error: --long-context depth {depth} + {decode} decoded tokens exceed the model's "
                  f"context length {limit} (config.json max_position_embeddings)", file=sys.stderr)
            return 2
    kernels = ("flash", "unfused") if args.attention_kernel == "both" else (args.attention_kernel,)
    section = longctx.run(bundle, args.long_context, decode, args.threads, gguf, args.synthetic_depths,
                          progress, runs=args.runs, attention_kernels=kernels)
    result = {
        **_common(args, bundle, section["geometry"]["weights_bytes"]),
        "long_context": section,
        "settings": {"threads": args.threads, "runs": args.runs, "long_context": args.long_context,
                     "synthetic_depths": args.synthetic_depths, "decode": decode, "peer": args.peer,
                     "gguf": args.gguf, "attention_kernels": list(kernels)},
    }
    return _write_reports(result, Path(args.out), write_long_markdown, write_long_plot)


def _common(args: argparse.Namespace, bundle: Path, weights_bytes: int) -> dict:
    """What every bench.json opens with: schema, device, and the bundle measured."""
    return {"schema": SCHEMA, "device": device_info(args.threads),
            "bundle": {"path": str(bundle), "manifest": _manifest(bundle), "weights_bytes": weights_bytes}}


def _write_reports(result: dict, out: Path, markdown, plot) -> int:
    """bench.json, bench.md and bench.png in `out`; the markdown is printed."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(result, indent=2))
    markdown(result, out / "bench.md")
    plot(result, out / "bench.png")
    print((out / "bench.md").read_text())
    return 0


def memory(summary: dict, weights_bytes: int) -> dict:
    """Peak RSS (prefill's transient buffers included), RSS while decoding, and resident memory split into
    anonymous (the process's own copies) and file-backed (mapped bundle pages), against the bundle's weights.
    The RSS figures are MiB (the kernel's unit), so a ratio converts them with 2**20, not 1e6."""
    out = {"weights_mb": weights_bytes / 1e6}
    for key in ("peak_rss", "rss_decoding", "anon_after_load", "file_after_load", "anon_decoding", "file_decoding"):
        if key in summary:
            out[f"{key}_mb"] = summary[key]["median"]
            out[f"{key}_over_weights"] = summary[key]["median"] * (1 << 20) / weights_bytes
    return out


def prepack_disk(bundle: Path, mode: str) -> dict:
    """The prepack cache's size on disk, against the bundle's weights, when the run used one."""
    from ..runtime.backends import prepack

    folder = bundle / prepack.FOLDER
    if mode == "off" or not folder.is_dir():
        return {}
    weights = sum(p.stat().st_size for p in bundle.iterdir() if p.name.startswith("model.onnx"))
    disk = prepack.disk_bytes(folder)
    return {"prepack_cache_disk_mb": disk / 1e6, "prepack_cache_over_weights": disk / weights if weights else 0.0}


def ratios(summary: dict, peer: dict) -> dict:
    """Ours over the peer's, like for like: speeds (higher is better for us), load and RSS (lower is)."""
    same = f"decode/{peer.get('decode_tokens')}@0"
    decode = summary[same]["median"] if same in summary else max(
        (m["median"] for k, m in summary.items() if k.startswith("decode/")), default=0.0)
    out = {"decode": decode / peer["decode_tps"]}
    for length, tps in (peer.get("prompt_tps") or {}).items():
        if f"prefill/{length}" in summary and tps:
            out[f"prefill/{length}"] = summary[f"prefill/{length}"]["median"] / tps
    if peer.get("load_s"):
        out["load"] = summary["load"]["median"] / peer["load_s"]
    if peer.get("peak_rss_mb"):
        out["peak_rss"] = summary["peak_rss"]["median"] / peer["peak_rss_mb"]
    return out


def _manifest(bundle: Path) -> dict:
    path = bundle / "manifest.json"
    if not path.is_file():
        return {}
    manifest = json.loads(path.read_text())
    if not isinstance(manifest, dict):
        return {}
    return {k: manifest.get(k) for k in ("model_type", "ops", "quant", "quant_policy", "target", "versions")}


DEVICE_DIR = "/data/local/tmp/lfm-edge"


def adb_commands(serial: str, bundle: Path, out: Path, bench_args: list[str]) -> list[list[str]]:
    """The adb steps: push the bundle, run lfm-bench in the device's Python, pull the results."""
    remote = f"{DEVICE_DIR}/{bundle.name}"
    args = [a for a in bench_args if a not in (str(bundle), bundle.name)]
    args = _drop_option(_drop_option(args, "--adb"), "--out")
    inner = " ".join(["python", "-m", "lfm_edge.device_bench.cli", remote, "--out", f"{DEVICE_DIR}/out", *args])
    return [["adb", "-s", serial, "shell", "mkdir", "-p", DEVICE_DIR],
            ["adb", "-s", serial, "push", str(bundle), DEVICE_DIR],
            ["adb", "-s", serial, "shell", inner],
            ["adb", "-s", serial, "pull", f"{DEVICE_DIR}/out/bench.json", str(out / "bench.json")]]


def _drop_option(args: list[str], name: str) -> list[str]:
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a == name:
            skip = True
        elif not a.startswith(name + "="):
            out.append(a)
    return out


def run_on_device(serial: str, bundle: Path, out: Path, argv: list[str]) -> int:
    if shutil.which("adb") is None:
        print("lfm-bench: error: --adb needs the Android platform tools (adb) on PATH", file=sys.stderr)
        return 2
    devices = subprocess.run(["adb", "devices"], capture_output=True, text=True).stdout
    if f"{serial}\tdevice" not in devices:
        print(f"lfm-bench: error: --adb {serial}: no such device attached (adb devices: "
              f"{devices.strip().splitlines()[1:] or 'none'})", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    for cmd in adb_commands(serial, bundle, out, argv):
        if subprocess.run(cmd).returncode != 0:
            print(f"lfm-bench: error: step failed: {' '.join(cmd)}", file=sys.stderr)
            return 2
    print(f"Pulled {out / 'bench.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
