"""The vocabulary quantized by rows (export/quant_ops.py `QuantizedOps.packed`): the same bundle, byte for byte,
as the whole table at once, from a float checkpoint and from a GGUF whose vocabulary is kept or re-laid; and the
row reads under it return what the whole tensor holds."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file
from test_gguf_in import crafted
from test_gguf_layout import _q4_0_mix

from lfm_edge.device_bench.peers.gguf_writer import write_gguf
from lfm_edge.export import reference
from lfm_edge.export.checkpoint import Checkpoint
from lfm_edge.export.conversion import PairwiseSum
from lfm_edge.export.exporter import export
from lfm_edge.export.gguf_checkpoint import GgufCheckpoint
from lfm_edge.export.graph import Graph
from lfm_edge.export.lfm2 import Weight
from lfm_edge.export.options import ExportError
from lfm_edge.export.random_weights import RandomCheckpoint
from lfm_edge.export.reference import StreamingReference, TorchReference
from lfm_edge.quant.blocks import BITS, METHODS, quantize
from tiny_models import build

Q = gguf.GGMLQuantizationType
ROWS = 64  # rows a slice: every tiny vocabulary here (257..411 rows) is several slices, the last one short
VOCAB = "model.embed_tokens.weight"


def _bundle_files(bundle) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(bundle.iterdir())}


def _export_both(checkpoint, tmp_path, monkeypatch, **settings) -> tuple[dict[str, bytes], dict[str, bytes], list]:
    """The bundle of the whole table (a slice as big as the vocabulary; the calibration passes' lookups and logits
    from the whole table too, as before) and of slices of ROWS rows, and the number of slices each vocabulary
    initializer was written in."""
    slices: list[tuple[str, int]] = []
    weight_rows = Graph.weight_rows

    def counted(self, name, rows, parts):
        def each():
            for part in parts:
                slices.append((name, part.shape[0]))
                yield part
        return weight_rows(self, name, rows, each())

    monkeypatch.setattr(Graph, "weight_rows", counted)
    with monkeypatch.context() as whole_table:
        whole_table.setattr(StreamingReference, "embedding", TorchReference.embedding)
        whole_table.setattr(StreamingReference, "logits", TorchReference.logits)
        whole = export(checkpoint, tmp_path / "whole", vocabulary_rows=1 << 20, **settings).bundle
    assert slices == []  # one slice: the path every other weight takes, as before
    monkeypatch.setattr(reference, "VOCABULARY_ROWS", ROWS)
    by_rows = export(checkpoint, tmp_path / "rows", vocabulary_rows=ROWS, **settings).bundle
    return _bundle_files(whole), _bundle_files(by_rows), slices


def _assert_same(whole: dict[str, bytes], by_rows: dict[str, bytes]) -> None:
    assert sorted(whole) == sorted(by_rows)
    for name in whole:
        assert whole[name] == by_rows[name], f"{name} differs between the whole vocabulary and its slices"


@pytest.mark.parametrize("config", ["moe_mixed", "moe_scaled_unnormed"])  # tied, and an untied LM head
def test_a_float_checkpoints_vocabulary_by_rows_is_the_same_bundle(config, tmp_path, monkeypatch):
    folder = tmp_path / "ckpt"
    model = build(config, folder, seed=4)
    vocab = model.config.vocab_size
    # int4: the scan (mse, block 256) and the rescoring copy (int8 rtn, block 128); the linears' GPTQ is unchanged
    whole, by_rows, slices = _export_both(folder, tmp_path, monkeypatch, quant="int4")
    _assert_same(whole, by_rows)
    tables = {name for name, _ in slices}
    assert tables == ({VOCAB + ".q", VOCAB + ".rescore.q"} if model.config.tie_word_embeddings else
                      {VOCAB + ".rescore.q", "lm_head.weight.q", "lm_head.weight.rescore.q"})
    for table in tables:
        assert [n for name, n in slices if name == table] == [ROWS] * (vocab // ROWS) + [vocab % ROWS]


@pytest.fixture(scope="module")
def mix(tmp_path_factory):
    folder = tmp_path_factory.mktemp("rows") / "ckpt"
    build("moe_wide_256", folder, seed=5)  # rows of 256: Q6_K's super-blocks fit; a 300-row vocabulary
    path = write_gguf(Checkpoint(folder), folder.parent / "q4_0-mix.gguf", f16=False, types=_q4_0_mix,
                      encoders={Q.Q6_K: crafted(Q.Q6_K)})
    return path, folder


@pytest.mark.parametrize("layout", ["experts", "exact"])
def test_a_ggufs_vocabulary_by_rows_is_the_same_bundle(layout, mix, tmp_path, monkeypatch):
    """`experts` (the phones' default) re-quantizes the Q6_K vocabulary's scan from the file's values and reads the
    rescoring copy from its blocks; `exact` reads the table's blocks as int8 block 16. conversion.json's error
    figures included: the whole table's are numpy's sums over it, as before."""
    path, tok = mix
    whole, by_rows, slices = _export_both(path, tmp_path, monkeypatch, tokenizer=tok, target="desktop",
                                          quant="int4", gguf_layout=layout)
    _assert_same(whole, by_rows)
    assert b"relative_rms_error" in whole["conversion.json"]
    tables = {name for name, _ in slices}
    assert tables == ({VOCAB + ".q", VOCAB + ".rescore.q"} if layout == "experts" else {VOCAB + ".q"})
    assert len(slices) == len(tables) * -(-300 // ROWS)


def test_row_reads_are_the_tensors_rows(mix, tmp_path):
    path, folder = mix
    ckpt, g = Checkpoint(folder), GgufCheckpoint(path, tokenizer=folder)
    for reader in (ckpt, g):
        table = reader.tensor(VOCAB)
        for start, stop in ((0, 64), (64, 300), (299, 300), (5, 5)):
            np.testing.assert_array_equal(reader.rows(VOCAB, start, stop), table[start:stop])
    whole = g.quantized(VOCAB)
    part = g.quantized(VOCAB, rows=(100, 164))
    for got, want in ((part.codes, whole.codes), (part.scales, whole.scales)):
        np.testing.assert_array_equal(got, want[100:164])
    with pytest.raises(ValueError, match="rows 10:400"):
        g.rows(VOCAB, 10, 400)
    # safetensors stores rows one after the other whatever the dtype (f16 here), widened to float32 as `tensor`
    values = np.random.default_rng(0).standard_normal((37, 5)).astype(np.float16)
    (tmp_path / "half").mkdir()
    save_file({VOCAB: values}, str(tmp_path / "half" / "model.safetensors"))
    (tmp_path / "half" / "config.json").write_bytes((folder / "config.json").read_bytes())
    half = Checkpoint(tmp_path / "half")
    np.testing.assert_array_equal(half.rows(VOCAB, 3, 30), values[3:30].astype(np.float32))
    with pytest.raises(ValueError, match="rows 30:3"):
        half.rows(VOCAB, 30, 3)


@pytest.mark.parametrize("source", ["safetensors", "random"])
def test_calibration_passes_look_up_rows_by_slices(source, mix, monkeypatch):
    """The streaming reference (GPTQ's and the KV cache's calibration passes) gathers the rows its ids name from
    slices of the table: the whole table's lookup exactly; its logits from slices equal the whole head's (to
    float rounding: nothing reads them)."""
    monkeypatch.setattr(reference, "VOCABULARY_ROWS", ROWS)
    ckpt = Checkpoint(mix[1]) if source == "safetensors" else RandomCheckpoint("lfm2-1.2b:1")
    table = Weight(VOCAB, (300, 256))
    streaming, whole = StreamingReference(ckpt), TorchReference(ckpt)
    ids = torch.tensor([[299, 3, 3, 140, 64, 63], [0, 200, 201, 299, 128, 5]])
    assert torch.equal(streaming.embedding(ids, table), whole.embedding(ids, table))
    x = torch.randn(2, 1, 256)
    torch.testing.assert_close(streaming.logits(x, table), whole.logits(x, table), rtol=1e-5, atol=1e-5)


def test_random_rows_are_the_random_tensors_rows():
    """Random weights come from a generator that draws rows in order: read by rows, they are the same values."""
    ckpt = RandomCheckpoint("lfm2-1.2b:1")
    shape = (1000, 48)
    table = ckpt.tensor(VOCAB, shape)
    got = np.concatenate([ckpt.rows(VOCAB, a, min(1000, a + 300), shape) for a in range(0, 1000, 300)])
    np.testing.assert_array_equal(got, table)
    np.testing.assert_array_equal(ckpt.rows(VOCAB, 650, 700, shape), table[650:700])  # back: drawn again
    np.testing.assert_array_equal(ckpt.rows(VOCAB, 700, 701, shape), table[700:701])
    np.testing.assert_array_equal(ckpt.rows(VOCAB, 950, 999, shape), table[950:999])  # rows skipped ahead
    np.testing.assert_array_equal(ckpt.rows("model.norm.weight", 0, 1, (1, 48)), ckpt.tensor("model.norm.weight",
                                                                                              (1, 48)))


@pytest.mark.parametrize("method", METHODS)
def test_no_quantization_looks_across_rows(method):
    """Each method's codes for a slice of rows are those rows of the whole weight's: why the vocabulary can go
    by rows (the policy keeps GPTQ off the vocabulary; its feedback runs along a row and would allow it too)."""
    rng = np.random.default_rng(1)
    w = rng.standard_normal((203, 80)).astype(np.float32)
    h = (lambda x: x.T @ x)(rng.standard_normal((300, 80)))
    for bits in BITS:
        whole = quantize(w, bits, 16, method, hessian=h)
        parts = [quantize(w[a:a + 50], bits, 16, method, hessian=h) for a in range(0, 203, 50)]
        for field in ("codes", "scales", "zero_points"):
            if getattr(whole, field) is None:
                continue
            np.testing.assert_array_equal(np.concatenate([getattr(p, field) for p in parts]), getattr(whole, field))


@pytest.mark.parametrize("rows,width,step", [(300, 256, 64), (411, 72, 64), (3000, 2047, 333), (7, 3, 2), (4, 8192, 1)])
def test_a_sum_fed_by_rows_is_numpys_sum_of_the_whole(rows, width, step):
    """conversion.json's error of a vocabulary measured by rows is the whole table's figure bit for bit (numpy's
    pairwise summation, rebuilt from the pieces), where a running sum of the pieces' sums can differ in its last
    bits."""
    squares = np.random.default_rng(rows).standard_normal((rows, width)) ** 2
    total = PairwiseSum(squares.size)
    for a in range(0, rows, step):
        assert not total.complete
        total.add(squares[a:a + step].reshape(-1))
    assert total.value() == float(squares.sum())


@pytest.mark.parametrize("shape", [(10, 3, 4), (500, 2, 64)])  # kept in model.onnx; in the data file
def test_rows_written_slice_by_slice_are_the_whole_weights_bytes(shape, tmp_path):
    weights = np.random.default_rng(2).integers(0, 256, (2, *shape), dtype=np.uint8)
    files = []
    for name, by_rows in (("whole", False), ("rows", True)):
        g = Graph(tmp_path / f"{name}.data")
        g.weight("before", weights[0])  # the table's offset follows what was written before it
        if by_rows:
            g.weight_rows("table", shape[0], (weights[1][a:a + 7] for a in range(0, shape[0], 7)))
        else:
            g.weight("table", weights[1])
        g.weight("after", weights[0][::-1])
        g.save(tmp_path / f"{name}.onnx", "test", {})
        files.append(((tmp_path / f"{name}.data").read_bytes(),
                      [(t.name, list(t.dims), t.raw_data, [(e.key, e.value) for e in t.external_data])
                       for t in g.initializers]))
    assert files[0][0] == files[1][0] and files[0][1] == [(n, d, r, [(k, v.replace("rows", "whole")) for k, v in e])
                                                          for n, d, r, e in files[1][1]]
    with pytest.raises(ValueError, match="9 rows written, expected 10"):
        Graph(tmp_path / "bad.data").weight_rows("t", 10, iter([np.zeros((9, 200), np.uint8)]))


def test_vocabulary_rows_is_checked(tmp_path):
    with pytest.raises(ExportError, match="vocabulary_rows 0"):
        export(None, tmp_path / "b", random_weights="lfm2-1.2b:1", vocabulary_rows=0)
