"""device_bench/studies/expert_reads.py: the experts each decode step reads, taken from the router scores a view of
the bundle outputs, are the experts transformers' reference routes to, and the bytes they come to are counted."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from shared_bundles import demo_bundle
from transformers import AutoModelForCausalLM

from lfm_edge.device_bench.studies import expert_reads
from lfm_edge.export.cli import demo_model_path
from lfm_edge.runtime.backends.python import LfmSession
from lfm_edge.runtime.bundle import token_bytes

TOKENS = [5, 17, 99, 3, 250, 41, 8, 1200, 77, 311, 64, 2, 905, 18, 430, 11]


@pytest.mark.parametrize("kind", ["fp32", "android"])  # the MoE op and the phone's int4 QMoE
def test_view_routes_tokens_to_the_reference_experts(kind, tmp_path_factory, tmp_path):
    bundle = demo_bundle(tmp_path_factory.getbasetemp(), kind)
    view = tmp_path / "view"
    view.mkdir()
    nodes = expert_reads.routing_view(bundle, view)
    config = json.loads((bundle / "config.json").read_text())
    moe_layers = [i for i in range(config["num_hidden_layers"]) if i >= config["num_dense_layers"]]
    assert [n.layer for n in nodes] == [f"model.layers.{i}.feed_forward" for i in moe_layers]
    assert {n.k for n in nodes} == {config["num_experts_per_tok"]}
    assert {n.experts for n in nodes} == {config["num_experts"]}
    # the experts' share of the manifest's bytes per token is the geometry the count starts from
    assert sum(n.k * n.expert_bytes for n in nodes) == pytest.approx(
        token_bytes(bundle).by_kind["experts (routed)"], rel=1e-3)

    scores = expert_reads.scores_over(LfmSession(view, verify="none"), TOKENS, nodes)
    ours = [[set(row) for row in np.argsort(-s, axis=1)[:, :n.k].tolist()] for s, n in zip(scores, nodes, strict=True)]

    model = AutoModelForCausalLM.from_pretrained(demo_model_path()).eval()
    chosen: list[torch.Tensor] = []
    hooks = [model.model.layers[i].feed_forward.gate.register_forward_hook(lambda m, a, out: chosen.append(out[2]))
             for i in moe_layers]
    with torch.no_grad():
        model(torch.tensor([TOKENS]))
    for h in hooks:
        h.remove()
    want = [[set(row) for row in c.tolist()] for c in chosen]
    if kind == "fp32":
        assert ours == want
    else:  # int4 weights move the router's inputs: most choices still agree
        agree = np.mean([a == b for o, w in zip(ours, want, strict=True) for a, b in zip(o, w, strict=True)])
        assert agree >= 0.8


def test_count_reads_the_chosen_experts_bytes():
    nodes = [expert_reads.MoeNode(layer="a", scores="s", k=2, experts=4, expert_bytes=100)]
    # positions 0-1 are the prompt; steps 2, 3, 4 choose {0,1} (after {0,1}), {1,2} and {3,0}
    scores = [np.array([[0, 0, 1, 1], [9, 8, 0, 0], [9, 8, 0, 0], [0, 9, 8, 0], [8, 0, 0, 9]], dtype=np.float32)]
    result = expert_reads.count(scores, nodes, first=2)
    layer = result["layers"][0]
    assert result["steps"] == 3
    assert layer["distinct_per_step"] == {"min": 2, "max": 2, "mean": 2.0}
    assert layer["not_read_by_previous_step"] == pytest.approx((0 + 1 + 2) / 3)
    assert layer["touched_over_run"] == 4
    assert result["routed_bytes_per_step"] == {"geometry": 200, "counted": 200.0,
                                               "not_read_by_previous_step": pytest.approx(100.0)}


def test_study_reports_a_demo_bundle(tmp_path_factory, tmp_path, capsys):
    bundle = demo_bundle(tmp_path_factory.getbasetemp(), "int4")  # QMoE, as android's; the fast tier's shared one
    assert expert_reads.main([str(bundle), "--prompt", "8", "--decode", "12", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "expert_reads.json").read_text())
    assert result["steps"] == 12
    assert result["counted_bytes_per_token"] == pytest.approx(result["manifest_bytes_per_token"], rel=1e-3)
    assert "| counted: distinct experts each step read |" in capsys.readouterr().out
    assert not [p for p in bundle.parent.iterdir() if p.name.startswith(".expert-reads-")]  # the view is gone


@pytest.mark.slow
def test_study_names_a_dense_bundle(tmp_path_factory, tmp_path, capsys):
    bundle = demo_bundle(tmp_path_factory.getbasetemp(), "portable")  # routing spelled out, no MoE node
    assert expert_reads.main([str(bundle), "--out", str(tmp_path)]) == 2
    assert "no MoE node" in capsys.readouterr().err
