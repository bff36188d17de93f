"""`lfm-bench speed BUNDLE`: load, time to first token, prefill and decode speed at several context depths,
against the memory roofline and onnxruntime-genai (or llama.cpp) on the same weights.

Every timed region records CPU wait and load average (measure.py). Decode steps feed varied token ids, so
routing varies as in real text (a repeated token keeps re-reading the same experts and flatters the number).
Writes bench.json (schema "lfm-bench/1", device_bench/README.md), bench.md and bench.png. `--adb SERIAL`
runs the same benchmark on an Android phone's Python (Termux) and pulls the JSON.
"""

from __future__ import annotations

import gc
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from ..runtime import threads as tuning
from ..runtime.backends import prepack
from ..runtime.bundle import read_bundle
from ..runtime.hugepages import reexec_with_hugepages
from ..runtime.memory import PeakMemory, can_reset_peak, current_rss_mb, resident_mb
from . import common, roofline
from .measure import Metric, Sample, timed
from .peers.genai import genai_decode  # onnxruntime-genai: an optional peer
from .peers.llama_cpp import llama_decode_in_subprocess
from .report import write_markdown, write_plot


class Cancelled(Exception):
    """`run` stopped because its `cancel` event was set; no metrics are returned."""


def _lfm_session(bundle: Path, threads: int, **options: Any) -> Any:
    # onnxruntime's Python binding, imported where it is used: a phone build runs this module through the Java
    # or Objective-C backend (the app passes runtime.backends.open_session)
    from ..runtime.backends.python import LfmSession

    return LfmSession(bundle, threads=threads, verify="none", **options)


def run(bundle: Path, threads: int, prompts: list[int], depths: list[int], decode: list[int], runs: int,
        progress: Callable[[str], None] = lambda m: None, seed: int = 0, *,
        open_session: Callable[[Path, int], Any] | None = None,
        cancel: threading.Event | None = None, session: Any = None) -> dict[str, Metric]:
    """Measure `runs` times after one warm-up; returns metrics keyed 'load', 'ttft', 'prefill/P',
    'decode/N@D' (N tokens decoded after D tokens of context), and memory: each run's own peaks ('peak_rss',
    and its anonymous and file-backed parts 'peak_anon', 'peak_file': runtime/memory.py PeakMemory, from the
    run's start, so nothing the process did before counts), 'rss_decoding' and resident memory split into
    anonymous and file-backed pages (runtime/memory.py resident_mb) right after load ('anon_after_load',
    'file_after_load') and right after each decode measurement ('anon_decoding', 'file_decoding', the largest
    of the run).

    `session`: an already loaded session to measure instead of loading the bundle each run (the app passes
    the one its chat uses, so the model is in memory once); then there is no 'load' metric and the
    "after load" memory is what the process holds before the warm-up.

    `open_session(bundle, threads)` loads the bundle (default: LfmSession with onnxruntime's Python binding,
    no file check); an app passes `lfm_edge.runtime.backends.open_session` to run on a phone's Java or
    Objective-C backend. A set `cancel` raises `Cancelled` (no partial metrics: a half-measured run would
    be misread as a result) before each stage, before and after each prefill step (one step of the model
    cannot be interrupted), and before each decode step, so a cancel set mid-decode stops within one step."""
    open_session = open_session or _lfm_session

    def check() -> None:
        if cancel is not None and cancel.is_set():
            raise Cancelled("benchmark cancelled")

    def stage(message: str) -> None:
        check()
        progress(message)
        check()  # the progress callback may have set it

    rng = np.random.default_rng(seed)
    metrics: dict[str, Metric] = {"load": Metric("s"), "ttft": Metric("s"), "peak_rss": Metric("MB"),
                                  "rss_decoding": Metric("MB")}
    for key in ("peak_anon", "peak_file", "anon_after_load", "file_after_load", "anon_decoding", "file_decoding"):
        metrics[key] = Metric("MB")
    given = session

    def load():
        nonlocal session
        session = open_session(bundle, threads)

    def memory(prefix: str) -> None:
        now = resident_mb()
        for kind in ("anon", "file"):
            metrics[f"{kind}_{prefix}"].samples.append(
                Sample(now["anonymous" if kind == "anon" else "file"], 0.0, 0.0, os.getloadavg()[0]))

    vocab_hi = 0

    def ids(n: int) -> np.ndarray:
        return rng.integers(100, vocab_hi, (1, n))

    for r in range(runs + 1):
        decoding_rss = 0.0  # resident memory right after each decode measurement, the largest of this run
        decoding_memory = {"anonymous": 0.0, "file": 0.0}
        label = "warm-up" if r == 0 else f"run {r}/{runs}"
        # this run's own peaks: not the bandwidth probe before it, an earlier run, or what an app did before
        with PeakMemory() as peak:
            if given is None:
                stage(f"{label}: load")
                wall, wait, la = timed(load, threads)
                check()
                if r:
                    metrics["load"].samples.append(Sample(wall, wall, wait, la))
                    memory("after_load")
            elif r == 0:
                memory("after_load")
            vocab_hi = vocab_hi or min(session.vocab_size, 30000)
            for p in prompts:
                stage(f"{label}: prefill {p}")
                cache = session.new_cache(1, p + 1)
                prompt = ids(p)
                # as a generation prefills: logits for the last row only (where the graph can skip the others)
                wall, wait, la = timed(lambda c=cache, x=prompt: c.step(x, last=1), threads)
                check()
                if r:
                    sample = Sample(p / wall, wall, wait, la)
                    metrics.setdefault(f"prefill/{p}", Metric("tok/s")).samples.append(sample)
                    if p == min(prompts):
                        metrics["ttft"].samples.append(Sample(wall, wall, wait, la))
            for d in depths:
                for n in decode:
                    stage(f"{label}: decode {n} at depth {d}")
                    cache = session.new_cache(1, d + n + 1)
                    if d:
                        cache.step(ids(d), last=1)
                        check()
                    steps = ids(n)

                    def decode_loop(c=cache, s=steps):
                        for i in range(s.shape[1]):
                            check()
                            c.step(s[:, i:i + 1])

                    wall, wait, la = timed(decode_loop, threads)
                    if r:
                        sample = Sample(n / wall, wall, wait, la)
                        metrics.setdefault(f"decode/{n}@{d}", Metric("tok/s")).samples.append(sample)
                        decoding_rss = max(decoding_rss, current_rss_mb())
                        now = resident_mb()
                        decoding_memory = {k: max(v, now[k]) for k, v in decoding_memory.items()}
        if r:
            peaks = peak.peaks()
            for key, part in (("peak_rss", "rss"), ("peak_anon", "anonymous"), ("peak_file", "file")):
                if part in peaks:
                    metrics[key].samples.append(Sample(peaks[part], 0.0, 0.0, os.getloadavg()[0]))
            if decoding_rss:
                metrics["rss_decoding"].samples.append(Sample(decoding_rss, 0.0, 0.0, os.getloadavg()[0]))
                for kind, key in (("anon", "anonymous"), ("file", "file")):
                    metrics[f"{kind}_decoding"].samples.append(
                        Sample(decoding_memory[key], 0.0, 0.0, os.getloadavg()[0]))
        # drop every reference to this run's session before the next load, or two would coexist
        cache = decode_loop = None  # noqa: F841
        session = given
        gc.collect()
    return {k: m for k, m in metrics.items() if m.samples}


def main(argv: list[str] | None = None) -> int:
    if argv is None:  # run as a command: restart with huge pages for the weights (runtime/hugepages.py)
        reexec_with_hugepages()
    parser = common.parser("speed", __doc__)
    parser.add_argument("--prompts", type=common.ints, default=[128, 512, 2048], help="prefill lengths")
    parser.add_argument("--depths", type=common.ints, default=[0, 512, 2048], help="context depths for decode")
    parser.add_argument("--decode", type=common.ints, default=[128, 256], help="tokens decoded per measurement")
    parser.add_argument("--bandwidth", type=float, default=None, help="GB/s; default: measured here")
    common.add_peer(parser, ("none", "genai", "llama", "all"), default="genai")
    parser.add_argument("--prepack-cache", choices=["off", "use", "auto"], default="off",
                        help="map onnxruntime's repacked weights from BUNDLE/prepacked/ (runtime/backends/prepack.py); "
                             "'auto' writes it at the warm-up load if missing")
    parser.add_argument("--attention-kernel", choices=["flash", "unfused"], default="flash",
                        help="GroupQueryAttention's kernel (runtime/kernels.py)")
    parser.add_argument("--adb", metavar="SERIAL", help="run on an Android device over adb (Termux python)")
    parser.add_argument("--sweep-threads", action="store_true",
                        help="first measure threads=\"auto\"'s candidates (runtime/threads.py), report the sweep, and "
                             "benchmark with its choice instead of --threads")
    args = parser.parse_args(argv)
    bundle = Path(args.bundle)
    if args.adb:
        return run_on_device(args.adb, bundle, Path(args.out), argv or sys.argv[1:])
    if common.check("speed", bundle, args.peer, args.gguf):
        return 2

    cores: tuple[int, ...] = ()  # pinned by the thread sweep's choice on big.LITTLE

    def open_session(folder: Path, threads: int) -> Any:
        session = _lfm_session(folder, threads, prepack_cache=args.prepack_cache,
                               attention_kernel=args.attention_kernel, cores=cores)
        common.progress(session.prepack.message())
        return session

    sweep = thread_sweep(bundle, args.attention_kernel) if args.sweep_threads else None
    if sweep is not None:
        args.threads, cores = sweep["threads"], tuple(sweep["cores"])

    common.progress("measuring read bandwidth")
    bandwidth = args.bandwidth or roofline.read_bandwidth()
    tokens = roofline.bytes_per_token(bundle)
    metrics = run(bundle, args.threads, args.prompts, args.depths, args.decode, args.runs, common.progress,
                  open_session=open_session)
    summary = {k: m.summary() for k, m in metrics.items()}
    peers = measure_peers(args, bundle)
    decode_keys = [k for k in summary if k.startswith("decode/")]
    best_decode = max(summary[k]["median"] for k in decode_keys) if decode_keys else 0.0
    ceiling = roofline.ceiling(bandwidth, tokens.total)
    fraction = best_decode / ceiling if ceiling else 0.0
    # phones: LFM2.5-8B-A1B int4's decode, at this bundle's efficiency only if it is memory-bound (roofline.py)
    prediction = asdict(roofline.phone_prediction(bundle, tokens, fraction))
    result = {
        **common.header(args.threads, bundle, tokens.stored),
        "roofline": {"read_bandwidth_gbs": bandwidth, "ceiling_tps": ceiling,
                     "fraction_reached": fraction, "target_tps": roofline.TARGET_TOKENS_PER_SECOND,
                     "phones": prediction.pop("phones"), "phone_prediction": prediction},
        "results": summary,
        "memory": memory(summary, tokens.stored) | prepack_disk(bundle, args.prepack_cache),
        "peers": peers,
        **({"threads_sweep": sweep} if sweep is not None else {}),
        "ratios": {name: ratios(summary, peer) for name, peer in peers.items() if peer.get("decode_tps")},
        "settings": {"threads": args.threads, "runs": args.runs, "prompts": args.prompts, "depths": args.depths,
                     "decode": args.decode, "prepack_cache": args.prepack_cache,
                     "attention_kernel": args.attention_kernel},
    }
    result["bundle"] |= {"label": roofline.bundle_label(bundle), "bytes_per_token": tokens.total,
                         "bytes_per_token_by_kind": tokens.by_kind}
    return common.write_reports(result, Path(args.out), write_markdown, write_plot)


def thread_sweep(bundle: Path, attention_kernel: str) -> dict:
    """threads="auto"'s measurement, fresh (its cache file is neither read nor written): each candidate's decode
    tok/s, the choice and why (bench.json "threads_sweep")."""
    common.progress("measuring decode at each thread count (threads=\"auto\")")
    choice, _ = tuning.sweep(bundle, lambda c: _lfm_session(bundle, c.threads, cores=c.cores,
                                                              attention_kernel=attention_kernel),
                             read_bundle(bundle, "none").threads)
    return choice.to_json()


def measure_peers(args: Any, bundle: Path) -> dict:
    """onnxruntime-genai on the same bundle and/or llama.cpp on --gguf, as --peer asks."""
    peers = {}
    if args.peer in ("genai", "all"):

        common.progress("onnxruntime-genai on the same bundle")
        peers["onnxruntime-genai"] = genai_decode(bundle, args.threads, min(args.prompts), max(args.decode),
                                                  args.runs)
    if args.peer in ("llama", "all"):
        try:
            import llama_cpp  # noqa: F401  (the peer runs in a subprocess; fail early here when it is missing)


            common.progress("llama.cpp on the GGUF (in a process of its own, so RSS is its own)")
            peers["llama.cpp"] = llama_decode_in_subprocess(args.gguf, args.threads, args.prompts, max(args.decode),
                                                            args.runs)
        except ImportError:
            peers["llama.cpp"] = {"error": "llama-cpp-python is not installed (pip install 'lfm-edge[llama]')"}
        except RuntimeError as e:
            peers["llama.cpp"] = {"error": str(e)}
    return peers


MEMORY_KEYS = ("peak_rss", "peak_anon", "peak_file", "rss_decoding", "anon_after_load", "file_after_load",
               "anon_decoding", "file_decoding")


def memory(summary: dict, weights_bytes: int) -> dict:
    """Peak RSS (load and prefill's transient buffers included) and its anonymous and file-backed parts, RSS
    while decoding, and resident memory split into anonymous (the process's own copies) and file-backed
    (mapped bundle pages), against the bundle's weights. `peak_from` says what the peaks cover: each run
    from its start where the kernel's high-water mark can be reset, else the whole process (the bandwidth
    probe's gigabyte included). The RSS figures are MiB (the kernel's unit), so a ratio converts them with
    2**20, not 1e6."""
    out = {"weights_mb": weights_bytes / 1e6,
           "peak_from": "each run" if can_reset_peak() else "the process (this system cannot reset the peak)"}
    for key in MEMORY_KEYS:
        if key in summary:
            out[f"{key}_mb"] = summary[key]["median"]
            out[f"{key}_over_weights"] = summary[key]["median"] * (1 << 20) / weights_bytes
    return out


def prepack_disk(bundle: Path, mode: str) -> dict:
    """The prepack cache's size on disk, against the bundle's weights, when the run used one."""
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


DEVICE_DIR = "/data/local/tmp/lfm-edge"


def adb_commands(serial: str, bundle: Path, out: Path, bench_args: list[str]) -> list[list[str]]:
    """The adb steps: push the bundle, run lfm-bench in the device's Python, pull the results."""
    remote = f"{DEVICE_DIR}/{bundle.name}"
    args = [a for a in bench_args if a not in (str(bundle), bundle.name)]
    args = _drop_option(_drop_option(args, "--adb"), "--out")
    inner = " ".join(["python", "-m", "lfm_edge.device_bench.cli", "speed", remote, "--out", f"{DEVICE_DIR}/out",
                      *args])
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
        return common.fail("speed", "--adb needs the Android platform tools (adb) on PATH")
    devices = subprocess.run(["adb", "devices"], capture_output=True, text=True).stdout
    if f"{serial}\tdevice" not in devices:
        return common.fail("speed", f"--adb {serial}: no such device attached (adb devices: "
                                    f"{devices.strip().splitlines()[1:] or 'none'})")
    out.mkdir(parents=True, exist_ok=True)
    for cmd in adb_commands(serial, bundle, out, argv):
        if subprocess.run(cmd).returncode != 0:
            return common.fail("speed", f"step failed: {' '.join(cmd)}")
    print(f"Pulled {out / 'bench.json'}")
    return 0
