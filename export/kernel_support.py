"""Whether the installed onnxruntime runs the quantized kernels a policy needs, asked of onnxruntime itself.

The contrib schemas accept more than the CPU kernels run (onnxruntime 1.32's QMoE schema lists 2/3/4/8 bits
and per-projection widths; its CPU kernel refuses mixed widths and runs 3 bits only with fp16 activations), so
before any tracing the exporter builds each kernel the policy needs as a one-node graph with tiny random
weights in the layout the export would write, and runs it once. A refusal becomes an ExportError naming the
policy, the op, its settings and the onnxruntime version, with onnxruntime's own reason.
"""

from __future__ import annotations

from functools import cache

import numpy as np

from ..quant.blocks import quantize
from ..quant.policy import Policy, QuantSpec

QMOE_FP16_BITS = (3,)  # QMoE widths onnxruntime's CPU kernel runs only with fp16 activations (weights_prepacked=0)


def check_policy(policy: Policy) -> None:
    """Raise ValueError when the installed onnxruntime cannot run a kernel `policy` needs."""
    import onnxruntime as ort

    needs = []
    if policy.experts is not None:
        s = policy.experts
        settings = (f"fc1 (w1/w3) {s.bits} bits, fc2 (w2) {s.down_bits or s.bits} bits, block {s.block_size}, "
                    f"method {s.method}")
        needs.append(("QMoE", settings, lambda: _qmoe(s, policy.accuracy_level)))
    for spec, what, op in ((policy.linears, "linears", "MatMulNBits"), (policy.embedding, "embedding", "MatMulNBits"),
                           (policy.embedding, "embedding", "GatherBlockQuantized"),
                           (policy.rescore and policy.rescore.spec, "vocabulary rescoring copy",
                            "GatherBlockQuantized")):
        if spec is not None:
            needs.append((op, f"{what} {spec.bits} bits, block {spec.block_size}, method {spec.method}",
                          lambda spec=spec, op=op: _dense(op, spec, policy.accuracy_level)))
    for op, settings, probe in needs:
        error = probe()
        if error:
            raise ValueError(f"--quant {policy.name}: onnxruntime {ort.__version__} cannot run com.microsoft.{op} "
                             f"with {settings} on the CPU ({error})")


def _qmoe(spec: QuantSpec, accuracy_level: int) -> str | None:
    return _qmoe_cached(spec.bits, spec.down_bits or spec.bits, spec.block_size, spec.method, accuracy_level)


@cache
def _qmoe_cached(fc1_bits: int, fc2_bits: int, block: int, method: str, accuracy_level: int) -> str | None:
    from onnx import TensorProto, helper

    e, h, i = 2, block, block
    rng = np.random.default_rng(0)
    fp16 = fc1_bits in QMOE_FP16_BITS or fc2_bits in QMOE_FP16_BITS
    act = TensorProto.FLOAT16 if fp16 else TensorProto.FLOAT
    q1 = [quantize(rng.standard_normal((2 * i, h)).astype(np.float32), fc1_bits, block, method, np.float16)
          for _ in range(e)]
    q2 = [quantize(rng.standard_normal((h, i)).astype(np.float32), fc2_bits, block, method, np.float16)
          for _ in range(e)]
    inits = {"f1": _stack_codes(q1), "s1": np.stack([q.scales for q in q1]).astype(np.float16),
             "f2": _stack_codes(q2), "s2": np.stack([q.scales for q in q2]).astype(np.float16)}
    names = ["x", "p", "f1", "s1", "", "f2", "s2", "", "", "", "", "", ""]
    if q1[0].zero_points is not None:
        inits["z1"] = np.stack([q.packed_zero_points() for q in q1])
        inits["z2"] = np.stack([q.packed_zero_points() for q in q2])
        names[11:13] = ["z1", "z2"]
    attrs = dict(k=1, activation_type="swiglu", swiglu_fusion=1, activation_alpha=1.0, activation_beta=0.0,
                 normalize_routing_weights=1, expert_weight_bits=fc1_bits, block_size=block,
                 accuracy_level=accuracy_level)
    if fc2_bits != fc1_bits:
        attrs["fc2_expert_weight_bits"] = fc2_bits
    if fp16:
        attrs["weights_prepacked"] = 0
    node = helper.make_node("QMoE", names, ["y"], domain="com.microsoft", **attrs)
    dtype = np.float16 if fp16 else np.float32
    feeds = {"x": rng.standard_normal((1, h)).astype(dtype), "p": rng.standard_normal((1, e)).astype(dtype)}
    return _run(node, feeds, inits, act)


@cache
def _dense_cached(op: str, bits: int, block: int, method: str, accuracy_level: int) -> str | None:
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    n, k = 8, block
    q = quantize(rng.standard_normal((n, k)).astype(np.float32), bits, block, method)
    inits = {"B": q.packed_codes()}
    if op == "MatMulNBits":
        inits["S"] = q.scales
        names = ["A", "B", "S"] + (["Z"] if q.zero_points is not None else [])
        node = helper.make_node(op, names, ["y"], domain="com.microsoft", K=k, N=n, bits=bits, block_size=block,
                                accuracy_level=accuracy_level)
        feeds = {"A": rng.standard_normal((1, k)).astype(np.float32)}
    else:
        inits["S"] = q.scales[..., None]
        names = ["B", "A", "S"] + (["Z"] if q.zero_points is not None else [])
        node = helper.make_node(op, names, ["y"], domain="com.microsoft", bits=bits, block_size=block, gather_axis=0,
                                quantize_axis=2)
        feeds = {"A": np.array([[0, n - 1]], np.int64)}
    if q.zero_points is not None:
        inits["Z"] = q.packed_zero_points() if op == "MatMulNBits" else q.zero_points[..., None]
    return _run(node, feeds, inits, TensorProto.FLOAT)


def _dense(op: str, spec: QuantSpec, accuracy_level: int) -> str | None:
    layout = "mse" if spec.method == "gptq" else spec.method  # GPTQ's codes sit in mse's layout (quant/blocks.py)
    return _dense_cached(op, spec.bits, spec.block_size, layout, accuracy_level)


def _stack_codes(qs: list) -> np.ndarray:
    return np.stack([q.packed_codes().reshape(q.codes.shape[0], -1) for q in qs])


def _run(node, feeds: dict[str, np.ndarray], inits: dict[str, np.ndarray], out_type: int) -> str | None:
    """None when onnxruntime builds and runs the one-node graph to a finite result, else its reason."""
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    inputs = [helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
              for k, v in feeds.items()]
    graph = helper.make_graph([node], "probe", inputs, [helper.make_tensor_value_info("y", out_type, None)],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    options = ort.SessionOptions()
    options.log_severity_level = 4  # the refusal is reported by us, with its reason
    try:
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        y = session.run(None, feeds)[0]
    except Exception as e:  # onnxruntime raises its own exception types, one per status code
        text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return text.split("Status Message: ")[-1].split("] ")[-1][:300]
    return None if np.isfinite(np.asarray(y, np.float32)).all() else "non-finite output"
