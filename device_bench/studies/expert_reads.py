"""What a decode step really reads of the routed experts, counted from the router, against what the geometry
says (export/footprint.py: each MoE layer's experts at top_k / num_experts of their size).

    python -m lfm_edge.device_bench.studies.expert_reads BUNDLE [--prompt 64] [--decode 128] [--out DIR]

A graph from lfm-export does not output its routing, so this writes a view of the bundle beside it (hard links to
its files and a copy of model.onnx whose outputs also include each MoE node's router scores), decodes greedily
through the runtime, then runs the prompt and the decoded tokens once more through the view and reads, at every
position, the experts each MoE layer chose: the top k of the scores the MoE node receives (onnxruntime's MoE
kernels pick them so; their softmax keeps the order). Reported per decode step: the distinct experts read, the
ones the previous token had not read (what a token would read if the previous token's experts were still in a
cache), the experts touched over the run, and the bytes each comes to. Writes expert_reads.json and
expert_reads.md in DIR.
"""

from __future__ import annotations

import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx  # the view rewrites the graph: a desktop study, never a phone's

from ...runtime.backends.python import ELEMENT_TYPES, LfmSession
from ...runtime.bundle import token_bytes
from ...runtime.generate import generate
from ..common import link_view
from ..roofline import random_weights_preset
from . import parser, write_result

MOE_OPS = ("MoE", "QMoE")
_NUMPY = {onnx.TensorProto.FLOAT: 4, onnx.TensorProto.FLOAT16: 2, onnx.TensorProto.UINT8: 1,
          onnx.TensorProto.INT8: 1, onnx.TensorProto.INT64: 8, onnx.TensorProto.INT32: 4}


@dataclass(frozen=True)
class MoeNode:
    """One MoE node of a graph: the router scores it takes, its k, and one expert's bytes (all its expert tensors
    over the number of experts)."""

    layer: str  # the experts' initializer prefix, e.g. model.layers.2.feed_forward
    scores: str
    k: int
    experts: int
    expert_bytes: int


def moe_nodes(graph: onnx.GraphProto) -> list[MoeNode]:
    sizes = {t.name: int(np.prod(t.dims)) * _NUMPY.get(t.data_type, 4) for t in graph.initializer}
    dims = {t.name: list(t.dims) for t in graph.initializer}
    found = []
    for node in graph.node:
        if node.op_type not in MOE_OPS:
            continue
        weights = [name for name in node.input[2:] if name in sizes]  # fc1/fc2 weights, scales, zero points
        if not weights:
            raise ValueError(f"{node.name}: no expert initializers among its inputs {list(node.input)}")
        experts = dims[weights[0]][0]
        k = next(a.i for a in node.attribute if a.name == "k")
        found.append(MoeNode(layer=weights[0].split(".experts.")[0], scores=node.input[1], k=k, experts=experts,
                             expert_bytes=sum(sizes[w] for w in weights) // experts))
    return found


def routing_view(bundle: Path, folder: Path) -> list[MoeNode]:
    """A bundle in `folder` that is `bundle` (its files linked) with each MoE node's router scores as outputs."""
    model = onnx.load(str(bundle / "model.onnx"), load_external_data=False)
    nodes = moe_nodes(model.graph)
    for node in nodes:
        model.graph.output.append(onnx.helper.make_tensor_value_info(node.scores, onnx.TensorProto.FLOAT, None))
    link_view(bundle, folder, skip={"model.onnx"}, hard=True)
    onnx.save(model, str(folder / "model.onnx"))
    return nodes


def scores_over(session: LfmSession, tokens: list[int], nodes: list[MoeNode]) -> list[np.ndarray]:
    """Each MoE node's router scores [len(tokens), experts], from one pass over `tokens` from an empty state."""
    n = len(tokens)
    feeds: dict[str, np.ndarray] = {"input_ids": np.array([tokens], dtype=np.int64),
                                    "attention_mask": np.ones((1, n), dtype=np.int64)}
    for i in session.session.get_inputs():
        if i.name not in feeds:  # conv and KV state: batch 1, every symbolic length n, zeros
            shape = [1 if d == "batch_size" else d if isinstance(d, int) else n for d in i.shape]
            feeds[i.name] = np.zeros(shape, dtype=ELEMENT_TYPES.get(i.type, np.float32))
    out = session.session.run([node.scores for node in nodes], feeds)
    return [np.asarray(s, dtype=np.float32).reshape(n, -1) for s in out]


def count(scores: list[np.ndarray], nodes: list[MoeNode], first: int) -> dict:
    """Per decode position from `first` on: distinct experts read per layer, those the previous position had not
    read, and their bytes; the experts each layer touched over those positions."""
    layers = []
    for s, node in zip(scores, nodes, strict=True):
        chosen = [set(row) for row in np.argsort(-s, axis=1, kind="stable")[:, :node.k].tolist()]
        steps = range(max(first, 1), len(chosen))
        distinct = [len(chosen[t]) for t in steps]
        fresh = [len(chosen[t] - chosen[t - 1]) for t in steps]
        layers.append({"layer": node.layer, "k": node.k, "experts": node.experts, "expert_bytes": node.expert_bytes,
                       "distinct_per_step": {"min": min(distinct), "max": max(distinct),
                                             "mean": float(np.mean(distinct))},
                       "not_read_by_previous_step": float(np.mean(fresh)),
                       "touched_over_run": len(set().union(*(chosen[t] for t in steps)))})
    steps = len(range(max(first, 1), len(scores[0])))
    counted = sum(x["distinct_per_step"]["mean"] * x["expert_bytes"] for x in layers)
    geometry = sum(x["k"] * x["expert_bytes"] for x in layers)
    fresh = sum(x["not_read_by_previous_step"] * x["expert_bytes"] for x in layers)
    return {"steps": steps, "layers": layers, "routed_bytes_per_step": {
        "geometry": geometry, "counted": counted, "not_read_by_previous_step": fresh}}


def measure(bundle: Path, prompt: int = 64, decode: int = 128, threads: int = 2, seed: int = 0) -> dict:
    # beside the bundle, so that its files can be hard-linked (one file system)
    with tempfile.TemporaryDirectory(prefix=".expert-reads-", dir=bundle.resolve().parent) as tmp:
        nodes = routing_view(bundle, Path(tmp))
        if not nodes:
            raise ValueError(f"{bundle / 'model.onnx'}: no MoE node ({' or '.join(MOE_OPS)}): a dense model, or the "
                             "portable op set, whose routing is not one node")
        session = LfmSession(tmp, threads=threads, verify="none")
        rng = np.random.default_rng(seed)
        ids = rng.integers(100, min(session.vocab_size, 30000), prompt).tolist()
        new = generate(session, [ids], decode, eos_token_ids=[])[0]
        result = count(scores_over(session, ids + new, nodes), nodes, first=len(ids))
    recorded = token_bytes(bundle)
    total = recorded.total if recorded is not None else None
    per_step = result["routed_bytes_per_step"]
    result.update(bundle=str(bundle), prompt=prompt, decode=decode, threads=threads,
                  manifest_bytes_per_token=total,
                  counted_bytes_per_token=total - per_step["geometry"] + per_step["counted"] if total else None,
                  random_weights=random_weights_preset(bundle) is not None)
    return result


def markdown(r: dict) -> str:
    b, mb = r["routed_bytes_per_step"], 1e6
    lines = [f"# Experts read per decode step: {r['bundle']}", "",
             f"{r['decode']} greedy steps after a {r['prompt']}-token prompt"
             f"{' (random weights)' if r['random_weights'] else ''}; the chosen experts are the top k of each MoE "
             "node's router scores.", "",
             "| routed experts per step | MB |", "|---|---|",
             f"| the geometry (top_k of each layer's experts) | {b['geometry'] / mb:,.1f} |",
             f"| counted: distinct experts each step read | {b['counted'] / mb:,.1f} |",
             f"| of those, not read by the step before | {b['not_read_by_previous_step'] / mb:,.1f} |", ""]
    if r["manifest_bytes_per_token"]:
        lines += [f"Bytes per token: manifest {r['manifest_bytes_per_token'] / mb:,.1f} MB, counted "
                  f"{r['counted_bytes_per_token'] / mb:,.1f} MB.", ""]
    lines += ["| layer | k / experts | distinct per step (min-max) | not read by the step before (mean) | "
              "touched over the run | MB per expert |", "|---|---|---|---|---|---|"]
    for x in r["layers"]:
        d = x["distinct_per_step"]
        lines.append(f"| {x['layer']} | {x['k']} / {x['experts']} | {d['min']}-{d['max']} | "
                     f"{x['not_read_by_previous_step']:.2f} | {x['touched_over_run']} | {x['expert_bytes'] / mb:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = parser(__file__, __doc__)
    p.add_argument("bundle")
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--decode", type=int, default=128)
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--out", default="build/expert-reads")
    args = p.parse_args(argv)
    try:
        result = measure(Path(args.bundle), args.prompt, args.decode, args.threads)
    except (OSError, ValueError) as e:
        print(f"expert_reads: error: {e}", file=sys.stderr)
        return 2
    write_result(args.out, "expert_reads", result, markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
