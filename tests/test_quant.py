"""Quantized weights: packing that onnxruntime's kernels read bit for bit, and INT4 exports that match the
torch reference with the same fake quantization."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from genai_greedy import genai_greedy
from lfm_edge.export.checkpoint import Checkpoint
from lfm_edge.export.exporter import ExportError, export
from lfm_edge.export.reference import TorchReference
from lfm_edge.quant.blocks import quantize
from lfm_edge.quant.policy import get_policy
from lfm_edge.runtime.generate import generate
from lfm_edge.runtime.session import Cache, LfmSession
from tiny_models import CONFIGS, build

RNG = np.random.default_rng(0)


def _run(node, inputs: dict[str, np.ndarray], inits: list, out_shape) -> np.ndarray:
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype),
                                                                          v.shape) for k, v in inputs.items()],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, out_shape)], inits)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, inputs)[0]


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("method", ["rtn", "rtn-asym", "mse"])
@pytest.mark.parametrize("n, k, block", [(37, 80, 32), (48, 64, 16), (130, 200, 64), (20, 256, 128)])
def test_matmulnbits_reads_our_packing(bits, method, n, k, block):
    w = RNG.standard_normal((n, k)).astype(np.float32)
    q = quantize(w, bits, block, method)
    inits = [numpy_helper.from_array(q.packed_codes(), "B"), numpy_helper.from_array(q.scales, "S")]
    names = ["A", "B", "S"]
    if q.zero_points is not None:
        inits.append(numpy_helper.from_array(q.packed_zero_points(), "Z"))
        names.append("Z")
    node = helper.make_node("MatMulNBits", names, ["Y"], domain="com.microsoft", K=k, N=n, bits=bits,
                            block_size=block, accuracy_level=0)
    a = RNG.standard_normal((3, k)).astype(np.float32)
    np.testing.assert_allclose(_run(node, {"A": a}, inits, [3, n]), a @ q.dequantize().T, atol=1e-4, rtol=0)
    # and the quantization itself is sane: error well under the weights' spread
    assert np.abs(q.dequantize() - w).mean() < (0.15 if bits == 4 else 0.01)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("method", ["rtn", "rtn-asym"])
def test_gather_block_quantized_reads_the_lm_head_codes(bits, method):
    v, h = 50, 72  # h not a multiple of the block: rows come back padded and are sliced
    q = quantize(RNG.standard_normal((v, h)).astype(np.float32), bits, 32, method)
    inits = [numpy_helper.from_array(q.packed_codes(), "W"), numpy_helper.from_array(q.scales[..., None], "S")]
    names = ["W", "ids", "S"]
    if q.zero_points is not None:
        inits.append(numpy_helper.from_array(q.zero_points[..., None], "Z"))
        names.append("Z")
    node = helper.make_node("GatherBlockQuantized", names, ["Y"], domain="com.microsoft", bits=bits, block_size=32,
                            gather_axis=0, quantize_axis=2)
    ids = np.array([[3, 0, 49, 7]], np.int64)
    rows = _run(node, {"ids": ids}, inits, [1, 4, 3, 32]).reshape(1, 4, -1)[..., :h]
    np.testing.assert_array_equal(rows, q.dequantize()[ids])


def test_mse_search_lowers_the_error():
    w = RNG.standard_t(4, (256, 512)).astype(np.float32)  # heavy tails, like trained weights
    errors = {m: np.square(quantize(w, 4, 32, m).dequantize() - w).mean() for m in ("rtn", "rtn-asym", "mse")}
    assert errors["mse"] < errors["rtn-asym"] < errors["rtn"]


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def int4_case(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    build(request.param, root / "ckpt", seed=3)
    policy = get_policy("int4").with_overrides(accuracy_level=0)  # fp32 activations: exact against fake-quant
    bundle = export(root / "ckpt", root / "int4", quant=policy).bundle
    return root / "ckpt", bundle, policy


def test_int4_export_matches_fake_quant_reference(int4_case):
    ckpt, bundle, policy = int4_case
    reference = TorchReference(Checkpoint(ckpt), transform=policy.fake_quant)
    prompt = list(range(7, 20))
    want = reference.forward(torch.tensor([prompt]), reference.new_state(1)).numpy().ravel()
    got = Cache(LfmSession(bundle), 1, 16).step(np.array([prompt])).ravel()
    assert float(got @ want / np.linalg.norm(got) / np.linalg.norm(want)) >= 0.9999
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    assert generate(LfmSession(bundle), [prompt], 32, eos_token_ids=[])[0] == \
        reference.generate(torch.tensor([prompt]), 32)[0].tolist()


def test_int4_bundle_holds_no_float_vocabulary(int4_case):
    ckpt, bundle, _ = int4_case
    cfg = Checkpoint(ckpt).config
    model = onnx.load(bundle / "model.onnx", load_external_data=False)
    floats = {i.name: list(i.dims) for i in model.graph.initializer if i.data_type == TensorProto.FLOAT}
    assert not [n for n, d in floats.items() if int(np.prod(d)) >= cfg.vocab_size * cfg.hidden_size]
    ops = {n.op_type for n in model.graph.node}
    assert "MatMulNBits" in ops and "GatherBlockQuantized" in ops
    if cfg.is_moe:
        assert "QMoE" in ops
        gates = [n for n in floats if n.endswith("feed_forward.gate.weight.T")]
        assert len(gates) == cfg.num_hidden_layers - cfg.num_dense_layers  # the router stays fp32
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["quant"] == "int4" and manifest["quant_policy"]["experts"]["bits"] == 4


def test_genai_runs_the_int4_bundle_like_our_runtime(tmp_path):
    pytest.importorskip("onnxruntime_genai")
    build("moe_mixed", tmp_path / "ckpt")
    bundle = export(tmp_path / "ckpt", tmp_path / "int4", quant="int4").bundle  # accuracy_level 4
    prompt = list(range(9, 22))
    ours = generate(LfmSession(bundle), [prompt], 24, eos_token_ids=[])[0]
    theirs = genai_greedy(bundle, prompt, 24)
    assert theirs == ours


def test_quantized_export_needs_contrib_ops(tmp_path):
    build("moe_mixed", tmp_path / "ckpt")
    with pytest.raises(ExportError, match="--quant int4 needs --ops contrib"):
        export(tmp_path / "ckpt", tmp_path / "out", quant="int4", ops="portable")
