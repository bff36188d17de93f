"""KV cache precision as an export choice (`--kv-cache`), and prefill logits for the last row only.

Real exports, real onnxruntime sessions: the int8 cache's graph takes int8 state and agrees with the fp32
cache's greedy tokens; onnxruntime-genai runs the same bundle and agrees with our runtime; the manifest says
what the cache is; bad choices fail naming the argument.
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from shared_bundles import demo_bundle as shared_bundle

from lfm_edge.export.checkpoint import Checkpoint
from lfm_edge.export.cli import demo_model_path
from lfm_edge.export.exporter import ExportError, export
from lfm_edge.export.kv_cache import kv_absmax
from lfm_edge.runtime.backends.python import Cache, LfmSession
from lfm_edge.runtime.generate import generate
from tiny_models import build

PROMPT = [1, 1055, 2041, 1279, 1067, 300, 12, 77]


@functools.cache
def demo_bundle(root: Path, kv: str, quant: str = "fp32") -> Path:
    return export(demo_model_path(), root / f"demo-{quant}-{kv}", quant=quant, kv_cache=kv).bundle


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("kv")


def _heldout_ids(bundle: Path, n: int) -> list[int]:
    from tokenizers import Tokenizer

    text = (demo_model_path() / "heldout.txt").read_text()
    return Tokenizer.from_file(str(bundle / "tokenizer.json")).encode(text).ids[:n]


@pytest.mark.slow
def test_int8_cache_is_recorded_and_typed_in_the_graph(root):
    bundle = demo_bundle(root, "int8")
    manifest = json.loads((bundle / "manifest.json").read_text())
    kv = manifest["kv_cache"]
    assert (kv["dtype"], kv["bits"], kv["quant_type"]) == ("int8", 8, "PER_CHANNEL")
    assert kv["calibration"]["tokens"] == 1024 and "pydoc_data" in kv["calibration"]["source"]
    session = ort.InferenceSession(str(bundle / "model.onnx"), providers=["CPUExecutionProvider"])
    types = {i.name: (i.type, i.shape) for i in session.get_inputs()}
    assert types["past_key_values.2.key"] == ("tensor(int8)", ["batch_size", 2, "max_sequence_length", 32])
    assert types["past.0.conv"][0] == "tensor(float)"  # conv state stays float
    assert {o.name: o.type for o in session.get_outputs()}["present.4.value"] == "tensor(int8)"
    # genai_config.json carries no field for it (onnxruntime-genai rejects unknown ones): the graph says it
    assert "kv" not in json.dumps(json.loads((bundle / "genai_config.json").read_text())["model"]["decoder"])
    fp32 = json.loads((demo_bundle(root, "fp32") / "manifest.json").read_text())["kv_cache"]
    assert fp32 == {"dtype": "float32", "bits": 32}


@pytest.mark.slow
def test_int4_cache_packs_two_values_a_byte(root):
    bundle = demo_bundle(root, "int4")
    session = LfmSession(bundle)
    cache = Cache(session, 1, 16)
    assert session.state.kv[2] == (2, 16) and cache.kv_dtype[2] == np.uint8
    cache.step(np.array([PROMPT]))
    assert cache.kv[2][0].data_type() == "tensor(uint8)"


@pytest.mark.slow
def test_int8_cache_greedy_equals_fp32_cache(root):
    """At a short prompt and at 1024 tokens of held-out text: the same 32 greedy tokens as the fp32 cache
    (quant/README.md measures the agreement at 1K-16K over 256 tokens)."""
    fp32, int8 = LfmSession(demo_bundle(root, "fp32")), LfmSession(demo_bundle(root, "int8"))
    long = _heldout_ids(demo_bundle(root, "fp32"), 1024)
    for prompt in (PROMPT, long):
        want = generate(fp32, [prompt], 32, eos_token_ids=[])[0]
        assert generate(int8, [prompt], 32, eos_token_ids=[])[0] == want
    # the logits themselves are close, not equal: the cache really is quantized
    a = Cache(fp32, 1, 64).step(np.array([PROMPT]))
    b = Cache(int8, 1, 64).step(np.array([PROMPT]))
    assert 0 < np.abs(a - b).max() < 0.5


@pytest.mark.slow
def test_int8_cache_on_int4_weights_with_a_left_padded_batch(root):
    """The phone combination: int4 weights, int8 cache; a left-padded batch equals its rows run alone."""
    session = LfmSession(demo_bundle(root, "int8", "int4"))
    prompts = [PROMPT, PROMPT[3:]]
    assert generate(session, prompts, 12, eos_token_ids=[]) == \
           [generate(session, [p], 12, eos_token_ids=[])[0] for p in prompts]


@pytest.mark.slow
def test_onnxruntime_genai_runs_the_int8_cache_bundle(root):
    pytest.importorskip("onnxruntime_genai")
    from genai_greedy import genai_greedy

    bundle = demo_bundle(root, "int8", "int4")
    ours = generate(LfmSession(bundle), [PROMPT], 24, eos_token_ids=[])[0]
    assert genai_greedy(bundle, PROMPT, 24) == ours


@pytest.mark.slow
def test_int8_cache_on_tiny_configs(tmp_path):
    """Grouped and full KV heads, head size 8 and 16, attention first and last: per-channel scales land on the
    right (head, channel), so each prompt position's next token follows the fp32 cache's. (Tiny random
    models have near-ties everywhere, so free-running greedy is not the measure here; the demo model's is.)"""
    for name in ("moe_attn_first_last_nobias", "moe_attention_only"):
        ckpt = tmp_path / name
        build(name, ckpt, seed=3)
        fp32 = LfmSession(export(ckpt, tmp_path / f"{name}-fp32").bundle)
        int8 = LfmSession(export(ckpt, tmp_path / f"{name}-int8", kv_cache="int8").bundle)
        prompt = np.random.default_rng(1).integers(3, 250, (1, 64))
        a, b = Cache(fp32, 1, 64).step(prompt), Cache(int8, 1, 64).step(prompt)
        assert (a.argmax(-1) == b.argmax(-1)).mean() >= 0.85, name
        assert np.abs(a - b).mean() < 0.05 * a.std(), name


@pytest.mark.slow
def test_key_scales_bound_every_rotary_position(root):
    """The key statistic is the rotary pair's norm before rotary: no position can exceed it. Checked on the
    cache the int8 graph wrote for 1500 tokens of held-out text (calibration: 1024 tokens of other text): the
    range is used and nothing saturates at margin 1.25."""
    bundle = demo_bundle(root, "int8")
    session = LfmSession(bundle)
    ids = _heldout_ids(bundle, 1500)
    cache = Cache(session, 1, len(ids))
    for s in range(0, len(ids), 512):
        cache.step(np.array([ids[s:s + 512]]), last=1)
    for i in session.state.kv:
        key = cache.kv[i][0].numpy()
        assert np.abs(key).max() < 127  # no saturation
        assert np.abs(key).max() > 60  # and the range is used
    stats = kv_absmax(Checkpoint(demo_model_path()), ids[:64])
    k, v = stats[2]
    assert k.shape == v.shape == (2, 32) and np.array_equal(k[:, :16], k[:, 16:])  # pairs share a bound


@pytest.mark.parametrize("ops", ["contrib", "portable"])
def test_last_row_logits_equal_all_rows_last(root, ops, tmp_path):
    bundle = demo_bundle(root, "fp32") if ops == "contrib" else \
        export(demo_model_path(), tmp_path / "portable", ops="portable").bundle
    session = LfmSession(bundle)
    assert session.logits_to_keep
    full = Cache(session, 1, 16).step(np.array([PROMPT]))
    last = Cache(session, 1, 16).step(np.array([PROMPT]), last=1)
    two = Cache(session, 1, 16).step(np.array([PROMPT]), last=2)
    assert full.shape[1] == len(PROMPT) and last.shape[1] == 1 and two.shape[1] == 2
    np.testing.assert_array_equal(last[:, 0], full[:, -1])
    np.testing.assert_array_equal(two, full[:, -2:])


@pytest.mark.slow
def test_bad_kv_cache_choices_name_the_argument(root, tmp_path):
    with pytest.raises(ExportError, match=r"--kv-cache 'int16': expected one of \('fp32', 'int8', 'int4'\)"):
        export(demo_model_path(), tmp_path / "x", kv_cache="int16")
    with pytest.raises(ExportError, match="--kv-cache int8 needs --ops contrib.*portable op set.*fp32"):
        export(demo_model_path(), tmp_path / "x", ops="portable", kv_cache="int8")
    with pytest.raises(ExportError, match="--kv-margin 0"):
        export(demo_model_path(), tmp_path / "x", kv_cache="int8", kv_margin=0)
    with pytest.raises(ExportError, match=r"--kv-calibration: the text gives \d+ tokens, \d+ distinct.*at least 64"):
        export(demo_model_path(), tmp_path / "x", kv_cache="int8", kv_calibration_text="the")
    assert not (tmp_path / "x").exists()
    cli = [sys.executable, "-m", "lfm_edge.export.cli", "--out", str(tmp_path / "y")]
    result = subprocess.run([*cli, "--kv-cache", "int3"], capture_output=True, text=True)
    assert result.returncode == 2 and "--kv-cache: invalid choice: 'int3'" in result.stderr
    result = subprocess.run([*cli, "--ops", "portable", "--kv-cache", "int8"], capture_output=True, text=True)
    assert result.returncode == 2 and "--kv-cache int8 needs --ops contrib" in result.stderr
    result = subprocess.run([*cli, "--kv-cache", "int8", "--kv-calibration", str(tmp_path / "none.txt")],
                            capture_output=True, text=True)
    assert result.returncode == 2 and f"--kv-calibration {tmp_path / 'none.txt'}: no such file" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_phone_target_bundle_with_int8_cache_converts_to_ort_format(tmp_path_factory):
    bundle = shared_bundle(tmp_path_factory.getbasetemp(), "android")  # the target's default cache is int8
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["ort_format"]["file"] == "model.ort" and manifest["kv_cache"]["bits"] == 8
    session = ort.InferenceSession(str(bundle / "model.ort"), providers=["CPUExecutionProvider"])
    assert {i.name: i.type for i in session.get_inputs()}["past_key_values.2.key"] == "tensor(int8)"


@pytest.mark.slow
def test_kv_quality_tooling_measures_the_difference(tmp_path):
    """lfm-quant-report --kv-cache: the fp32 cache against itself is exact, int4 costs more than int8."""
    from lfm_edge.device_bench.quality import main

    assert main(["--kv-cache", "int8", "int4", "--depths", "300", "--decode", "16", "--out", str(tmp_path)]) == 0
    table = (tmp_path / "kv_cache.md").read_text()
    rows = {line.split("|")[1].strip(): line.split("|") for line in table.splitlines()[2:]}
    assert set(rows) == {"int8 margin 1.25", "int4 margin 1.25"}
    kl = {label: float(cells[3]) for label, cells in rows.items()}
    assert 0 < kl["int8 margin 1.25"] < kl["int4 margin 1.25"]


@pytest.mark.parametrize("args,kv", [(["--target", "android"], "int8"), (["--target", "ios"], "int8"),
                                     ([], "fp32"), (["--target", "android", "--kv-cache", "fp32"], "fp32"),
                                     (["--ops", "portable"], "fp32"), (["--kv-cache", "int4"], "int4")])
def test_cli_kv_cache_defaults_by_target(monkeypatch, tmp_path, args, kv):
    """Phones default to the int8 cache (quant/README.md has the measurements behind it), the desktop and the
    portable op set to fp32; an explicit --kv-cache wins. The CLI and Python callers share the defaults: the CLI
    builds ExportOptions, which resolve them in one place."""
    from lfm_edge.export import cli

    seen = []

    def fake_export(checkpoint, out, options):
        seen.append(options.resolved())
        raise ExportError("stop here")

    monkeypatch.setattr(cli, "export", fake_export)
    assert cli.main([str(demo_model_path()), "--out", str(tmp_path / "b"), *args]) == 2
    assert seen[0].kv_cache == kv
