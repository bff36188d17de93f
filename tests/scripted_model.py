"""A bundle whose model says exactly what a test scripts, to test the loops around a model, not its luck.

The graph follows the bundle contract (input_ids, attention_mask, a conv state in and out, logits) and runs
in a real onnxruntime session; its logits pick, for the token at absolute position p, the scripted token
for position p + 1 (EOS where nothing is scripted). Tests script each round of a conversation at the
position its prompt ends.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

HIDDEN = 4


def write_bundle(folder: Path, tokenizer_folder: Path, script: dict[int, int], vocab: int, eos: int,
                 max_positions: int = 2048, step_work: int = 0, second_choices: dict[int, float] | None = None) -> Path:
    """`script` maps an absolute position to the token the model emits there. `step_work` n > 0 adds an
    n x n matrix product to every step, computed from the input so it cannot be folded away and added to
    the logits times zero: a model that takes real time per token, for tests that must act mid-answer.
    `second_choices` {token: logit} (below the scripted 10): what the model picks at every position where a
    constraint forbids its first choice."""
    folder.mkdir(parents=True, exist_ok=True)
    table = np.full((max_positions + 1, vocab), -10.0, np.float32)
    table[:, eos] = 10.0
    for position, token in script.items():
        table[position] = -10.0
        table[position, token] = 10.0
    for token, logit in (second_choices or {}).items():
        table[:, token] = np.maximum(table[:, token], logit)
    i64 = lambda v: numpy_helper.from_array(np.array(v, np.int64))  # noqa: E731
    nodes = [
        helper.make_node("Shape", ["input_ids"], ["ids_shape"]),
        helper.make_node("Gather", ["ids_shape", "one"], ["s"], axis=0),
        helper.make_node("Shape", ["attention_mask"], ["mask_shape"]),
        helper.make_node("Gather", ["mask_shape", "one"], ["t"], axis=0),
        helper.make_node("Sub", ["t", "s"], ["first"]),
        helper.make_node("Add", ["first", "one"], ["first_next"]),
        helper.make_node("Add", ["t", "one"], ["end_next"]),
        helper.make_node("Range", ["first_next", "end_next", "one"], ["next_positions"]),
        helper.make_node("Gather", ["table", "next_positions"], ["rows"], axis=0),  # [S, V]
        helper.make_node("Unsqueeze", ["rows", "zero_axis"], ["rows3"]),
        helper.make_node("Gather", ["ids_shape", "zero"], ["b"], axis=0),
        helper.make_node("Unsqueeze", ["b", "zero_axis"], ["b1"]),
        helper.make_node("Concat", ["b1", "ones2"], ["expand_shape"], axis=0),
        helper.make_node("Expand", ["rows3", "expand_shape"], ["scripted_logits"]),
        helper.make_node("Identity", ["past.0.conv"], ["present.0.conv"]),
    ]
    inits = [numpy_helper.from_array(table, "table"), i64(1), i64(0), i64([0]), i64([1, 1])]
    for init, name in zip(inits[1:], ("one", "zero", "zero_axis", "ones2"), strict=True):
        init.name = name
    if step_work:
        work = numpy_helper.from_array(np.random.default_rng(0).standard_normal((step_work, step_work)).astype(
            np.float32) / step_work, "work")
        inits += [work, numpy_helper.from_array(np.array(0.0, np.float32), "nothing")]
        nodes += [helper.make_node("Cast", ["t"], ["t_float"], to=TensorProto.FLOAT),
                  helper.make_node("Mul", ["work", "t_float"], ["scaled"]),
                  helper.make_node("MatMul", ["scaled", "work"], ["product"]),
                  helper.make_node("ReduceSum", ["product"], ["total"], keepdims=0),
                  helper.make_node("Mul", ["total", "nothing"], ["zero_total"]),
                  helper.make_node("Add", ["scripted_logits", "zero_total"], ["logits"])]
    else:
        nodes.append(helper.make_node("Identity", ["scripted_logits"], ["logits"]))
    graph = helper.make_graph(
        nodes, "scripted",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch_size", "total_sequence_length"]),
         helper.make_tensor_value_info("past.0.conv", TensorProto.FLOAT, ["batch_size", HIDDEN, 2])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch_size", "sequence_length", vocab]),
         helper.make_tensor_value_info("present.0.conv", TensorProto.FLOAT, ["batch_size", HIDDEN, 2])],
        inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save_model(model, folder / "model.onnx")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(tokenizer_folder / name, folder / name)
    (folder / "genai_config.json").write_text(json.dumps({
        "model": {"context_length": max_positions, "eos_token_id": eos, "pad_token_id": 0, "vocab_size": vocab,
                  "decoder": {"filename": "model.onnx", "layer_types": ["conv"]}},
        "search": {"past_present_share_buffer": False}}))
    return folder
