"""Time outside the weight kernels, measured by ablation: a decode step against the same weight kernels alone.

A decode step reads every active weight once, in QMoE and MatMulNBits nodes; everything else (routing, norms,
the conv, attention, reshapes, the executor between nodes, the runtime's Python) is overhead. step_profile.py
measures it with onnxruntime's profiler, which adds its own cost to every node and so needs a second session's
unprofiled steps subtracted from the profiled kernels' time: two noisy numbers for one small difference.

Here nothing is profiled. `weights_only_graph` keeps the bundle's QMoE and MatMulNBits nodes, the same
initializers in the same external data, and nothing else: each node reads a graph input of its activation's
shape (random) and QMoE's router inputs get fresh random scores every step, so each step streams a new choice
of experts as decoding does. The overhead is then a decode step (`Cache.step`, as an app runs it) less one run
of that graph, the two run one after the other in one process, token by token: this VM's memory speed moves
within seconds (device_bench/results/notes/2026-11-30-overhead-and-parallel-load.md), so only neighbours are compared,
and medians reported.

    python -m lfm_edge.device_bench.studies.overhead BUNDLE [--rounds 10] [--steps 48] [--json FILE]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

from ...plots import figure, whole_numbers
from ...runtime.backends.python import LfmSession
from ...runtime.files import write_text
from ...runtime.hugepages import reexec_with_hugepages
from .step_profile import WEIGHT_OPS

ROUTER_INPUTS = {1: "router_probs", 14: "router_weights"}  # QMoE's routing inputs (router_weights optional)


def weights_only_graph(bundle: Path, folder: Path) -> Path:
    """model.onnx of `bundle` reduced to its weight kernels, written to `folder` beside a hard link to (or, across
    file systems, a copy of) the bundle's weights: onnxruntime reads external data inside the model's folder only.
    Inputs: x{K} [B, S, K] for each activation width K, router_probs/router_weights [B*S, E] (float32; fp16
    for the 3-bit experts that run on fp16 activations)."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(Path(bundle) / "model.onnx", load_external_data=False)
    g = model.graph
    producer = {out: node for node in g.node for out in node.output}
    dims = {t.name: list(t.dims) for t in g.initializer}
    keep = [n for n in g.node if n.op_type in WEIGHT_OPS]
    if not keep:
        raise ValueError(f"{bundle}/model.onnx has no QMoE or MatMulNBits node: nothing to ablate against")
    inputs: dict[str, onnx.ValueInfoProto] = {}
    outputs: list[onnx.ValueInfoProto] = []

    def graph_input(name: str, elem: int, shape: list) -> str:
        inputs.setdefault(name, helper.make_tensor_value_info(name, elem, shape))
        return name

    def elem_type(value: str) -> int:  # fp16 where the export casts around the node
        node = producer.get(value)
        cast = node is not None and node.op_type == "Cast" and next(a.i for a in node.attribute if a.name == "to")
        return TensorProto.FLOAT16 if cast == TensorProto.FLOAT16 else TensorProto.FLOAT

    for node in keep:
        attrs = {a.name: a for a in node.attribute}
        if node.op_type == "MatMulNBits":
            k = attrs["K"].i
        else:  # fc1 codes [E, 2I, H * bits / 8]
            experts, _, packed = dims[node.input[2]]
            bits = attrs["fc1_expert_weight_bits"].i if "fc1_expert_weight_bits" in attrs else \
                attrs["expert_weight_bits"].i if "expert_weight_bits" in attrs else 4
            k = packed * 8 // bits
        elem = elem_type(node.input[0])
        suffix = "" if elem == TensorProto.FLOAT else ".fp16"
        node.input[0] = graph_input(f"x{k}{suffix}", elem, ["batch", "seq", k])
        outputs.append(helper.make_tensor_value_info(node.output[0], elem, None))  # as its input's type
        if node.op_type == "QMoE":
            for i, name in ROUTER_INPUTS.items():
                if len(node.input) > i and node.input[i]:
                    node.input[i] = graph_input(name + suffix, elem, ["tokens", experts])
    used = {name for node in keep for name in node.input}
    initializers = [t for t in g.initializer if t.name in used]
    reduced = helper.make_model(helper.make_graph(keep, "weights_only", list(inputs.values()), outputs,
                                                  initializers), opset_imports=model.opset_import,
                                ir_version=model.ir_version)
    folder.mkdir(parents=True, exist_ok=True)
    for data in {loc.value for t in initializers for loc in t.external_data if loc.key == "location"}:
        target = folder / data
        if not target.exists():
            try:
                os.link(Path(bundle) / data, target)
            except OSError:
                shutil.copyfile(Path(bundle) / data, target)
    path = folder / "weights_only.onnx"
    onnx.save(reduced, path)
    return path


def _feeds(session, batch: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Random values for every input of the weights-only graph (router scores new on each call)."""
    feeds = {}
    for value in session.get_inputs():
        dtype = np.float16 if "float16" in value.type else np.float32
        if value.name.startswith("router"):
            feeds[value.name] = rng.random((batch, value.shape[1])).astype(dtype)
        else:
            feeds[value.name] = rng.standard_normal((batch, 1, value.shape[2])).astype(dtype)
    return feeds


def measure(bundle: Path, rounds: int = 10, steps: int = 48, prompt: int = 64, threads: int = 2, seed: int = 0,
            progress=lambda m: None) -> dict:
    """Decode step time (`Cache.step`) and the weight kernels' time alone, run in turns step by step (the order
    alternating) for `rounds` rounds of `steps` tokens: each step's overhead is its time less the weight kernels'
    run next to it, 30 ms apart, and a round reports the medians. Of two sessions of one graph, the one opened
    second decoded 0.30-0.37 ms faster here (in both orders, 376 paired steps each), so the two are opened in
    one order for the first half of the rounds and in the other for the second, each half after a warm-up round."""
    import onnxruntime as ort


    def stop_spinning(options: ort.SessionOptions) -> None:
        # Two sessions run in turns: one's pool threads must not spin on the 2nd core through the other's run.
        # Within a run they spin as usual (between a step's nodes); after it they sleep.
        options.add_session_config_entry("session.force_spinning_stop", "1")

    def open_alone(path: Path) -> ort.InferenceSession:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.enable_cpu_mem_arena = False  # as LfmSession
        options.log_severity_level = 3
        stop_spinning(options)
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    rng = np.random.default_rng(seed)
    rows = []
    parent = Path(bundle).resolve().parent  # the same file system as the weights, so they are linked, not copied
    with tempfile.TemporaryDirectory(dir=parent if os.access(parent, os.W_OK) else None) as tmp:
        path = weights_only_graph(Path(bundle), Path(tmp))
        for half, count in enumerate((rounds - rounds // 2, rounds // 2)):
            if not count:
                continue
            opened = []
            for which in ("step", "weights") if half == 0 else ("weights", "step"):
                opened.append(LfmSession(bundle, threads=threads, providers="cpu", verify="none",
                                         configure=stop_spinning) if which == "step" else open_alone(path))
            session, alone = opened if half == 0 else opened[::-1]
            rows += _rounds(session, alone, count, steps, prompt, rng, progress, first=len(rows))
            del session, alone, opened
            gc.collect()
    out = {"bundle": str(bundle), "threads": threads, "steps": steps, "prompt": prompt, "rounds": rows,
           "weight_nodes": weight_nodes(bundle), "loadavg": os.getloadavg()}
    for key in ("step_ms", "weights_ms", "overhead_ms", "share"):
        out[f"median_{key}"] = statistics.median(row[key] for row in rows)
    return out


def _rounds(session, alone, rounds: int, steps: int, prompt: int, rng: np.random.Generator, progress,
            first: int) -> list[dict]:
    """`rounds` measured rounds after a warm-up one, each step of the full graph paired with a run of the kernels."""
    high = min(session.vocab_size, 30000)
    io = alone.io_binding()  # bound like Cache.step's inputs; outputs stay in onnxruntime's buffers, never wrapped
    for out in alone.get_outputs():
        io.bind_output(out.name)

    def weights_alone(feed: dict[str, np.ndarray]) -> None:
        for name, value in feed.items():
            io.bind_cpu_input(name, value)
        alone.run_with_iobinding(io)

    rows = []
    for r in range(rounds + 1):  # round 0 warms up
        ids, tokens = rng.integers(100, high, (1, prompt)), rng.integers(100, high, steps)
        feeds = [_feeds(alone, 1, rng) for _ in range(steps)]
        cache = session.new_cache(1, prompt + steps)
        cache.step(ids)
        pairs = []
        for n, (t, feed) in enumerate(zip(tokens, feeds, strict=True)):
            timed = {}
            for which in (("step", "weights") if n % 2 else ("weights", "step")):
                start = time.perf_counter()
                cache.step(np.array([[t]])) if which == "step" else weights_alone(feed)
                timed[which] = time.perf_counter() - start
            pairs.append((timed["step"] * 1000, timed["weights"] * 1000))
        row = {"step_ms": statistics.median(p[0] for p in pairs), "weights_ms": statistics.median(p[1] for p in pairs),
               "overhead_ms": statistics.median(a - b for a, b in pairs),
               "share": statistics.median((a - b) / a for a, b in pairs)}
        progress(f"round {first + r}{' (warm-up)' if r == 0 else ''}: step {row['step_ms']:.2f} ms, weight "
                 f"kernels alone {row['weights_ms']:.2f} ms, outside them {row['overhead_ms']:.2f} ms "
                 f"({row['share']:.1%})")
        if r:
            rows.append(row)
    return rows


def write_plot(result: dict, path: Path) -> None:
    """Per round: the weight kernels alone and the time outside them, stacked to the decode step, with the share."""
    rows = result["rounds"]
    x = range(1, len(rows) + 1)
    title = (f"{Path(result['bundle']).name}: {result['median_overhead_ms']:.2f} ms = "
             f"{result['median_share']:.1%} of a step outside the weight kernels")
    with figure(path, size=(7.5, 4.4)) as (_, ax):
        ax.bar(x, [r["weights_ms"] for r in rows], color="#4c72b0", label="QMoE + MatMulNBits alone")
        ax.bar(x, [r["overhead_ms"] for r in rows], bottom=[r["weights_ms"] for r in rows], color="#dd8452",
               label="outside them")
        for i, r in zip(x, rows, strict=True):
            ax.annotate(f"{r['share']:.0%}", (i, r["weights_ms"] + max(r["overhead_ms"], 0)), ha="center",
                        va="bottom", fontsize=8)
        ax.set(xlabel="round (medians of its steps)", ylabel="ms per decoded token")
        ax.set_title(title, fontsize=10)
        if len(rows) <= 20:
            ax.set_xticks(list(x))
        else:
            whole_numbers(ax.xaxis)
        ax.set_ylim(0, max(r["weights_ms"] + max(r["overhead_ms"], 0) for r in rows) * 1.1)  # room for the shares
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2)  # below: over no bar


def weight_nodes(bundle: Path) -> dict[str, int]:
    """The bundle's weight kernels by op type."""
    import onnx

    nodes = onnx.load(Path(bundle) / "model.onnx", load_external_data=False).graph.node
    return dict(Counter(n.op_type for n in nodes if n.op_type in WEIGHT_OPS))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lfm_edge.device_bench.studies.overhead", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", metavar="FILE", help="write the result as JSON, and a plot beside it (.png)")
    args = parser.parse_args(argv)
    if argv is None:

        reexec_with_hugepages()  # as lfm-bench, ab.py and step_profile measure
    result = measure(Path(args.bundle), args.rounds, args.steps, args.prompt, args.threads,
                     progress=lambda m: print(f"  {m}", file=sys.stderr, flush=True))
    print(f"{args.bundle}: decode step {result['median_step_ms']:.2f} ms; its {sum(result['weight_nodes'].values())} "
          f"weight kernels alone {result['median_weights_ms']:.2f} ms; outside them "
          f"{result['median_overhead_ms']:.2f} ms = {result['median_share']:.1%} of a step "
          f"(medians of {args.rounds} alternated rounds of {args.steps} steps)")
    if args.json:
        write_text(args.json, json.dumps(result, indent=2))
        write_plot(result, Path(args.json).with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
