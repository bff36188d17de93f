"""The Kivy app's logic without a window: the chat turn, the benchmark summary, the bundle download.

Everything runs for real: scripted and exported bundles in onnxruntime, the benchmark on the int4 demo
bundle, downloads from an http.server on 127.0.0.1 that honours Range and can cut a transfer short.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import queue
import shutil
import threading
import time
from pathlib import Path

import pytest
from shared_bundles import demo_bundle
from tokenizers import Tokenizer

from lfm_edge.device_bench import roofline
from lfm_edge.export.cli import demo_model_path
from lfm_edge.mobile_app.app import bench, download
from lfm_edge.mobile_app.app.model import bundle_info, check_folder, default_bundle, load_model
from lfm_edge.mobile_app.app.tools import DEMO_TOOLS, _sysfs_battery, battery
from lfm_edge.mobile_app.app.transcript import GENERATING, IDLE, Bubble, ChatController, ToolCard
from lfm_edge.runtime import LfmModel
from scripted_model import write_bundle
from without_module import run_without

DEMO = demo_model_path()
QUESTION = "What is 2+3?"
REASONING = "The user wants a sum; the calculator is exact."
ANSWER = "2 + 3 = 5."


# --- shared bundles (the GUI test imports these, so each is built once per session) ----------------------------

@functools.cache
def demo_int4_bundle(root: Path) -> Path:
    """The int4 demo bundle, exported with the project's exporter."""
    return demo_bundle(root, "int4")


def scripted_tool_bundle(folder: Path, controller: ChatController, question: str = QUESTION) -> Path:
    """A real ONNX bundle that answers `question`, sent through `controller`, with reasoning and a Pythonic
    calculator call, then (after the tool's result comes back) with ANSWER."""
    tok = Tokenizer.from_file(str(DEMO / "tokenizer.json"))
    eos, vocab = tok.token_to_id("<|im_end|>"), tok.get_vocab_size()

    def tokens(text: str) -> list[int]:
        return tok.encode(text, add_special_tokens=False).ids

    probe = LfmModel(write_bundle(folder / "probe", DEMO, {}, vocab, eos))
    messages = controller.conversation_for(question)
    said = f'<think>{REASONING}</think><|tool_call_start|>[calculator(expression="2+3")]<|tool_call_end|>'
    first = len(probe.prompt_ids(messages, controller.schemas))
    result = controller.tools["calculator"](expression="2+3")
    second_messages = [*messages, {"role": "assistant", "content": said},
                       {"role": "tool", "content": json.dumps(result)}]
    second = len(probe.prompt_ids(second_messages, controller.schemas))
    script = {first + i: t for i, t in enumerate(tokens(said))} | {second + i: t for i, t in enumerate(tokens(ANSWER))}
    shutil.rmtree(folder / "probe")
    return write_bundle(folder / "scripted", DEMO, script, vocab, eos)


def talker_bundle(folder: Path) -> Path:
    """A real ONNX bundle that says "la" at every position: an answer only max_new_tokens or Cancel ends."""
    tok = Tokenizer.from_file(str(DEMO / "tokenizer.json"))
    word = tok.encode(" la", add_special_tokens=False).ids[-1]  # "la" (the demo's tokenizer keeps spaces apart)
    # ~3 ms of work per token: Cancel must land mid-answer even on a fast machine (without it 1200 tokens
    # took 0.13 s, less than the UI needs to see the first five)
    return write_bundle(folder, DEMO, dict.fromkeys(range(2048), word), tok.get_vocab_size(),
                        tok.token_to_id("<|im_end|>"), step_work=768)


@pytest.fixture(scope="session")
def demo_int4(tmp_path_factory):
    return demo_int4_bundle(tmp_path_factory.getbasetemp())


class UiQueue:
    """Stands in for Kivy's clock: the worker posts, the test's 'UI thread' runs what was posted."""

    def __init__(self):
        self.q: queue.Queue = queue.Queue()
        self.thread_ids: set[int] = set()

    def post(self, fn) -> None:
        self.q.put(fn)

    def run_until(self, done, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            assert time.monotonic() < deadline, "timed out"
            try:
                fn = self.q.get(timeout=0.05)
            except queue.Empty:
                continue
            self.thread_ids.add(threading.get_ident())
            fn()


def test_app_logic_imports_neither_kivy_nor_onnxruntime():
    """Phone builds may reach onnxruntime through Java or Objective-C only; tests run the logic windowless."""
    import subprocess
    import sys

    probe = ("import sys; import lfm_edge.mobile_app.app.transcript, lfm_edge.mobile_app.app.bench, "
             "lfm_edge.mobile_app.app.download, lfm_edge.mobile_app.app.model, lfm_edge.mobile_app.app.jobs; "
             "print(sorted(m for m in ('kivy', 'onnxruntime', 'onnx', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# --- tools ------------------------------------------------------------------------------------------------------

def test_demo_tools_answer_and_never_raise(tmp_path):
    assert set(DEMO_TOOLS) == {"calculator", "current_time", "battery"}
    assert DEMO_TOOLS["calculator"](expression="2+3") == {"result": 5}
    assert "now" in DEMO_TOOLS["current_time"]()
    status = battery()  # this machine has no battery: an answer, not an exception
    assert isinstance(status, dict) and ("percent" in status or status.get("battery") == "unavailable")
    supply = tmp_path / "BAT0"
    supply.mkdir()
    (supply / "type").write_text("Battery\n")
    (supply / "capacity").write_text("87\n")
    (supply / "status").write_text("Charging\n")
    (tmp_path / "AC").mkdir()
    (tmp_path / "AC" / "type").write_text("Mains\n")
    assert _sysfs_battery(tmp_path) == {"percent": 87, "charging": True, "status": "Charging"}
    (supply / "capacity").write_text("garbage")
    assert _sysfs_battery(tmp_path) is None
    assert _sysfs_battery(tmp_path / "missing") is None


# --- chat -------------------------------------------------------------------------------------------------------

def test_chat_turn_streams_reasoning_runs_the_tool_and_answers(tmp_path):
    ui = UiQueue()
    chat = ChatController(ui.post)
    changes: list[int | None] = []
    chat.listeners.append(changes.append)
    assert chat.send(QUESTION) == "no model loaded: pick one on the Model screen"
    chat.loading = "loading scripted: preparing the weights (3 s)"  # the app sets it while its model loads
    assert chat.send(QUESTION) == ("the model is still loading (loading scripted: preparing the weights (3 s)): "
                                   "send again when it is ready") and chat.items == []
    stages = []
    chat.set_model(load_model(scripted_tool_bundle(tmp_path, chat), threads=1, progress=stages.append))
    assert stages == ["preparing the weights", "reading the tokenizer"]
    chat.loading = ""
    assert chat.send("   ") == "nothing to send"

    assert chat.send(QUESTION) is None
    assert chat.state == GENERATING
    assert chat.send("again") == "the model is still answering"
    ui.run_until(lambda: chat.state == IDLE)

    assert ui.thread_ids == {threading.get_ident()}  # every transcript change ran on the 'UI' thread
    user, thought, card, answer = chat.items
    assert user == Bubble("user", QUESTION)
    assert thought.role == "assistant" and thought.reasoning == REASONING and not thought.show_reasoning
    assert thought.text.strip() == "" and thought.footer.endswith("eos")
    assert isinstance(card, ToolCard) and card.call_text == "calculator(expression='2+3')"
    assert card.result == {"result": 5} and card.result_text == '{"result": 5}'
    assert answer.role == "assistant" and answer.text.strip() == ANSWER
    assert [m["role"] for m in chat.history] == ["user", "assistant", "tool", "assistant"]
    assert None in changes and len(changes) > 5
    first_round, second_round = chat.conversation.stats
    assert second_round.reused_tokens == first_round.state_tokens  # the tool round prefilled only what was new
    assert f"{second_round.reused_tokens} reused" in answer.footer
    chat.toggle_reasoning(1)
    assert chat.items[1].show_reasoning

    # the app saves when paused or closed and restores at its next start: same transcript, same state
    assert chat.save(tmp_path / "chat.safetensors")
    again = ChatController(ui.post)
    assert again.restore(tmp_path / "chat.safetensors") == "no model loaded, or a turn is running"
    again.set_model(load_model(tmp_path / "scripted", threads=1))
    assert again.restore(tmp_path / "missing.safetensors") == "nothing saved"
    assert again.restore(tmp_path / "chat.safetensors") is None
    def shown(items):  # what a restart may change: footers (no speed to show) and opened reasoning
        return [{k: v for k, v in vars(i).items() if k not in ("footer", "show_reasoning")} for i in items]

    assert shown(again.items) == shown(chat.items) and len(again.items) == 4
    assert again.history == chat.history and again.conversation.tokens == chat.conversation.tokens
    (tmp_path / "torn.safetensors").write_bytes((tmp_path / "chat.safetensors").read_bytes()[:100])
    assert "truncated" in again.restore(tmp_path / "torn.safetensors")
    chat.reset()
    assert chat.items == [] and chat.history == [] and not chat.save(tmp_path / "empty.safetensors")


def test_cancel_stops_a_long_answer_and_the_chat_goes_on(tmp_path):
    ui = UiQueue()
    chat = ChatController(ui.post, tools={}, max_new_tokens=1500)
    chat.set_model(load_model(talker_bundle(tmp_path / "talker"), threads=1))
    assert chat.send("talk") is None
    ui.run_until(lambda: chat.tokens >= 3)
    chat.cancel()
    ui.run_until(lambda: chat.state == IDLE, timeout=10)
    answer = chat.items[-1]
    assert answer.footer.endswith("cancelled") and chat.tokens < 1500
    assert chat.send("again") is None  # a cancelled turn leaves the chat usable
    chat.cancel()
    ui.run_until(lambda: chat.state == IDLE, timeout=10)
    assert chat.wait(5)


def test_a_failing_turn_is_shown_not_raised(tmp_path):
    ui = UiQueue()
    chat = ChatController(ui.post, tools={}, max_new_tokens=5000)  # beyond the context: refused by the runtime
    tok = Tokenizer.from_file(str(DEMO / "tokenizer.json"))
    chat.set_model(load_model(write_bundle(tmp_path / "b", DEMO, {}, tok.get_vocab_size(),
                                           tok.token_to_id("<|im_end|>")), threads=1))
    assert chat.send("hi") is None
    ui.run_until(lambda: chat.state == IDLE)
    assert chat.items[-1].role == "error" and "max_new_tokens 5000" in chat.items[-1].text


def test_jobs_post_their_outcome_and_run_one_at_a_time():
    from lfm_edge.mobile_app.app.jobs import Job

    ui = UiQueue()
    job, got = Job(ui.post, "t"), []
    release = threading.Event()
    assert job.start(lambda cancel: release.wait(10) and 42, got.append, got.append)
    assert job.running and not job.start(lambda cancel: 0, got.append, got.append)  # busy: refused
    release.set()
    ui.run_until(lambda: not job.running)
    assert got == [42]
    assert job.start(lambda cancel: 1 / 0, got.append, got.append)
    ui.run_until(lambda: not job.running)
    assert isinstance(got[-1], ZeroDivisionError)


# --- model folder -----------------------------------------------------------------------------------------------

def test_model_folder_checks_and_info(demo_int4, tmp_path):
    assert check_folder(demo_int4) is None
    assert check_folder("") == "no folder given"
    assert "no such folder" in check_folder(tmp_path / "nope")
    assert "not a bundle (no genai_config.json, tokenizer.json)" in check_folder(tmp_path)
    info = bundle_info(demo_int4)
    assert info.quant == "int4" and info.model_type == "lfm2_moe" and 1 < info.megabytes < 10
    assert "int4" in info.summary()
    assert default_bundle(tmp_path) is None
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    shutil.copytree(demo_int4, downloads / ".half.download")  # unfinished: never offered
    (downloads / "junk").mkdir()
    assert default_bundle(tmp_path, downloads) is None
    shutil.copytree(demo_int4, downloads / "fetched")
    assert default_bundle(tmp_path, downloads) == downloads / "fetched"
    (tmp_path / "build").mkdir()
    shutil.copytree(demo_int4, tmp_path / "build" / "demo_model-int4-contrib")
    assert default_bundle(tmp_path, downloads) == tmp_path / "build" / "demo_model-int4-contrib"


def test_lfm_app_refuses_a_folder_that_is_not_a_bundle(tmp_path):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "lfm_edge.mobile_app.app", str(tmp_path)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 2 and out.stderr.strip() == (
        f"lfm-app: error: {tmp_path}: not a bundle (no genai_config.json, tokenizer.json)")


# --- benchmark --------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_quick_benchmark_on_the_demo_bundle_gives_a_verdict(demo_int4):
    preset = bench.PRESETS["quick"]
    seen: list[tuple[int, int, str]] = []
    report = bench.run_benchmark(demo_int4, preset, progress=lambda d, t, m: seen.append((d, t, m)))
    total = bench.stage_count(preset)
    assert [d for d, _, _ in seen] == list(range(total + 1)) and {t for _, t, _ in seen} == {total}
    assert seen[0][2] == "measuring read bandwidth" and seen[-1][2] == "done"
    assert report.decode_tps > 0 and report.prefill_tps > 0 and report.prefill_tokens == 16
    assert 0 < report.ttft_s < 5 and report.peak_rss_mb > 50 and report.load_s > 0
    assert 0 < report.rss_decoding_mb <= report.peak_rss_mb
    # a measured bandwidth, whatever this shared machine gives it (speed itself is the benchmark's business)
    assert 0 < report.bandwidth_gbs < 10_000 and report.bytes_per_token > 1e5
    assert report.ceiling_tps == pytest.approx(report.bandwidth_gbs * 1e9 / report.bytes_per_token)
    assert 0 < report.fraction == report.decode_tps / report.ceiling_tps
    assert len(report.phone_rows()) == 8 and all(r[2] in ("yes", "no") for r in report.phone_rows())
    assert "Roofline:" in report.roofline_text() and "of it." in report.roofline_text()
    # the verdict is about LFM2.5-8B-A1B int4 on phones, predicted from its bytes per token at the full model's
    # recorded efficiency (the demo's is a cache's, not memory's); the demo's own speed is shown as the demo's
    p = report.prediction
    assert p.model == "LFM2.5-8B-A1B int4" and p.bytes_per_token == roofline.REFERENCE_BYTES_PER_TOKEN
    assert not p.efficiency_measured_here and p.efficiency == roofline.FULL_MODEL_EFFICIENCY.fraction
    assert p.measured_bytes_per_token == report.bytes_per_token < p.memory_bound_bytes
    for soc, tps, meets in report.phone_rows():
        expected = roofline.PHONE_SOCS[soc] * 1e9 * p.efficiency / p.bytes_per_token
        assert float(tps) == pytest.approx(expected, abs=0.05) and meets == ("yes" if expected >= 30 else "no")
    assert report.verdict == bench.verdict(p) and report.verdict.startswith("LFM2.5-8B-A1B int4 on phones: ")
    assert report.reaches_target == all(r[2] == "yes" for r in report.phone_rows())
    # what was measured leads; the prediction is labelled as one, with its basis
    assert report.headline() == f"Measured here: demo_model int4 decodes {report.decode_tps:.1f} tok/s"
    assert report.prediction_heading() == "Predicted, not measured: LFM2.5-8B-A1B int4 on phones"
    verdict_line, basis = report.prediction_lines()
    assert report.verdict.endswith(verdict_line.removesuffix(" (target: 30 tok/s decode)."))
    assert "the full model's measured efficiency (31.1 tok/s at 35.6 GB/s, 2-core AMD EPYC Zen 4" in basis
    assert "device_bench/RESULTS.md" in basis and "too small" in basis and "measured on random weights" in basis
    labels = [label for label, _ in report.metric_rows()]
    assert labels[:4] == ["Decode (demo_model int4)", "Prefill (16 tokens)", "Time to first token",
                          "Peak in load + run: anon / file"]
    # the runs' peaks, split (each run loads the bundle here): at least what a run held after its load
    assert report.peak_anon_mb >= report.anon_after_load_mb - 1 and report.peak_file_mb >= report.file_after_load_mb - 1
    assert dict(report.metric_rows())[labels[3]] == f"{report.peak_anon_mb:.0f} / {report.peak_file_mb:.0f} MB"
    # resident memory split: the repacked int4 weights are anonymous, the mapped bundle file-backed
    assert report.anon_after_load_mb > 0 and report.file_after_load_mb > 0 and report.load_measured == "benchmark"
    assert 0 < report.anon_decoding_mb + report.file_decoding_mb <= report.peak_rss_mb + 1
    assert {"After load: anon / file", "Decoding: anon / file", "Load"} <= set(labels)
    assert 0 < report.weights_mb < 10 and "x weights)" in dict(report.metric_rows())["Memory while decoding"]


@pytest.mark.slow
def test_the_benchmark_measures_the_apps_session_and_opens_no_other(demo_int4):
    """The app's Benchmark screen passes the session its chat holds: no second copy of the model, the load
    reported is the app's own, and the progress bar has no load stages."""
    from lfm_edge.runtime.backends.python import live_sessions, sessions_opened

    model = load_model(demo_int4, threads=1)
    opened = sessions_opened()
    preset = bench.PRESETS["quick"]
    seen: list[tuple[int, int, str]] = []
    after_load = {"anonymous": 100.0, "file": 50.0, "peak_anonymous": 400.0, "peak_file": 300.0}
    report = bench.run_benchmark(demo_int4, preset, progress=lambda d, t, m: seen.append((d, t, m)),
                                 session=model.session, app_load=(1.25, after_load))
    assert sessions_opened() == opened and live_sessions().get(str(demo_int4)) == 1
    assert not any("load" in m for _, _, m in seen) and seen[-1][:2] == (bench.stage_count(preset, loads=False),) * 2
    assert report.load_s == 1.25 and report.load_measured == "app" and report.threads == 1
    assert (report.anon_after_load_mb, report.file_after_load_mb) == (100.0, 50.0)
    assert report.decode_tps > 0 and report.anon_decoding_mb > 0 and report.file_decoding_mb > 0
    rows = dict(report.metric_rows())
    assert "Load (the app's)" in rows and "Peak memory" not in rows
    # the app's load peaks (a mapped bundle beside its repacked copy) apart from the benchmark's own
    assert (report.load_peak_anon_mb, report.load_peak_file_mb) == (400.0, 300.0)
    assert rows["Peak in load: anon / file"] == "400 / 300 MB" and report.peak_anon_mb > 0 < report.peak_file_mb
    assert rows["Peak in benchmark: anon / file"] == f"{report.peak_anon_mb:.0f} / {report.peak_file_mb:.0f} MB"
    # the chat goes on with the same model afterwards
    assert model.chat([{"role": "user", "content": "Hi"}], max_new_tokens=2).stats.generated_tokens >= 1


def test_load_times_scale_the_next_loads_progress(tmp_path):
    from lfm_edge.mobile_app.app.model import LoadTimes

    times = LoadTimes(tmp_path / "data" / "load_times.json")
    assert times.get(Path("/b")) is None
    times.put(Path("/b"), 4.321)
    assert LoadTimes(tmp_path / "data" / "load_times.json").get(Path("/b")) == 4.32
    (tmp_path / "data" / "load_times.json").write_text("{damaged")
    assert times.get(Path("/b")) is None
    times.put(Path("/c"), 1.0)  # a damaged file is replaced, not fatal
    assert times.get(Path("/c")) == 1.0
    LoadTimes(None).put(Path("/b"), 1.0)  # no data folder: nothing kept, no error


def test_roofline_without_the_onnx_package(demo_int4):
    """A phone build has no onnx: an lfm-export bundle's manifest.json gives the bytes per token."""

    code = ("from lfm_edge.mobile_app.app import bench\n"
            "report = bench.BenchReport('b', 'quick', 1, 100.0, 16, 40.0, 0.1, 0.5, 300.0, 250.0, False)\n"
            f"report = bench.add_roofline(report, {str(demo_int4)!r}, 30.0)\n"
            "assert 'onnx' not in sys.modules\n"
            "print(report.roofline_text())\n")
    out = run_without("onnx", code)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("Roofline: ") and "at 30.0 GB/s" in out.stdout


def test_a_bundle_without_bytes_per_token_still_gets_the_full_models_prediction(tmp_path):
    """No manifest entry and no onnx (a builder bundle on a phone): no roofline for it, but the verdict about
    LFM2.5-8B-A1B int4 stands, at the full model's recorded efficiency."""
    (tmp_path / "model.onnx").write_bytes(b"")
    code = ("from lfm_edge.mobile_app.app import bench\n"
            "report = bench.BenchReport('b', 'quick', 1, 100.0, 16, 40.0, 0.1, 0.5, 300.0, 250.0, False)\n"
            f"report = bench.add_roofline(report, {str(tmp_path)!r}, 30.0)\n"
            "print(report.roofline_text()); print(report.verdict); print(report.prediction.efficiency)\n")
    out = run_without("onnx", code)
    assert out.returncode == 0, out.stderr[-2000:]
    roof, verdict, efficiency = out.stdout.strip().splitlines()
    assert roof.startswith("Roofline unavailable: onnx is not installed")
    assert verdict.startswith("LFM2.5-8B-A1B int4 on phones: ")
    assert float(efficiency) == roofline.FULL_MODEL_EFFICIENCY.fraction


def test_verdict_wording():
    report = bench.BenchReport("b", "quick", 1, 100.0, 16, 2567.8, 0.1, 0.5, 300.0, 250.0, False,
                               model_label="demo_model int4")
    assert report.verdict == "no phone prediction yet" and not report.reaches_target
    report.prediction = roofline.phone_prediction(None, None, 0.0)
    assert report.verdict == "LFM2.5-8B-A1B int4 on phones: 45-74 tok/s predicted; reaches 30 tok/s on all 8"
    assert report.reaches_target
    report.prediction.phones = roofline.phone_predictions(roofline.REFERENCE_BYTES_PER_TOKEN, 0.5)
    assert report.verdict == "LFM2.5-8B-A1B int4 on phones: 29-48 tok/s predicted; reaches 30 tok/s on 6 of 8"
    assert not report.reaches_target
    assert report.headline() == "Measured here: demo_model int4 decodes 2567.8 tok/s"
    assert report.headline_note() == "Best decode median of this quick run, on this device, 1 thread."
    assert report.prediction_heading() == "Predicted, not measured: LFM2.5-8B-A1B int4 on phones"
    assert report.prediction_lines()[0] == ("29-48 tok/s predicted; reaches 30 tok/s on 6 of 8 "
                                            "(target: 30 tok/s decode).")


def test_benchmark_cancel_stops_at_the_next_stage(demo_int4):
    cancel = threading.Event()
    messages = []

    def progress(done, total, message):
        messages.append(message)
        if "load" in message:
            cancel.set()

    with pytest.raises(bench.Cancelled):
        bench.run_benchmark(demo_int4, bench.PRESETS["quick"], progress=progress, cancel=cancel)
    assert messages[-1] == "warm-up: load"


def test_benchmark_loads_through_the_backends_and_cancels_mid_decode(demo_int4, monkeypatch):
    """The bundle is opened with backends.open_session (a phone's Java or Objective-C backend); a cancel set
    while decoding stops the run inside bench.run's decode loop, not after the workload."""
    from lfm_edge.runtime import backends

    cancel, opened, messages = threading.Event(), [], []
    real_open = backends.open_session

    def open_session(bundle, threads):
        opened.append((bundle, threads))
        session = real_open(bundle, threads)
        new_cache = session.new_cache

        def cancelling_cache(*args, **kwargs):  # Cancel pressed after the first decode step
            cache = new_cache(*args, **kwargs)
            step = cache.step

            def step_then_cancel(ids, *rest, **kwargs):
                out = step(ids, *rest, **kwargs)
                if "decode" in messages[-1]:
                    cancel.set()
                return out

            cache.step = step_then_cancel
            return cache

        session.new_cache = cancelling_cache
        return session

    monkeypatch.setattr(backends, "open_session", open_session)
    preset = bench.PRESETS["quick"]
    with pytest.raises(bench.Cancelled):
        bench.run_benchmark(demo_int4, preset, progress=lambda d, t, m: messages.append(m), cancel=cancel)
    assert opened == [(demo_int4, preset.threads)]
    assert messages[-1] == "warm-up: decode 8 at depth 0"


# --- download ---------------------------------------------------------------------------------------------------

class BundleServer(http.server.ThreadingHTTPServer):
    """Serves one folder with Range support; `cut[name] = n` ends the next response for `name` after n bytes."""

    def __init__(self, folder: Path):
        self.folder, self.cut, self.ranges = folder, {}, []
        super().__init__(("127.0.0.1", 0), RangeHandler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/bundle/"


class RangeHandler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        name = self.path.removeprefix("/bundle/")
        path = self.server.folder / name
        if "/" in name or not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        start = 0
        if rng := self.headers.get("Range"):
            start = int(rng.removeprefix("bytes=").split("-")[0])
            self.server.ranges.append((name, start))
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if name in self.server.cut:
            self.wfile.write(body[: self.server.cut.pop(name)])  # then the connection drops
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)


@pytest.fixture
def server(demo_int4, tmp_path):
    served = tmp_path / "served"
    shutil.copytree(demo_int4, served)
    srv = BundleServer(served)
    thread = threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_download_checks_every_file_and_installs_the_bundle(server, tmp_path):
    seen = []
    dest = download.fetch_bundle(server.url, tmp_path / "models" / "demo", progress=seen.append)
    manifest = json.loads((dest / "manifest.json").read_text())
    assert sorted(p.name for p in dest.iterdir()) == sorted([*manifest["files"], "manifest.json"])
    for name in manifest["files"]:
        assert _digest(dest / name) == _digest(server.folder / name)
    assert seen[-1].done == seen[-1].total == sum(f["bytes"] for f in manifest["files"].values())
    assert seen[-1].file_index == seen[-1].file_count == len(manifest["files"])
    assert not download.partial_folder(dest).exists()
    assert check_folder(dest) is None
    assert load_model(dest, threads=1).chat([{"role": "user", "content": "hi"}], max_new_tokens=3).stats.stopped


def test_an_interrupted_transfer_resumes_with_a_range_request(server, tmp_path):
    dest = tmp_path / "models" / "demo"
    size = (server.folder / "model.onnx.data").stat().st_size
    server.cut["model.onnx.data"] = 500_000
    with pytest.raises(download.DownloadError, match=r"model.onnx.data: transfer interrupted at 500000 of"):
        download.fetch_bundle(server.url, dest)
    assert not dest.exists()  # never a half bundle where the app looks
    assert (download.partial_folder(dest) / "model.onnx.data").stat().st_size == 500_000

    progress = []
    download.fetch_bundle(server.url + "manifest.json", dest, progress=progress.append)
    assert ("model.onnx.data", 500_000) in server.ranges
    assert _digest(dest / "model.onnx.data") == _digest(server.folder / "model.onnx.data")
    # the bar starts from what is already on disk, and only moves forward
    assert progress[0].done >= 500_000 < size
    assert all(a.done <= b.done for a, b in zip(progress, progress[1:], strict=False))


def test_a_corrupted_file_is_rejected_by_name_and_nothing_is_installed(server, tmp_path):
    dest = tmp_path / "models" / "demo"
    shutil.copytree(server.folder, dest)  # a good bundle already installed there
    before = _digest(dest / "tokenizer.json")
    data = bytearray((server.folder / "tokenizer.json").read_bytes())
    data[100] ^= 0xFF  # same size, wrong content
    (server.folder / "tokenizer.json").write_bytes(bytes(data))
    with pytest.raises(download.DownloadError, match=r"^tokenizer.json: checksum mismatch \(sha256 "):
        download.fetch_bundle(server.url, dest)
    assert _digest(dest / "tokenizer.json") == before and check_folder(dest) is None  # the old bundle stays
    assert not (download.partial_folder(dest) / "tokenizer.json").exists()  # not kept for a resume


def test_cancel_keeps_the_partial_download_for_later(server, tmp_path):
    dest = tmp_path / "demo"
    cancel = threading.Event()

    def progress(p):
        if p.file == "model.onnx.data" and p.done > 0:
            cancel.set()

    with pytest.raises(download.DownloadCancelled, match="cancelled during model.onnx.data"):
        download.fetch_bundle(server.url, dest, progress=progress, cancel=cancel)
    assert not dest.exists() and (download.partial_folder(dest) / "model.onnx.data").is_file()
    download.fetch_bundle(server.url, dest)
    assert check_folder(dest) is None


def test_bad_addresses_and_manifests_are_clear_errors(server, tmp_path):
    with pytest.raises(download.DownloadError, match="expected an http:// or https:// address"):
        download.fetch_bundle("ftp://example.org/b/", tmp_path / "x")
    with pytest.raises(download.DownloadError, match=r"manifest.json: the server answered 404"):
        download.fetch_bundle(server.url.replace("/bundle/", "/nothing/"), tmp_path / "x")
    manifest = json.loads((server.folder / "manifest.json").read_text())
    manifest["files"]["../escape"] = {"bytes": 1, "sha256": "0" * 64}
    (server.folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(download.DownloadError, match=r"refusing the file name '\.\./escape'"):
        download.fetch_bundle(server.url, tmp_path / "x")
    (server.folder / "manifest.json").write_text("{}")
    with pytest.raises(download.DownloadError, match="not a bundle manifest"):
        download.fetch_bundle(server.url, tmp_path / "x")
    assert download.default_name("https://host/models/lfm2-int4/manifest.json") == "lfm2-int4"
    assert download.default_name("https://host/") == "bundle"


def test_the_think_setting_caps_reasoning_and_the_footer_says_so(tmp_path):
    ui = UiQueue()
    chat = ChatController(ui.post, tools={}, max_new_tokens=200)
    tok = Tokenizer.from_file(str(DEMO / "tokenizer.json"))
    eos, vocab = tok.token_to_id("<|im_end|>"), tok.get_vocab_size()
    probe = load_model(write_bundle(tmp_path / "probe", DEMO, {}, vocab, eos), threads=1)
    at = len(probe.prompt_ids(chat.conversation_for("Why?")))
    thinking = tok.encode("<think>" + "".join(f" step {i}" for i in range(150)), add_special_tokens=False).ids
    chat.set_model(load_model(write_bundle(tmp_path / "thinker", DEMO, {at + i: t for i, t in enumerate(thinking)},
                                           vocab, eos), threads=1))
    assert [chat.cycle_thinking() for _ in range(4)] == ["Think: 256", "Think: 64", "Think: off", "Think: full"]
    chat.cycle_thinking()
    chat.cycle_thinking()  # 64
    assert chat.send("Why?") is None
    ui.run_until(lambda: chat.state == IDLE)
    answer = chat.items[-1]
    assert "thinking ended after 64 (budget)" in answer.footer
    assert chat.conversation.stats[-1].thinking_tokens == 64
