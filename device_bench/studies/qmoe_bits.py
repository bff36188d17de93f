"""One QMoE layer at LFM2.5-8B-A1B widths (32 experts, top 4, H 2048, I 1792), one token, by weight bits.

Fewer bits pay only if the kernel for them streams bytes as fast as the 4-bit one; onnxruntime 1.32's CPU
QMoE has different paths per width (2 bits: a LUT kernel; 3 bits: fp16 activations, dequantized weights), so
this times each in one process, in turns, with random codes (speed does not depend on their values).

    python -m lfm_edge.device_bench.studies.qmoe_bits [--rounds 12] [--threads 2]

Pool threads do not spin between runs (several sessions share the cores; spinning ones would steal them).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

E, H, WIDTH, K = 32, 2048, 1792, 4  # experts, hidden, expert width, top k
CONFIGS = [(4, 256), (4, 128), (4, 64), (3, 128), (3, 64), (2, 256), (2, 128), (2, 64), (8, 128)]  # (bits, block)


def session(bits: int, block: int, threads: int, layers: int = 2, seed: int = 0):
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    fp16 = bits == 3  # the only 3-bit CPU path (quant/README.md)
    act = TensorProto.FLOAT16 if fp16 else TensorProto.FLOAT
    nodes, inits, x = [], [], "x"
    for n in range(layers):
        arrays = {f"f1_{n}": rng.integers(0, 256, (E, 2 * WIDTH, H * bits // 8), dtype=np.uint8),
                  f"s1_{n}": (rng.random((E, 2 * WIDTH, H // block)) * 0.01).astype(np.float16),
                  f"f2_{n}": rng.integers(0, 256, (E, H, WIDTH * bits // 8), dtype=np.uint8),
                  f"s2_{n}": (rng.random((E, H, WIDTH // block)) * 0.01).astype(np.float16)}
        inits += [numpy_helper.from_array(a, name) for name, a in arrays.items()]
        nodes.append(helper.make_node(
            "QMoE", [x, "p", f"f1_{n}", f"s1_{n}", "", f"f2_{n}", f"s2_{n}"], [f"y{n}"], domain="com.microsoft",
            k=K, activation_type="swiglu", swiglu_fusion=1, activation_alpha=1.0, activation_beta=0.0,
            normalize_routing_weights=1, expert_weight_bits=bits, block_size=block, accuracy_level=0 if fp16 else 4,
            weights_prepacked=0 if fp16 else None))
        x = f"y{n}"
    graph = helper.make_graph(nodes, "qmoe", [helper.make_tensor_value_info("x", act, [1, H]),
                                              helper.make_tensor_value_info("p", act, [1, E])],
                              [helper.make_tensor_value_info(x, act, None)], inits)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"]), layers


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lfm_edge.device_bench.studies.qmoe_bits", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    sessions = {c: session(*c, args.threads) for c in CONFIGS}
    rng = np.random.default_rng(1)
    times: dict[tuple[int, int], list[float]] = {c: [] for c in CONFIGS}
    for r in range(args.rounds):
        for c in CONFIGS if r % 2 else CONFIGS[::-1]:
            sess, layers = sessions[c]
            dtype = np.float16 if c[0] == 3 else np.float32
            feeds = {"x": (rng.standard_normal((1, H)) * 0.1).astype(dtype),
                     "p": rng.standard_normal((1, E)).astype(dtype)}  # new experts every call, as in decode
            start = time.perf_counter()
            for _ in range(5):
                sess.run(None, feeds)
            times[c].append((time.perf_counter() - start) / 5 / layers * 1e6)
    print(f"loadavg {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    base = statistics.median(times[(4, 128)])
    for (bits, block), t in times.items():
        stored = K * 3 * H * WIDTH * (bits / 8 + 2 / block)  # codes and fp16 scales of the 4 chosen experts
        print(f"{bits} bits, block {block}: {statistics.median(t):.0f} us per layer [{min(t):.0f}-{max(t):.0f}], "
              f"{statistics.median(t) / base:.2f}x 4-bit block 128; {stored / 1e6:.1f} MB read")
    return 0


if __name__ == "__main__":
    sys.exit(main())
