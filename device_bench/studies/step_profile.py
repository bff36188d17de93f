"""What one decode step runs: nodes by op type and where the time goes, from onnxruntime's own profiler.

Decode reads every active weight once per token, so QMoE and MatMulNBits should be nearly all of a step;
every other node (routing, norms, reshapes, casts) is overhead that does not move weights. The profiler
records the nodes of the graph onnxruntime actually runs, after its own fusions, so its per-step node
counts are the optimized graph's. `--save-optimized DIR` also writes that graph (optimized_model_filepath,
weights to an external file in DIR) and counts its nodes statically.

    python -m lfm_edge.device_bench.studies.step_profile BUNDLE [--steps 64] [--prompt 64] [--threads 2]
    python -m lfm_edge.device_bench.studies.step_profile A B --rounds 8      # decode step time, A and B alternated

Kernel times include the profiler's own cost (a few microseconds per node), so the overhead share is an
upper bound; compare bundles measured the same way, alternated, with the load average printed. A second,
unprofiled session of the bundle decodes the same tokens in turns with the profiled one: its step time less the
weight kernels' profiled time in the same turn is the overhead without the profiler's per-node cost
(`overhead_unprofiled_*`, the median over `--rounds` turns).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from ...runtime.backends.python import LfmSession
from ...runtime.files import write_text
from ...runtime.hugepages import reexec_with_hugepages
from ..measure import timed

WEIGHT_OPS = ("QMoE", "MatMulNBits")  # the kernels that stream weights; the rest is overhead


def profile_decode(bundle: Path, steps: int = 64, prompt: int = 64, threads: int = 2, seed: int = 0,
                   rounds: int = 4) -> dict:
    """Two sessions of the bundle, one profiled and one not, prefill `prompt` random ids, then decode the same
    tokens in alternating turns, `rounds` turns of `steps` single-token steps each. The profile gives nodes
    and time by op type (the prefill and each turn's first step left out); each turn's unprofiled step time
    less the weight kernels' profiled time in the same turn is the overhead without the profiler's per-node
    cost, measured seconds apart rather than minutes (memory speed drifts on a shared machine)."""
    import onnxruntime as ort


    with tempfile.TemporaryDirectory() as tmp:
        def profiled(opts: ort.SessionOptions) -> None:
            opts.enable_profiling = True
            opts.profile_file_prefix = os.path.join(tmp, "step")

        sessions = [LfmSession(bundle, threads=threads, providers="cpu", verify="none", configure=profiled),
                    LfmSession(bundle, threads=threads, providers="cpu", verify="none")]
        rng = np.random.default_rng(seed)
        high = min(sessions[0].vocab_size, 30000)
        ids, tokens = rng.integers(100, high, (1, prompt)), rng.integers(100, high, (rounds, steps))
        caches = [s.new_cache(1, prompt + rounds * steps + 1) for s in sessions]
        for cache in caches:
            cache.step(ids)
        plain_us: list[list[float]] = [[] for _ in range(rounds)]
        for r in range(rounds):
            for i in ((0, 1) if r % 2 == 0 else (1, 0)):
                for t in tokens[r]:
                    start = time.perf_counter()
                    caches[i].step(np.array([[t]]))
                    if i == 1:
                        plain_us[r].append((time.perf_counter() - start) * 1e6)
        events = json.loads(Path(sessions[0].session.end_profiling()).read_text())
    runs, per_run = kernel_times_per_run(events)
    result = summarize_runs(runs[2:], per_run[2:])  # the prefill and the first decode step left out
    weights = [weight_us(run) for run in per_run[1:]]  # decode steps only, in order
    per_round = []
    for r in range(rounds):
        step = statistics.median(plain_us[r][1:])
        per_round.append({"step_unprofiled_us": step, "weights_us": statistics.median(
            weights[r * steps + 1:(r + 1) * steps])})
        per_round[-1]["overhead_unprofiled_us"] = step - per_round[-1]["weights_us"]
    result.update(rounds=per_round,
                  step_unprofiled_us=statistics.median(p["step_unprofiled_us"] for p in per_round),
                  overhead_unprofiled_us=statistics.median(p["overhead_unprofiled_us"] for p in per_round),
                  overhead_unprofiled_share=statistics.median(p["overhead_unprofiled_us"] / p["step_unprofiled_us"]
                                                              for p in per_round))
    return result


def kernel_times_per_run(events: list[dict]) -> tuple[list[tuple[float, float]], list[dict[str, list[float]]]]:
    """Every model run's (start, end) in order and, per op type in it, [nodes, kernel microseconds]."""
    runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("name") == "model_run")
    per_run: list[dict[str, list[float]]] = [defaultdict(lambda: [0, 0.0]) for _ in runs]
    starts = [r[0] for r in runs]
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        i = int(np.searchsorted(starts, e["ts"], side="right")) - 1
        if i < 0 or e["ts"] > runs[i][1]:
            continue
        slot = per_run[i][e.get("args", {}).get("op_name", "?")]
        slot[0] += 1
        slot[1] += e["dur"]
    return runs, per_run


def weight_us(run: dict[str, list[float]]) -> float:
    """The time one run spent in the weight kernels (QMoE, MatMulNBits)."""
    return sum(v[1] for op, v in run.items() if op in WEIGHT_OPS)


def summarize_runs(runs: list[tuple[float, float]], per_run: list[dict[str, list[float]]]) -> dict:
    """Per op type: nodes per step and microseconds per step (median over the runs given, as mapped by
    kernel_times_per_run)."""
    ops = sorted({op for run in per_run for op in run})
    table = {op: {"nodes": statistics.median(run[op][0] for run in per_run),
                  "us": statistics.median(run[op][1] for run in per_run)} for op in ops}
    kernel_us = [sum(v[1] for v in run.values()) for run in per_run]
    step_us = [b - a for a, b in runs]
    # everything but the weight kernels: other nodes' kernels and the executor's time between nodes
    overhead_us = [s - weight_us(run) for s, run in zip(step_us, per_run, strict=True)]
    return {"steps": len(runs), "ops": table, "nodes_per_step": sum(t["nodes"] for t in table.values()),
            "step_us": statistics.median(step_us), "kernel_us": statistics.median(kernel_us),
            "overhead_us": statistics.median(overhead_us),
            "overhead_share_of_step": statistics.median(o / s for o, s in zip(overhead_us, step_us, strict=True)),
            "loadavg": os.getloadavg()}


def alternate(bundles: list[Path], rounds: int = 8, steps: int = 64, prompt: int = 64, threads: int = 2,
              seed: int = 0, spin: bool = True, progress=lambda m: None) -> dict:
    """Decode step time of each bundle, all loaded, measured in turns (the order alternates every round) on the
    same prompt and token ids; the shared machine's memory speed drifts, so only per-round ratios are fair.
    Each step also records the process's CPU time: when other tenants keep our threads waiting for a CPU
    (cpu_wait_share), wall time says little and CPU time, with `spin=False` (onnxruntime's pool threads
    sleep instead of spinning between nodes, so CPU time is work), is the steadier comparison."""
    import onnxruntime as ort


    def no_spin(opts: ort.SessionOptions) -> None:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")

    sessions = [LfmSession(b, threads=threads, providers="cpu", verify="none", configure=None if spin else no_spin)
                for b in bundles]
    rng = np.random.default_rng(seed)
    high = min(min(s.vocab_size for s in sessions), 30000)
    rows = []
    for r in range(rounds + 1):  # round 0 warms up
        ids, tokens = rng.integers(100, high, (1, prompt)), rng.integers(100, high, steps)
        order = list(range(len(sessions)))[:: 1 if r % 2 else -1]
        row: dict[int, dict] = {}
        for i in order:
            cache = sessions[i].new_cache(1, prompt + steps)
            cache.step(ids)
            cpu = time.process_time()
            wall, wait, load = timed(lambda c=cache, ts=tokens: [c.step(np.array([[t]])) for t in ts], threads)
            row[i] = {"step_ms": wall / steps * 1000, "cpu_ms": (time.process_time() - cpu) / steps * 1000,
                      "cpu_wait_share": wait, "loadavg": load}
        progress(f"round {r}/{rounds}{' (warm-up)' if r == 0 else ''}: " +
                 ", ".join(f"{Path(bundles[i]).name} {row[i]['step_ms']:.2f} ms" for i in range(len(bundles))))
        if r:
            rows.append(row)
    out = {"bundles": [str(b) for b in bundles], "rounds": rows, "threads": threads, "steps": steps, "prompt": prompt}
    for key in ("step_ms", "cpu_ms"):
        out[f"median_{key}"] = [statistics.median(row[i][key] for row in rows) for i in range(len(bundles))]
        out[f"{key}_ratio_to_first_per_round"] = [statistics.median(row[i][key] / row[0][key] for row in rows)
                                                  for i in range(len(bundles))]
    out["median_cpu_wait_share"] = [statistics.median(row[i]["cpu_wait_share"] for row in rows)
                                    for i in range(len(bundles))]
    out["loadavg_range"] = [min(row[i]["loadavg"] for row in rows for i in row),
                            max(row[i]["loadavg"] for row in rows for i in row)]
    return out


def optimized_graph_counts(bundle: Path, out_dir: Path, threads: int = 2) -> dict[str, dict[str, int]]:
    """Node counts by op type of the bundle's graph as stored and as onnxruntime optimizes it for the CPU."""
    import onnx
    import onnxruntime as ort

    model_file = Path(bundle) / "model.onnx"
    out_dir.mkdir(parents=True, exist_ok=True)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.optimized_model_filepath = str(out_dir / "optimized.onnx")
    opts.add_session_config_entry("session.optimized_model_external_initializers_file_name", "optimized.onnx.data")
    opts.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    ort.InferenceSession(str(model_file), opts, providers=["CPUExecutionProvider"])
    stored = onnx.load(model_file, load_external_data=False).graph.node
    optimized = onnx.load(out_dir / "optimized.onnx", load_external_data=False).graph.node
    return {"stored": dict(Counter(n.op_type for n in stored)),
            "optimized": dict(Counter(n.op_type for n in optimized))}


def format_table(result: dict) -> str:
    step = result["step_us"]
    lines = [f"{'op':28s} {'nodes/step':>10s} {'us/step':>9s} {'share':>6s}"]
    for op, t in sorted(result["ops"].items(), key=lambda kv: -kv[1]["us"]):
        lines.append(f"{op:28s} {t['nodes']:10.0f} {t['us']:9.0f} {t['us'] / step:6.1%}")
    lines.append(f"{result['nodes_per_step']:.0f} nodes per step; step {step / 1000:.2f} ms (kernels "
                 f"{result['kernel_us'] / 1000:.2f} ms); outside {' and '.join(WEIGHT_OPS)} "
                 f"(other kernels and the executor): "
                 f"{result['overhead_us'] / 1000:.2f} ms = {result['overhead_share_of_step']:.1%} of a step; "
                 f"{result['steps']} steps; loadavg {' '.join(f'{x:.2f}' for x in result['loadavg'])}")
    if "step_unprofiled_us" in result:
        lines.append(f"unprofiled: step {result['step_unprofiled_us'] / 1000:.2f} ms, of which outside the weight "
                     f"kernels {result['overhead_unprofiled_us'] / 1000:.2f} ms = "
                     f"{result['overhead_unprofiled_share']:.1%} (median of {len(result['rounds'])} turns; the "
                     "weight kernels' profiled time in the same turn subtracted)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lfm_edge.device_bench.studies.step_profile", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", nargs="+", help="one bundle to profile, or several to time alternated")
    parser.add_argument("--rounds", type=int, default=None, help="alternated rounds (several bundles: default 8; "
                        "one bundle: turns of the profiled and the unprofiled session, default 4)")
    parser.add_argument("--no-spin", action="store_true", help="with several bundles: pool threads sleep between "
                        "nodes, so CPU time per step is work (for a machine where others keep us waiting)")
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--save-optimized", metavar="DIR", help="also write onnxruntime's optimized graph here")
    parser.add_argument("--json", metavar="FILE", help="write the result as JSON")
    args = parser.parse_args(argv)
    if argv is None:

        reexec_with_hugepages()  # as lfm-bench and ab.py measure
    if len(args.bundle) > 1:
        args.rounds = args.rounds or 8
        result = alternate([Path(b) for b in args.bundle], args.rounds, args.steps, args.prompt, args.threads,
                           spin=not args.no_spin, progress=lambda m: print(f"  {m}", file=sys.stderr, flush=True))
        for i, b in enumerate(args.bundle):
            print(f"{b}: decode step {result['median_step_ms'][i]:.2f} ms wall, "
                  f"{result['step_ms_ratio_to_first_per_round'][i]:.3f}x the first per round; CPU "
                  f"{result['median_cpu_ms'][i]:.2f} ms, {result['cpu_ms_ratio_to_first_per_round'][i]:.3f}x; "
                  f"waiting for a CPU {result['median_cpu_wait_share'][i]:.0%} (medians of {args.rounds} rounds)")
        print(f"loadavg (1 min) {result['loadavg_range'][0]:.2f}-{result['loadavg_range'][1]:.2f}")
        if args.json:
            write_text(args.json, json.dumps(result, indent=2))
        return 0
    args.bundle = args.bundle[0]
    result = profile_decode(Path(args.bundle), args.steps, args.prompt, args.threads, rounds=args.rounds or 4)
    print(format_table(result))
    if args.save_optimized:
        counts = optimized_graph_counts(Path(args.bundle), Path(args.save_optimized), args.threads)
        result["graph_nodes"] = counts
        for which, c in counts.items():
            print(f"{which} graph: {sum(c.values())} nodes: " + ", ".join(f"{k} {v}" for k, v in
                                                                          sorted(c.items(), key=lambda kv: -kv[1])))
    if args.json:
        write_text(args.json, json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
