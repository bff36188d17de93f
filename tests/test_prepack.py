"""The prepack cache (runtime/backends/prepack.py): written once next to a bundle, mapped afterwards with the same
answers, and refused with a reason whenever it does not fit: another CPU, onnxruntime or bundle, a truncated or
altered file; never written into a read-only folder or left half-written by a full disk. Real int4 bundles and
real onnxruntime sessions throughout."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import onnx
import pytest
from shared_bundles import demo_bundle

from lfm_edge.export.footprint import stored_bytes
from lfm_edge.runtime.backends import prepack
from lfm_edge.runtime.backends.python import LfmSession
from lfm_edge.runtime.generate import generate
from lfm_edge.runtime.memory import resident_mb

PROMPTS = [[1, 6, 100, 200, 300]]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    shared = demo_bundle(tmp_path_factory.getbasetemp(), "int4")  # tests copy it before they write
    assert not (shared / prepack.FOLDER).exists(), "a test wrote a prepack cache into the session's shared bundle"
    return shared


@pytest.fixture(scope="module")
def expected(exported):
    return generate(LfmSession(exported, threads=1), PROMPTS, 8)


@pytest.fixture
def bundle(exported, tmp_path):
    return Path(shutil.copytree(exported, tmp_path / "bundle"))


def _info(bundle: Path) -> dict:
    return json.loads((bundle / prepack.FOLDER / prepack.INFO).read_text())


@pytest.mark.slow
def test_written_once_then_mapped_with_the_same_answers(bundle, expected):
    first = LfmSession(bundle, threads=1, prepack_cache="auto")
    assert first.prepack.state == "written" and first.prepack.mapped, first.prepack.message()
    assert generate(first, PROMPTS, 8) == expected
    info = _info(bundle)
    assert info["onnxruntime"] and info["cpu"]["features"] and set(info["files"]) == {"model.onnx", "model.onnx.data"}
    assert not list(bundle.glob(".prepacked-writing-*"))  # the temporary folder became the cache
    # ~2x the weights: onnxruntime keeps the raw weights next to the packed ones (prepack.py says why)
    weights = (bundle / "model.onnx.data").stat().st_size
    assert 1.5 * weights < first.prepack.disk_bytes < 3 * weights
    del first

    again = LfmSession(bundle, threads=1, prepack_cache="use")
    assert again.prepack.state == "mapped" and again.prepack.message() == "weights mapped from the prepack cache"
    assert again.logits_to_keep  # onnxruntime's optimized graph keeps the optional input
    assert generate(again, PROMPTS, 8) == expected
    # the session reads the cache's graph and data, not the bundle's
    maps = Path("/proc/self/maps").read_text() if Path("/proc/self/maps").exists() else ""
    if maps:
        assert str((bundle / "prepacked" / "model.onnx.data").resolve()) in maps
    assert LfmSession(bundle, threads=1).prepack.state == "off"  # the default does not look for one


@pytest.mark.slow
def test_weights_are_file_backed_not_copied_when_mapped(bundle):
    """The repacked weights move from anonymous memory into the file mapping (the point of the cache)."""
    LfmSession(bundle, threads=1, prepack_cache="auto")
    code = textwrap.dedent(f"""
        import json, sys
        from lfm_edge.runtime.memory import resident_mb
        from lfm_edge.runtime.backends.python import LfmSession
        base = resident_mb()
        s = LfmSession({str(bundle)!r}, threads=1, prepack_cache=sys.argv[1])
        now = resident_mb()
        print(json.dumps({{k: now[k] - base[k] for k in ("anonymous", "file")}}))
    """)
    grown = {mode: json.loads(subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True,
                                             check=True).stdout) for mode in ("off", "use")}
    # the weights onnxruntime repacks: the data file less what is read in place, never repacked (GQA's rotary
    # tables, the rescored head's 8-bit vocabulary copy that only GatherBlockQuantized reads)
    model = onnx.load(bundle / "model.onnx", load_external_data=False)
    in_place = sum(stored_bytes(t) for t in model.graph.initializer
                   if t.name.startswith("rotary.") or ".rescore." in t.name)
    packed_mb = ((bundle / "model.onnx.data").stat().st_size - in_place) / (1 << 20)
    assert grown["off"]["anonymous"] > 0.8 * packed_mb  # every weight repacked into malloc'd memory
    assert grown["use"]["anonymous"] < grown["off"]["anonymous"] - 0.5 * packed_mb
    assert grown["use"]["file"] > grown["off"]["file"] + 0.5 * packed_mb
    assert resident_mb()["file"] > 0


@pytest.mark.parametrize("field, value, reason", [
    ("cpu", {"machine": "aarch64", "features": "0123456789abcdef", "name": "Cortex-X4"}, "written on another CPU"),
    ("onnxruntime", "1.31.0", "written by onnxruntime 1.31.0"),
    ("format", "lfm-edge-prepacked/0", "format 'lfm-edge-prepacked/0'"),
])
@pytest.mark.slow
def test_a_cache_from_another_cpu_or_runtime_is_refused_and_the_bundle_still_runs(bundle, expected, field, value,
                                                                                   reason):
    LfmSession(bundle, threads=1, prepack_cache="auto")
    info = _info(bundle)
    info[field] = value
    (bundle / prepack.FOLDER / prepack.INFO).write_text(json.dumps(info))
    used = LfmSession(bundle, threads=1, prepack_cache="use")  # "use" never writes: the refusal stays visible
    assert used.prepack.state == "refused" and reason in used.prepack.reason
    assert used.prepack.message().startswith("prepack cache refused: weights repacked into memory (")
    assert generate(used, PROMPTS, 8) == expected
    rewritten = LfmSession(bundle, threads=1, prepack_cache="auto")  # "auto" replaces it
    assert rewritten.prepack.state == "written" and _info(bundle)[field] != value
    assert generate(rewritten, PROMPTS, 8) == expected


def test_a_cache_of_another_bundle_is_refused(bundle, exported, tmp_path):
    LfmSession(bundle, threads=1, prepack_cache="auto")
    other = Path(shutil.copytree(exported, tmp_path / "other"))
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["files"]["model.onnx.data"]["sha256"] = "0" * 64  # another export's weights, as the manifest says
    (other / "manifest.json").write_text(json.dumps(manifest))
    shutil.copytree(bundle / prepack.FOLDER, other / prepack.FOLDER)
    used = LfmSession(other, threads=1, prepack_cache="use", verify="size")
    assert used.prepack.state == "refused" and "made from other model files" in used.prepack.reason


@pytest.mark.slow
def test_truncated_or_altered_caches_are_refused(bundle, expected):
    LfmSession(bundle, threads=1, prepack_cache="auto")
    data = bundle / prepack.FOLDER / prepack.DATA
    size = data.stat().st_size
    with open(data, "r+b") as f:  # a flipped byte in the first sampled chunk
        f.write(bytes([f.read(1)[0] ^ 0xFF]))
    used = LfmSession(bundle, threads=1, prepack_cache="use")
    assert used.prepack.state == "refused" and "content differs" in used.prepack.reason
    assert generate(used, PROMPTS, 8) == expected

    LfmSession(bundle, threads=1, prepack_cache="auto")  # rewritten
    with open(data, "r+b") as f:  # a byte between the samples: only verify="sha256" reads every byte
        f.seek(size // 2 + 12345)
        byte = f.read(1)[0]
        f.seek(size // 2 + 12345)
        f.write(bytes([byte ^ 0xFF]))
    full = LfmSession(bundle, threads=1, prepack_cache="use", verify="sha256")
    assert full.prepack.state == "refused" and "sha256 differs" in full.prepack.reason

    LfmSession(bundle, threads=1, prepack_cache="auto")
    with open(data, "r+b") as f:
        f.truncate(size - 4096)
    used = LfmSession(bundle, threads=1, prepack_cache="use", verify="none")  # sizes are checked even so
    assert used.prepack.state == "refused" and f"{size - 4096} bytes" in used.prepack.reason
    assert "truncated" in used.prepack.reason and generate(used, PROMPTS, 8) == expected

    (bundle / prepack.FOLDER / prepack.INFO).unlink()  # what an interrupted write would look like
    used = LfmSession(bundle, threads=1, prepack_cache="use")
    assert used.prepack.state == "refused" and "no cache.json" in used.prepack.reason


def _read_only(folder: Path):
    """Make `folder` refuse new entries, also for root (chattr +i); returns the undo, or None."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        return lambda: folder.chmod(0o755)
    if shutil.which("chattr") and subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0:
        return lambda: subprocess.run(["chattr", "-i", str(folder)], check=True)
    return None


def test_a_read_only_bundle_folder_gets_no_cache_a_clear_message_and_still_runs(bundle, expected):
    undo = _read_only(bundle)
    if undo is None:
        pytest.skip("cannot make a folder read-only here (root without chattr)")
    try:
        session = LfmSession(bundle, threads=1, prepack_cache="auto")
        assert session.prepack.state == "not written" and "is not writable" in session.prepack.reason
        assert session.prepack.message().startswith("no prepack cache: weights repacked into memory (")
        assert generate(session, PROMPTS, 8) == expected
        assert not (bundle / prepack.FOLDER).exists() and not list(bundle.glob(".prepacked-*"))
    finally:
        undo()


@pytest.mark.slow
def test_a_full_disk_while_writing_leaves_nothing_that_is_used(bundle, expected):
    """Files may not grow past 1 MB in the child (RLIMIT_FSIZE; SIGXFSZ ignored, so a write fails with EFBIG as
    on a full disk): the session loads from the bundle, says why no cache was kept, and leaves no files."""
    code = textwrap.dedent(f"""
        import json, resource, signal
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
        from lfm_edge.runtime.generate import generate
        from lfm_edge.runtime.backends.python import LfmSession
        s = LfmSession({str(bundle)!r}, threads=1, prepack_cache="auto")
        print(json.dumps([s.prepack.state, s.prepack.reason, generate(s, {PROMPTS!r}, 8)]))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    state, reason, tokens = json.loads(out.stdout.strip().splitlines()[-1])
    assert state == "not written" and "onnxruntime failed while writing it" in reason and tokens == expected
    assert not (bundle / prepack.FOLDER).exists() and not list(bundle.glob(".prepacked-*"))
    assert LfmSession(bundle, threads=1, prepack_cache="auto").prepack.state == "written"  # room again: written


def test_not_enough_free_space_is_said_before_writing(bundle, monkeypatch):
    monkeypatch.setattr(prepack, "free_bytes", lambda folder: 10 << 20)
    session = LfmSession(bundle, threads=1, prepack_cache="auto")
    assert session.prepack.state == "not written" and "GB free, a cache needs" in session.prepack.reason


@pytest.mark.slow
def test_an_unfinished_write_is_never_used_and_is_cleaned_up(bundle, expected):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stale = bundle / f".prepacked-writing-{dead}"
    stale.mkdir()
    (stale / "model.onnx").write_bytes(b"half")
    used = LfmSession(bundle, threads=1, prepack_cache="use")
    assert used.prepack.state == "not written" and generate(used, PROMPTS, 8) == expected
    assert stale.exists()  # "use" never changes the folder
    assert LfmSession(bundle, threads=1, prepack_cache="auto").prepack.state == "written"
    assert not stale.exists()


def test_the_graph_reader_needs_no_onnx_package(bundle):
    import onnx

    LfmSession(bundle, threads=1, prepack_cache="auto")
    model = bundle / prepack.FOLDER / prepack.MODEL
    graph = onnx.load(str(model), load_external_data=False)
    assert prepack.external_data(model.read_bytes()) == [
        {e.key: e.value for e in t.external_data} for t in graph.graph.initializer]
    assert any(k.startswith("prepacked_") for entries in prepack.external_data(model.read_bytes()) for k in entries)


@pytest.mark.slow
def test_the_cold_start_ab_alternates_fresh_processes_and_reports_both_sides(bundle, capsys):
    from lfm_edge.device_bench import coldstart

    assert coldstart.main([str(bundle), "--rounds", "2", "--decode", "2", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{\"mode\"")]
    assert [row["mode"] for row in lines] == ["off", "use", "use", "off"]  # the order swaps each round
    assert {row["state"] for row in lines} == {"off", "mapped"}
    summary = json.loads(out[out.index("{\n"):])
    assert summary["rounds"] == 2 and summary["use"]["anon_after_load"] < summary["off"]["anon_after_load"]
    assert summary["load_s_ratio_use_over_off"] > 0 and summary["use"]["file_after_load"] > 0
