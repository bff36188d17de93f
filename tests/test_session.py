"""Loading a bundle: provider choice with its reason, and the manifest's checks."""

from __future__ import annotations

import numpy as np
import pytest

from lfm_edge.export.exporter import export
from lfm_edge.runtime.backends import providers
from lfm_edge.runtime.backends.python import BundleError, LfmSession
from tiny_models import build


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    root = tmp_path_factory.mktemp("session")
    build("moe_mixed", root / "ckpt")
    return export(root / "ckpt", root / "bundle").bundle


def test_auto_uses_cpu_here_and_says_why(bundle):
    session = LfmSession(bundle)
    assert session.provider_choice.providers == ["CPUExecutionProvider"]
    assert "no accelerator provider installed" in session.provider_choice.reason


def test_onnxruntime_reports_where_each_node_ran(bundle):
    placed = providers.nodes_by_provider(bundle / "model.onnx", ["CPUExecutionProvider"])
    assert set(placed) == {"CPUExecutionProvider"}
    ops = placed["CPUExecutionProvider"]
    assert ops["GroupQueryAttention"] == 2 and ops["MoE"] == 3 and ops["CausalConvWithState"] == 2


def test_auto_rule_with_phone_providers_mocked(bundle, monkeypatch):
    """No accelerator provider exists on this machine: the placement onnxruntime would report on a phone is
    mocked, to check the rule that reads it."""
    partial = {"XnnpackExecutionProvider": {"Add": 10}, "CPUExecutionProvider": {"MatMulNBits": 12, "QMoE": 3}}
    monkeypatch.setattr(providers, "nodes_by_provider", lambda *a, **k: partial)
    choice = providers.choose(bundle / "model.onnx", available=["XnnpackExecutionProvider", "CPUExecutionProvider"])
    assert choice.providers == ["CPUExecutionProvider"]
    assert "XnnpackExecutionProvider leaves 15 heavy nodes to the CPU (MatMulNBits, QMoE)" in choice.reason
    full = {"QNNExecutionProvider": {"MatMulNBits": 12}, "CPUExecutionProvider": {"Add": 3}}
    monkeypatch.setattr(providers, "nodes_by_provider", lambda *a, **k: full)
    choice = providers.choose(bundle / "model.onnx", available=["QNNExecutionProvider", "CPUExecutionProvider"])
    assert choice.providers == ["QNNExecutionProvider", "CPUExecutionProvider"]


def test_explicit_providers_are_honoured_or_refused(bundle):
    session = LfmSession(bundle, providers=[("CPUExecutionProvider", {"arena_extend_strategy": "kSameAsRequested"})])
    assert session.session.get_providers() == ["CPUExecutionProvider"]
    with pytest.raises(ValueError, match=r"\['NnapiExecutionProvider'\] not available"):
        LfmSession(bundle, providers=["NnapiExecutionProvider", "CPUExecutionProvider"])


@pytest.mark.parametrize("damage, mode, message", [
    (lambda b: (b / "model.onnx.data").write_bytes((b / "model.onnx.data").read_bytes()[:-10]), "size",
     "model.onnx.data: .* bytes, manifest.json says"),
    (lambda b: (b / "tokenizer.json").unlink(), "size", "tokenizer.json: listed in manifest.json but missing"),
    (lambda b: _flip_byte(b / "model.onnx.data"), "sha256", "model.onnx.data: sha256 differs"),
    (lambda b: _flip_byte(b / "model.onnx.data", at=0), "sampled", "model.onnx.data: content differs"),
    (lambda b: _swap_manifest(b), "sampled", r"model.onnx(\.data)?: content differs .* another bundle"),
])
def test_damaged_bundles_are_named(bundle, tmp_path, damage, mode, message):
    import shutil

    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    damage(copy)
    with pytest.raises(BundleError, match=message):
        LfmSession(copy, verify=mode)


def _flip_byte(path, at=None):
    data = bytearray(path.read_bytes())
    data[len(data) // 2 if at is None else at] ^= 0x40
    path.write_bytes(bytes(data))


def _swap_manifest(bundle):
    """The manifest of another export with the same shapes (other weights): sizes match, content does not."""
    from tiny_models import build

    other = bundle.parent / "other"
    build("moe_mixed", other / "ckpt", seed=7)
    export(other / "ckpt", other / "bundle")
    (bundle / "manifest.json").write_bytes((other / "bundle" / "manifest.json").read_bytes())


def test_prefill_chunks_shrink_with_depth_and_tokens_do_not_change(bundle):
    """Deep in a long context a chunk's [chunk x depth] mask tensors are bounded by prefill_budget; the
    tokens are those of the default chunking."""
    from lfm_edge.runtime.generate import Generation, prefill_ranges

    chunks = list(prefill_ranges(0, 140_000, 512, [], 32, 256 << 20))
    at = {s: e - s for s, e in chunks}
    assert at[0] == 512 and at[16_384] == 256 and at[32_768] == 128 and at[131_072] == 32
    assert all(32 * (e - s) * e <= (256 << 20) * 2 for s, e in chunks)  # within the budget (one halving)
    session = LfmSession(bundle, threads=1)
    prompt = list(range(3, 200)) * 2
    default = list(Generation(session, [prompt], 6, eos_token_ids=[]))
    tight = Generation(session, [prompt], 6, eos_token_ids=[], prefill_budget=32 * 64 * 200)
    assert list(tight) == default


def test_kv_growth_fits_the_memory_available():
    """A power of two that would not fit shrinks to the rows asked for; rows that do not fit are refused with
    the numbers, before anything is allocated."""
    from lfm_edge.runtime.backend import capacity_for

    assert capacity_for(600, 256, 4096, bytes_per_row=1000, available=10**9) == 1024
    assert capacity_for(600, 256, 4096, bytes_per_row=1000, available=700_000) == 600
    with pytest.raises(MemoryError, match=r"KV cache of 600 tokens needs 0.00 GB \(1,000 bytes per token\); "
                                          r"0.00 GB of memory is available"):
        capacity_for(600, 256, 4096, bytes_per_row=1000, available=500_000)


def test_a_cache_larger_than_memory_is_refused_simulated_small_phone(bundle, monkeypatch):
    """MemAvailable stands in for a phone with little memory: the cache names what it needed and what there is;
    growing past what fits takes exactly the rows asked for."""
    from lfm_edge.runtime import backend as growth

    session = LfmSession(bundle, threads=1)
    row = growth.kv_row_bytes(session.state.kv, 1, np.float32)
    assert row == sum(2 * h * d * 4 for h, d in session.state.kv.values())
    monkeypatch.setattr(growth, "available_memory", lambda: 100 * row)
    with pytest.raises(MemoryError, match=f"KV cache of 200 tokens .* \\({row:,} bytes per token\\)"):
        session.new_cache(1, 200)
    cache = session.new_cache(1, 50)
    cache.reserve(80)
    assert cache.capacity == 80  # 128 would not fit
    assert cache.kv[next(iter(cache.kv))][0].shape()[2] == 80
    with pytest.raises(MemoryError):
        cache.reserve(150)
    assert cache.capacity == 80  # unchanged


@pytest.mark.parametrize("ops", ["contrib", "portable"])
def test_decode_steps_with_bindings_kept_match_a_fresh_prefill(tmp_path, ops):
    """A cache binds its state once per orientation of the conv pairs and writes logits into arrays the caller
    owns: token-by-token steps, across a buffer that grows mid-way (bindings made anew), give each row's logits
    as one prefill of the same tokens does, and a step's logits stay what they were after later steps."""
    build("moe_mixed", tmp_path / "ckpt")
    session = LfmSession(export(tmp_path / "ckpt", tmp_path / "bundle", ops=ops).bundle, threads=1)
    ids = np.arange(5, 45)[None, :]
    whole = session.new_cache(1, 40).step(ids)
    cache = session.new_cache(1, 8)
    steps = []
    for t in range(40):
        if t == 8:
            cache.reserve(40)  # new KV buffers: the bindings holding the old ones are dropped
        steps.append(cache.step(ids[:, t:t + 1]))
    first = steps[0].copy()
    np.testing.assert_allclose(np.concatenate(steps, axis=1), whole, atol=2e-4)
    assert np.array_equal(steps[0], first)
    assert steps[5] is not steps[6] and not np.shares_memory(steps[5], steps[6])
    last = cache.step(ids[:, :3], last=1)  # logits_to_keep: an array of the rows kept
    assert last.shape == (1, 1, whole.shape[-1])


@pytest.mark.slow
def test_weights_repacked_in_parallel_decode_as_repacked_serially(tmp_path, capfd):
    """Sessions repack the quantized weights with the pool's threads (session.prepack.enable_parallel, as
    onnxruntime's verbose log says); the packed weights, and so every logit, are those of the serial repacking."""
    build("moe_mixed", tmp_path / "ckpt")
    bundle = export(tmp_path / "ckpt", tmp_path / "bundle", quant="int4").bundle
    ids = np.arange(5, 25)[None, :]

    def logits(configure=None):
        cache = LfmSession(bundle, threads=2, configure=configure).new_cache(1, 24)
        return np.concatenate([cache.step(ids), cache.step(ids[:, :1])], axis=1)

    serial = logits(lambda o: o.add_session_config_entry("session.prepack.enable_parallel", "0"))
    capfd.readouterr()
    parallel = logits(lambda o: setattr(o, "log_severity_level", 0))
    assert "Pre-packing constant initializers using the intra-op thread pool" in capfd.readouterr().err
    assert np.array_equal(parallel, serial)
