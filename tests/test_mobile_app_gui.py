"""The real Kivy app under a virtual X display (Xvfb, Mesa's software OpenGL): load the int4 demo bundle,
run the quick benchmark, download a bundle from a local server, chat with a tool call, and screenshot each
screen into build/screenshots/. The app is driven by its own autopilot, which presses the same buttons a
user would; the test reads the app's state and the PNGs it wrote.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from PIL import Image
from test_mobile_app_logic import (
    ANSWER,
    QUESTION,
    REASONING,
    BundleServer,
    demo_int4_bundle,
    scripted_tool_bundle,
    talker_bundle,
)

from lfm_edge.mobile_app.app.transcript import ChatController

ROOT = Path(__file__).resolve().parent.parent
SHOTS = ROOT / "build" / "screenshots"


@pytest.fixture(scope="module")
def demo_int4(tmp_path_factory):
    # the session's shared int4 bundle, copied: the app writes its prepack cache next to the bundle it loads, and
    # a shared bundle is never written into (test_prepack copies it and expects no cache there)
    shared = demo_int4_bundle(tmp_path_factory.getbasetemp())
    return Path(shutil.copytree(shared, tmp_path_factory.mktemp("gui") / shared.name))


@pytest.fixture(scope="module")
def display():
    """A private X display; skipped only where none can be started and this is not CI."""
    xvfb = shutil.which("Xvfb")
    if xvfb is None:
        if os.environ.get("CI"):
            pytest.fail("Xvfb is missing in CI: `make test` installs it (Makefile target display-deps)")
        pytest.skip("no Xvfb here (apt-get install xvfb libgl1-mesa-dri, or run `make test` as root)")
    read, write = os.pipe()
    # -displayfd: Xvfb picks a free display number and writes it once it accepts connections
    proc = subprocess.Popen([xvfb, "-displayfd", str(write), "-screen", "0", "1024x1024x24", "-nolisten", "tcp"],
                            pass_fds=(write,), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    os.close(write)
    ready, _, _ = select.select([read], [], [], 20)
    number = os.read(read, 64).decode().strip() if ready else ""
    os.close(read)
    if not number:
        proc.kill()
        message = f"Xvfb did not start: {proc.stderr.read().decode()[-2000:]}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    yield f":{number}"
    proc.terminate()
    proc.wait(10)


def _non_trivial(path: Path) -> int:
    """Distinct colours in the screenshot (a blank or failed capture has one or two)."""
    image = Image.open(path).convert("RGB")
    assert image.size == (480, 900)
    return len(image.getcolors(maxcolors=1 << 20) or [])


@pytest.mark.slow
def test_the_app_chats_with_a_tool_benchmarks_and_downloads_under_a_virtual_display(display, demo_int4, tmp_path):
    scripted = scripted_tool_bundle(tmp_path, ChatController(lambda fn: None))  # the app's tools, fresh chat
    served = tmp_path / "served"
    shutil.copytree(demo_int4, served)
    server = BundleServer(served)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    SHOTS.mkdir(parents=True, exist_ok=True)
    for old in SHOTS.glob("*.png"):
        old.unlink()
    state_file = tmp_path / "state.json"
    steps = [
        {"load": str(demo_int4)},
        {"bench": "quick"},
        {"state": str(tmp_path / "after-bench.json")},
        {"shot": str(SHOTS / "benchmark.png")},
        {"download": server.url},  # installs into --downloads, then loads it
        {"shot": str(SHOTS / "model.png")},
        {"load": str(scripted)},
        {"chat": QUESTION},
        {"shot": str(SHOTS / "chat.png")},
        {"reasoning": 1},
        {"shot": str(SHOTS / "chat-reasoning.png")},
        {"state": str(tmp_path / "tool-turn.json")},
        {"load": str(talker_bundle(tmp_path / "talker"))},
        {"send": "Talk until I stop you."},
        {"cancel_after": 5},  # pressed by the UI thread while the worker generates
        {"shot": str(SHOTS / "chat-cancelled.png")},
        {"state": str(state_file)},
        {"quit": True},
    ]
    (tmp_path / "steps.json").write_text(json.dumps(steps))
    env = dict(os.environ, DISPLAY=display, KIVY_HOME=str(tmp_path / "kivy-home"), OMP_NUM_THREADS="1")
    try:
        result = subprocess.run([sys.executable, "-m", "lfm_edge.mobile_app.app", "--threads", "1",
                                 "--max-new-tokens", "1200", "--downloads",
                                 str(tmp_path / "downloads"), "--autopilot", str(tmp_path / "steps.json"),
                                 "--conversation-file", str(tmp_path / "chat.safetensors"),
                                 "--prepack-cache", "auto"],  # the opt-in path, tested in the app
                                env=env, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    finally:
        server.shutdown()
        server.server_close()
    state = json.loads(state_file.read_text()) if state_file.is_file() else {}
    assert result.returncode == 0 and not state.get("autopilot_errors"), (
        f"exit {result.returncode}, autopilot: {state.get('autopilot_errors')}\n{result.stderr[-4000:]}")

    # chat: the question, reasoning kept apart, the calculator's card with its result, the answer
    tool_turn = json.loads((tmp_path / "tool-turn.json").read_text())
    user, thought, card, answer = tool_turn["chat"]["items"]
    assert user["text"] == QUESTION and thought["reasoning"] == REASONING and thought["show_reasoning"]
    assert card["kind"] == "ToolCard" and card["name"] == "calculator" and card["arguments"] == {"expression": "2+3"}
    assert card["result"] == {"result": 5}
    assert answer["text"].strip() == ANSWER and tool_turn["chat"]["state"] == "idle"
    # cancel: the endless answer stopped early, by the button, and the chat is ready again
    _, talk = state["chat"]["items"]
    assert talk["footer"].endswith("cancelled") and 5 <= talk["text"].count("la") < 1200
    assert state["chat"]["state"] == "idle"
    # benchmark: a report on the demo bundle and its verdict line, measured on the chat's own session: the
    # app opened the bundle once and never held two sessions of it
    bench = state["bench"]
    assert bench["report"]["bundle"] == str(demo_int4) and bench["report"]["decode_tps"] > 0
    # what was measured leads: the demo's own decode, first and labelled as the demo's; the verdict about
    # LFM2.5-8B-A1B int4 on phones follows under a heading that says it is a prediction, with its basis
    assert bench["verdict"].startswith("LFM2.5-8B-A1B int4 on phones: ")
    assert bench["verdict"].endswith(("reaches 30 tok/s on all 8", "below the 30 tok/s target on all 8", " of 8"))
    shown = bench["shown"]
    decode = bench["report"]["decode_tps"]
    assert shown[0] == bench["headline"] == f"Measured here: demo_model int4 decodes {decode:.1f} tok/s"
    assert shown[shown.index("Decode (demo_model int4)") + 1] == f"{decode:.1f} tok/s"
    predicted = shown.index("[b]Predicted, not measured: LFM2.5-8B-A1B int4 on phones[/b]")
    assert shown.index("Decode (demo_model int4)") < predicted
    assert bench["verdict"].endswith(shown[predicted + 1].removesuffix(" (target: 30 tok/s decode)."))
    assert "the full model's measured efficiency" in shown[predicted + 2] and shown[predicted + 3] == "SoC"
    after_bench = json.loads((tmp_path / "after-bench.json").read_text())
    assert after_bench["sessions"] == {"opened": {str(demo_int4): 1}, "live": {str(demo_int4): 1}}
    report = after_bench["bench"]["report"]
    assert report["load_measured"] == "app" and report["load_s"] == after_bench["model"]["load_seconds"] > 0
    assert report["anon_decoding_mb"] > 0 and report["file_decoding_mb"] > 0 and report["threads"] == 1
    # the peaks apart, anonymous and file-backed: the app's load (tracked by the Model screen) and the benchmark's
    load_memory = after_bench["model"]["memory_after_load"]
    assert load_memory["peak_anonymous"] >= load_memory["anonymous"] - 1 and load_memory["peak_file"] > 0
    assert (report["load_peak_anon_mb"], report["load_peak_file_mb"]) == (load_memory["peak_anonymous"],
                                                                          load_memory["peak_file"])
    assert {"Peak in load: anon / file", "Peak in benchmark: anon / file"} <= set(shown)
    # the app maps its weights from a prepack cache (written by its first load of the bundle, here or in the
    # logic tests that share the bundle), and says so
    current = after_bench["model"]["current"]
    assert "prepack cache" in current and "mapped" in current and "GB on disk" in current
    assert (demo_int4 / "prepacked" / "cache.json").is_file()
    # each bundle loaded once; a load drops the model before it, so only the last one is alive
    downloaded = str(tmp_path / "downloads" / "bundle")
    loaded = [str(demo_int4), downloaded, str(scripted), str(tmp_path / "talker")]
    assert state["sessions"] == {"opened": dict.fromkeys(loaded, 1), "live": {str(tmp_path / "talker"): 1}}
    # model: the download was verified and installed where the app was told
    assert state["model"]["download_status"] == f"downloaded and verified: {tmp_path / 'downloads' / 'bundle'}"
    assert (tmp_path / "downloads" / "bundle" / "manifest.json").is_file()
    assert tool_turn["model"]["loaded"] == str(scripted)

    # closed with the talker's chat on screen: it was saved, and the next start with that bundle shows it again
    assert (tmp_path / "chat.safetensors").is_file()
    (tmp_path / "again.json").write_text(json.dumps([{"state": str(tmp_path / "restored.json")}, {"quit": True}]))
    again = subprocess.run([sys.executable, "-m", "lfm_edge.mobile_app.app", str(tmp_path / "talker"), "--threads",
                            "1", "--autopilot", str(tmp_path / "again.json"), "--conversation-file",
                            str(tmp_path / "chat.safetensors")], env=env, cwd=tmp_path, capture_output=True,
                           text=True, timeout=120)
    restored = json.loads((tmp_path / "restored.json").read_text())
    assert again.returncode == 0 and not restored.get("autopilot_errors"), again.stderr[-2000:]
    # the chat screen was up while the model loaded in the background, saying so
    at_start = restored["at_start"]
    assert at_start["screen"] == "chat" and at_start["model"]["loading"] == str(tmp_path / "talker")
    assert at_start["chat"]["status"].startswith("loading talker: ")
    user, talk_again = restored["chat"]["items"]
    assert user["text"] == "Talk until I stop you." and talk_again["text"] == talk["text"].strip()

    for name in ("chat", "chat-reasoning", "chat-cancelled", "benchmark", "model"):
        path = SHOTS / f"{name}.png"
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert _non_trivial(path) > 50, name


@pytest.mark.slow
def test_a_failing_step_says_which_and_why_the_start_is_quiet_and_a_phone_size_is_scaled(display, tmp_path):
    """A failing autopilot step ends the app with exit 1 and a line on stderr naming the step and the error (it
    used to print nothing); Kivy's start logs no traceback and nothing CRITICAL about the optional libmtdev and
    xclip (desktop.py KnownNoise); --size 960x1800 shows the 480x900 layout at density 2, not a tiny one."""
    missing = tmp_path / "no-bundle"
    state_file = tmp_path / "state.json"
    steps = [{"state": str(state_file)}, {"load": str(missing)}, {"quit": True}]
    (tmp_path / "steps.json").write_text(json.dumps(steps))
    env = dict(os.environ, DISPLAY=display, KIVY_HOME=str(tmp_path / "kivy-home"))
    out = subprocess.run([sys.executable, "-m", "lfm_edge.mobile_app.app", "--size", "960x1800", "--autopilot",
                          str(tmp_path / "steps.json"), "--downloads", str(tmp_path / "downloads")],
                         env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    error = f"step 2 {json.dumps(steps[1])}: RuntimeError: load {missing}: {missing}: no such folder"
    assert out.returncode == 1 and f"lfm-app: autopilot {error}" in out.stderr.splitlines(), out.stderr[-3000:]
    assert "Traceback" not in out.stderr and "CRITICAL" not in out.stderr
    state = json.loads(state_file.read_text())
    assert state["autopilot_errors"] == [error]
    assert state["window"]["size"] == [960, 1800] and state["window"]["density"] == 2.0
    assert state["window"]["tab_height"] == 2 * 52  # the tab bar's 52 dp, at that density


@pytest.mark.slow
def test_the_serve_switch_serves_the_chats_model_to_an_openai_client(display, demo_int4, tmp_path):
    """Model screen, Serve on: an OpenAI client on this device (the official one) lists the model and gets an
    answer with the key the screen shows, nothing without it; the app holds one session; Serve off closes the
    port."""
    import time

    import httpx2
    from openai import OpenAI

    on, go, off = tmp_path / "on.json", tmp_path / "go", tmp_path / "off.json"
    steps = [{"load": str(demo_int4)}, {"serve": True}, {"shot": str(SHOTS / "model-serving.png")},
             {"state": str(on)}, {"wait_file": str(go)}, {"serve": False}, {"state": str(off)}, {"quit": True}]
    (tmp_path / "steps.json").write_text(json.dumps(steps))
    env = dict(os.environ, DISPLAY=display, KIVY_HOME=str(tmp_path / "kivy-home"), OMP_NUM_THREADS="1")
    app = subprocess.Popen([sys.executable, "-m", "lfm_edge.mobile_app.app", "--threads", "1", "--autopilot",
                            str(tmp_path / "steps.json"), "--conversation-file", str(tmp_path / "chat.safetensors")],
                           env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(1200):
            if on.is_file() or app.poll() is not None:
                break
            time.sleep(0.1)
        state = json.loads(on.read_text())
        serve = state["model"]["serve"]
        assert serve["running"] and serve["address"].startswith("http://127.0.0.1:") and len(serve["key"]) >= 20
        assert serve["address"] in state["model"]["serve_status"] and serve["key"] in state["model"]["serve_status"]
        client = OpenAI(base_url=serve["address"], api_key=serve["key"], max_retries=0, timeout=60)
        assert [m.id for m in client.models.list().data] == [demo_int4.name]
        answer = client.chat.completions.create(model=demo_int4.name, max_tokens=6, temperature=0,
                                                messages=[{"role": "user", "content": "What is a list?"}])
        assert answer.choices[0].message.content and answer.usage.completion_tokens <= 6
        assert httpx2.get(f"{serve['address']}/models", timeout=30).status_code == 401  # no key
    finally:
        go.touch()
        out, err = app.communicate(timeout=120)
    final = json.loads(off.read_text())
    assert app.returncode == 0 and not final.get("autopilot_errors"), err[-3000:]
    assert not final["model"]["serve"]["running"] and final["model"]["serve_status"] == "not serving (stopped)"
    assert final["sessions"]["opened"] == {str(demo_int4): 1}  # the server used the chat's session
    with pytest.raises(httpx2.ConnectError):
        httpx2.get(f"{serve['address']}/models", timeout=5)
