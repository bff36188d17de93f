"""`lfm-bench long-context BUNDLE --depths DEPTHS`: a long prompt, then decoding deep in the context, ours
against llama.cpp on the same weights (its default f16 KV cache, and its q8_0 cache with flash attention).

Each (system, depth) runs in a process of its own, so its peak RSS is that run's alone; the three systems run
in turn at each depth. A run loads the model, prefills `depth` varied token ids (ours through the runtime's own
Generation, in the chunks it prefills; llama.cpp in its default 512-token batches), then decodes
`decode` tokens one step at a time; the decode speed is 1 / the median step. Peak RSS is the process's
high-water mark over prefill and decode (reset after load, /proc/self/clear_refs), next to RSS after load.

`synthetic` depths (ours only): the KV rows are written directly (random int8 or fp32 values) instead of being
prefilled, then 512 real tokens are prefilled at that depth and decoded after. Attention's cost does not depend
on the values in the cache, so this measures decode and prefill speed and memory at depths whose real prefill
takes hours here (128K). llama.cpp has no way to write its cache, so it is not run at those depths.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..runtime.backends.python import LfmSession  # onnxruntime's Python binding: a desktop benchmark
from ..runtime.generate import PREFILL_BUDGET, Generation
from ..runtime.hugepages import reexec_with_hugepages
from ..runtime.memory import available_memory, current_rss_mb, peak_rss_mb, reset_peak_rss
from . import common
from .measure import timed
from .report import write_long_markdown, write_long_plot

SYSTEMS = ("ours", "llama.cpp f16", "llama.cpp q8_0+fa")
OURS = {"flash": "ours", "unfused": "ours unfused"}  # our system's name by attention kernel
SYNTHETIC_TAIL = 512  # real tokens prefilled after a synthetic fill


def geometry(bundle: Path) -> dict:
    """What the memory estimate needs, from config.json and manifest.json, without loading the model:
    attention layers, KV heads, head size, context length, our cache's bytes per element."""
    config = json.loads((bundle / "config.json").read_text())
    manifest = json.loads((bundle / "manifest.json").read_text())
    layers = config.get("layer_types") or []
    heads = config["num_key_value_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    bits = (manifest.get("kv_cache") or {}).get("bits", 32)
    weights = sum(p.stat().st_size for p in bundle.iterdir() if p.name.startswith("model.onnx"))
    return {"attention_layers": sum(t == "full_attention" for t in layers), "kv_heads": heads, "head_dim": head_dim,
            "heads": config["num_attention_heads"],
            "context_length": config["max_position_embeddings"], "kv_bits": bits, "weights_bytes": weights}


def kv_bytes(geo: dict, rows: int, bytes_per_element: float) -> int:
    """Keys and values of every attention layer for `rows` tokens."""
    return int(geo["attention_layers"] * 2 * geo["kv_heads"] * geo["head_dim"] * rows * bytes_per_element)


# llama.cpp's cache element sizes: f16, and q8_0 blocks of 32 values in 34 bytes; it rounds n_ctx up to 256
LLAMA_KV_BYTES = {"f16": 2.0, "q8_0": 34 / 32}


def memory_needed(system: str, geo: dict, depth: int, decode: int, gguf_bytes: int, prefill_budget: int) -> int:
    """Bytes a run needs beyond the Python process: weights, the cache at depth + decode, prefill transients."""
    rows = depth + decode + 1
    if system == "ours":
        return geo["weights_bytes"] + kv_bytes(geo, rows, geo["kv_bits"] / 8) + prefill_budget
    kind = "f16" if system.endswith("f16") else "q8_0"
    cells = -(-(rows + 16) // 256) * 256
    # without flash attention, llama.cpp's compute buffer holds a 512-token batch's scores against every cell
    scores = 0 if kind == "q8_0" else 512 * cells * 4 * geo["heads"]
    return gguf_bytes + kv_bytes(geo, cells, LLAMA_KV_BYTES[kind]) + scores


def _steps(run_step: Callable[[int], None], ids: np.ndarray) -> list[float]:
    out = []
    for t in ids.tolist():
        t0 = time.perf_counter()
        run_step(t)
        out.append(time.perf_counter() - t0)
    return out


def _decode_summary(step_seconds: list[float], threads: int, wait: float) -> dict:
    median = statistics.median(step_seconds)
    return {"tps": 1 / median, "mean_tps": len(step_seconds) / sum(step_seconds), "steps": len(step_seconds),
            "median_step_ms": median * 1e3, "cpu_wait_share": wait}


def run_ours(bundle: str, depth: int, decode: int, threads: int, synthetic: bool = False, seed: int = 0,
             attention_kernel: str = "flash") -> dict:
    """One load, a prefill to `depth` (or a synthetic fill and SYNTHETIC_TAIL real tokens), `decode` steps."""

    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    session = LfmSession(bundle, threads=threads, verify="none", attention_kernel=attention_kernel)
    out: dict = {"load_s": time.perf_counter() - t0, "rss_after_load_mb": current_rss_mb(), "depth": depth,
                 "synthetic": synthetic}
    hi = min(session.vocab_size, 30000)
    cache = session.new_cache(1, depth + decode + 1)  # what a generation reserves: prompt + max_new_tokens
    out["kv_bytes"] = sum(int(np.prod(v.shape())) * np.dtype(cache.kv_dtype[i]).itemsize
                          for i, pair in cache.kv.items() for v in pair)
    out["kv_rows"] = cache.capacity
    start = 0
    if synthetic:
        start = max(depth - SYNTHETIC_TAIL, 0)
        _synthetic_fill(cache, start, rng)
    out["peak_reset"] = reset_peak_rss()
    prompt = rng.integers(100, hi, depth).tolist()  # the first `start` ids stand for the synthetic rows
    chunks: list[int] = []

    def chunk_done(c) -> None:
        chunks.append(c.length)
        _progress(f"ours: prefilled {c.length:,} / {depth:,}")

    def prefill() -> None:  # the runtime's own prefill (Generation with max_new_tokens 0 only prefills)
        for _ in Generation(session, [prompt], 0, cache=cache, on_prefill=chunk_done):
            pass

    if depth - start:
        wall, wait, la = timed(prefill, threads)
        sizes = {b - a for a, b in zip([start, *chunks], chunks, strict=False)}
        out["prefill"] = {"tokens": depth - start, "at_depth": start, "seconds": wall, "tps": (depth - start) / wall,
                          "cpu_wait_share": wait, "chunks": sorted(sizes)}
    ids = rng.integers(100, hi, decode)
    steps: list[float] = []
    _, wait, la = timed(lambda: steps.extend(_steps(lambda t: cache.step(np.array([[t]])), ids)), threads)
    out["decode"] = _decode_summary(steps, threads, wait)
    out["peak_rss_mb"] = peak_rss_mb()
    out["loadavg"] = os.getloadavg()[0]
    return out


def _synthetic_fill(cache, rows: int, rng: np.random.Generator) -> None:
    """KV rows [0, rows) of random values, written as a restored conversation's are (Cache.set_kv_rows)."""
    layers = list(cache.kv)
    shape = (1, *cache.kv[layers[0]][0].shape()[1:2], rows, cache.kv[layers[0]][0].shape()[3])
    dtype = cache.kv_dtype[layers[0]]
    # one array shared by every layer: the values do not change attention's cost, and it keeps the fill's
    # transient memory to one layer's rows
    block = (rng.integers(-127, 128, shape, dtype=np.int8) if np.dtype(dtype).kind == "i"
             else rng.standard_normal(shape, dtype=np.float32).astype(dtype))
    cache.set_kv_rows({i: (block, block) for i in layers}, rows)


def run_llama(gguf: str, depth: int, decode: int, threads: int, cache_type: str, seed: int = 0) -> dict:
    """llama.cpp at `depth`: cache_type "f16" (its default, no flash attention) or "q8_0" (with flash
    attention, which its quantized V cache needs)."""
    import llama_cpp

    rng = np.random.default_rng(seed)
    gtype = {"f16": llama_cpp.GGML_TYPE_F16, "q8_0": llama_cpp.GGML_TYPE_Q8_0}[cache_type]
    t0 = time.perf_counter()
    llm = llama_cpp.Llama(model_path=gguf, n_ctx=depth + decode + 16, n_batch=512, n_ubatch=512,
                          n_threads=threads, n_threads_batch=threads, type_k=gtype, type_v=gtype,
                          flash_attn=cache_type != "f16", verbose=False)
    out: dict = {"load_s": time.perf_counter() - t0, "rss_after_load_mb": current_rss_mb(), "depth": depth,
                 "synthetic": False, "cache_type": cache_type, "flash_attn": cache_type != "f16",
                 "kv_rows": llm.n_ctx()}
    out["peak_reset"] = reset_peak_rss()
    hi = min(llm.n_vocab(), 30000)
    prompt = rng.integers(100, hi, depth).tolist()

    def prefill() -> None:
        for s in range(0, depth, 512):
            llm.eval(prompt[s:s + 512])
            _progress(f"llama.cpp {cache_type}: prefilled {min(s + 512, depth):,} / {depth:,}")

    if depth:
        wall, wait, la = timed(prefill, threads)
        out["prefill"] = {"tokens": depth, "at_depth": 0, "seconds": wall, "tps": depth / wall,
                          "cpu_wait_share": wait, "chunks": [512]}
    ids = rng.integers(100, hi, decode)
    steps: list[float] = []
    _, wait, la = timed(lambda: steps.extend(_steps(lambda t: llm.eval([t]), ids)), threads)
    out["decode"] = _decode_summary(steps, threads, wait)
    out["peak_rss_mb"] = peak_rss_mb()
    out["loadavg"] = os.getloadavg()[0]
    llm.close()
    return out


def _progress(message: str) -> None:
    print(f"progress: {message}", file=sys.stderr, flush=True)


def run_in_subprocess(spec: dict, progress: Callable[[str], None]) -> dict:
    """One run (`spec`: {"system", ...the run function's arguments}) in a fresh process; its progress lines
    are passed on, its result is the last line of its stdout."""
    proc = subprocess.Popen([sys.executable, "-m", "lfm_edge.device_bench.long_context", json.dumps(spec)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    tail: list[str] = []
    last = 0.0
    for line in proc.stderr:
        if line.startswith("progress: "):
            if time.monotonic() - last > 10:  # a line every 10 s is enough to see it move
                progress(line[len("progress: "):].rstrip())
                last = time.monotonic()
        else:
            tail = (tail + [line.rstrip()])[-5:]
    out = proc.stdout.read()
    if proc.wait() != 0:
        raise RuntimeError(f"{spec['system']} at depth {spec['depth']} failed (exit {proc.returncode}): "
                           + " / ".join(tail[-3:]))
    return json.loads(out.strip().splitlines()[-1])


def run(bundle: Path, depths: list[int], decode: int, threads: int, gguf: str | None, synthetic: list[int],
        progress: Callable[[str], None] = lambda m: None, runs: int = 1,
        attention_kernels: tuple[str, ...] = ("flash",)) -> dict:
    """Every system at every depth (`synthetic`: ours only, filled directly), `runs` times each, in turns;
    a point whose memory estimate exceeds MemAvailable is refused (recorded with its numbers) before running.
    Ours runs once per attention kernel (runtime/kernels.py): "ours" (flash), "ours unfused"."""
    geo = geometry(bundle)
    mine = {OURS[k]: k for k in attention_kernels}  # our systems' names -> their attention kernels
    names = list(mine)
    systems = names + (["llama.cpp f16", "llama.cpp q8_0+fa"] if gguf else [])
    gguf_bytes = Path(gguf).stat().st_size if gguf else 0
    points: list[dict] = []
    plan = [(d, s, False) for d in depths for s in systems] + [(d, s, True) for d in synthetic for s in names]
    for depth, system, filled in plan:
        need = memory_needed("ours" if system in mine else system, geo, depth, decode, gguf_bytes, PREFILL_BUDGET)
        free = available_memory()
        point = {"system": system, "depth": depth, "synthetic": filled, "memory_needed_bytes": need, "runs": []}
        points.append(point)
        if free is not None and need > free:
            point["refused"] = (f"needs about {need / 1e9:.2f} GB (weights, KV cache for {depth + decode + 1:,} "
                                f"rows, prefill buffers); MemAvailable is {free / 1e9:.2f} GB")
            progress(f"{system} at depth {depth:,}: refused, {point['refused']}")
            continue
        for r in range(runs):
            progress(f"{system} at depth {depth:,}{' (synthetic fill)' if filled else ''}, run {r + 1}/{runs}")
            spec = {"system": system, "depth": depth, "decode": decode, "threads": threads, "seed": r}
            if system in mine:
                spec |= {"system": "ours", "bundle": str(bundle), "synthetic": filled, "attention_kernel": mine[system]}
            else:
                spec |= {"gguf": gguf, "cache_type": "f16" if system.endswith("f16") else "q8_0"}
            try:
                point["runs"].append(run_in_subprocess(spec, progress))
            except RuntimeError as e:
                point["error"] = str(e)
                progress(str(e))
                break
    return {"geometry": geo, "decode_tokens": decode, "threads": threads, "gguf": gguf, "points": points,
            "summary": summarize(points, geo)}


def _median(point: dict, *path: str) -> float | None:
    values = []
    for run in point["runs"]:
        v = run
        for key in path:
            v = v.get(key) if isinstance(v, dict) else None
        if v is not None:
            values.append(v)
    return statistics.median(values) if values else None


def summarize(points: list[dict], geo: dict) -> dict:
    """Per system and depth: decode tok/s, prefill tok/s, peak RSS over the weights, KV bytes; and the
    ratios the long-context goals are stated in."""
    table: dict[str, dict[str, dict]] = {}
    for p in points:
        if not p["runs"]:
            continue
        key = f"{p['depth']}" + (" synthetic" if p["synthetic"] else "")
        table.setdefault(p["system"], {})[key] = {
            "decode_tps": _median(p, "decode", "tps"), "prefill_tps": _median(p, "prefill", "tps"),
            "peak_rss_mb": _median(p, "peak_rss_mb"), "rss_after_load_mb": _median(p, "rss_after_load_mb"),
            "kv_bytes": _median(p, "kv_bytes") if p["system"].startswith("ours")
            else kv_bytes(geo, int(_median(p, "kv_rows")), LLAMA_KV_BYTES["f16" if "f16" in p["system"] else "q8_0"])}
    ratios: dict[str, float] = {}
    for name in OURS.values():
        ours = table.get(name, {})
        who = "" if name == "ours" else f" ({name})"
        base = min((k for k in ours if not k.endswith("synthetic")), key=int, default=None)
        for depth, row in ours.items():
            if base is not None and row["decode_tps"] and ours[base]["decode_tps"] and depth != base:
                ratios[f"decode at {depth} / at {base}{who}"] = row["decode_tps"] / ours[base]["decode_tps"]
            for peer in ("llama.cpp f16", "llama.cpp q8_0+fa"):
                theirs = table.get(peer, {}).get(depth)
                if not theirs:
                    continue
                for metric in ("decode_tps", "prefill_tps", "kv_bytes", "peak_rss_mb"):
                    if row.get(metric) and theirs.get(metric):
                        ratios[f"{metric} at {depth} vs {peer}{who}"] = row[metric] / theirs[metric]
            if row.get("peak_rss_mb"):
                over = row["peak_rss_mb"] * (1 << 20) - geo["weights_bytes"]
                ratios[f"peak RSS over weights at {depth}, GB{who}"] = over / 1e9
    return {"table": table, "ratios": ratios}


def main(argv: list[str] | None = None) -> int:
    if argv is None:  # run as a command: restart with huge pages for the weights (runtime/hugepages.py)
        reexec_with_hugepages()
    parser = common.parser("long-context", __doc__)
    parser.set_defaults(runs=1)
    parser.add_argument("--depths", type=common.ints, required=True, metavar="DEPTHS",
                        help="a prompt of each depth (e.g. 0,8192,32768), then --decode steps")
    parser.add_argument("--decode", type=int, default=128, help="single-token steps after each prompt")
    parser.add_argument("--synthetic-depths", type=common.ints, default=[], metavar="DEPTHS",
                        help="also depths (ours only) whose KV rows are written directly, then 512 real tokens "
                             "prefilled and decoded after (e.g. the 128K context)")
    parser.add_argument("--attention-kernel", choices=["flash", "unfused", "both"], default="flash",
                        help="GroupQueryAttention's kernel (runtime/kernels.py); 'both' runs ours once with each")
    common.add_peer(parser)
    args = parser.parse_args(argv)
    bundle = Path(args.bundle)
    if common.check("long-context", bundle, args.peer, args.gguf):
        return 2
    limit = geometry(bundle)["context_length"]
    for depth in args.depths + args.synthetic_depths:
        if depth < 0 or depth + args.decode + 1 > limit:
            return common.fail("long-context", f"--depths {depth} + {args.decode} decoded tokens exceed the model's "
                               f"context length {limit} (config.json max_position_embeddings)")
    kernels = ("flash", "unfused") if args.attention_kernel == "both" else (args.attention_kernel,)
    section = run(bundle, args.depths, args.decode, args.threads, args.gguf if args.peer == "llama" else None,
                  args.synthetic_depths, common.progress, runs=args.runs, attention_kernels=kernels)
    result = {
        **common.header(args.threads, bundle, section["geometry"]["weights_bytes"]),
        "long_context": section,
        "settings": {"threads": args.threads, "runs": args.runs, "long_context": args.depths,
                     "synthetic_depths": args.synthetic_depths, "decode": args.decode, "peer": args.peer,
                     "gguf": args.gguf, "attention_kernels": list(kernels)},
    }
    return common.write_reports(result, Path(args.out), write_long_markdown, write_long_plot)


if __name__ == "__main__":  # python -m lfm_edge.device_bench.long_context '{"system": "ours", ...}'
    spec = json.loads(sys.argv[1])
    system = spec.pop("system")
    result = run_ours(**spec) if system == "ours" else run_llama(**spec)
    print(json.dumps(result))
