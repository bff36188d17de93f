"""lfm-serve, driven by clients nobody here wrote: the official `openai` package and raw httpx, against a live
server on the demo bundle. Answers equal a fresh stateless generation over the same messages, token for token,
while a resent history reuses the kept state."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx2 as httpx
import pytest
from openai import APIStatusError, OpenAI
from shared_bundles import demo_bundle

from lfm_edge.runtime import LfmModel

MODEL = "demo-int4"
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city.",
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
                          "required": ["city"]}}}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(bundle: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    proc = subprocess.Popen([str(Path(sys.executable).parent / "lfm-serve"), str(bundle), "--port", str(port),
                             "--model-id", MODEL, "--threads", "1", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            httpx.get(f"{base}/health", timeout=1, headers={"authorization": "Bearer k"})
            return proc, base
        except httpx.HTTPError:
            if proc.poll() is not None:
                raise RuntimeError(proc.stderr.read()) from None
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("lfm-serve did not start")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return demo_bundle(tmp_path_factory.getbasetemp(), "int4")


@pytest.fixture(scope="module")
def served(bundle):
    proc, base = _serve(bundle, "--queue", "1")
    yield proc, base
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server(served) -> str:
    return served[1]


@pytest.fixture(scope="module")
def client(server) -> OpenAI:
    return OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def local(bundle) -> LfmModel:
    return LfmModel(bundle, threads=1)


def _fresh(local: LfmModel, messages: list[dict], **kwargs) -> str:
    """What a fresh stateless generation over the same messages answers (greedy)."""
    return local.chat(messages, max_new_tokens=12, **kwargs).text


def test_plain_and_streamed_answers_equal_a_fresh_generation(client, local):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a list?"}]
    plain = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0)
    assert plain.choices[0].message.content == _fresh(local, messages)
    assert plain.choices[0].finish_reason in ("stop", "length") and plain.usage.completion_tokens <= 12
    parts, usage = [], None
    for chunk in client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0,
                                                stream=True, stream_options={"include_usage": True}):
        if chunk.choices and chunk.choices[0].delta.content:
            parts.append(chunk.choices[0].delta.content)
        usage = chunk.usage or usage
    assert "".join(parts) == plain.choices[0].message.content
    assert usage.prompt_tokens == plain.usage.prompt_tokens


def test_a_resent_history_reuses_the_kept_state_and_stays_exact(client, local):
    """Turn 2 extends turn 1 (its state is reused: cached tokens), a branch edits turn 1's question (rolled back),
    and each answer is what a fresh generation over the same messages gives."""
    history = [{"role": "user", "content": "What is a tuple?"}]
    first = client.chat.completions.create(model=MODEL, messages=history, max_tokens=12, temperature=0)
    history += [{"role": "assistant", "content": first.choices[0].message.content},
                {"role": "user", "content": "And a set?"}]
    second = client.chat.completions.create(model=MODEL, messages=history, max_tokens=12, temperature=0)
    assert second.choices[0].message.content == _fresh(local, history)
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached >= 0.9 * first.usage.prompt_tokens and cached < second.usage.prompt_tokens
    branch = [{"role": "user", "content": "What is a dict?"}] + history[1:]
    third = client.chat.completions.create(model=MODEL, messages=branch, max_tokens=12, temperature=0)
    assert third.choices[0].message.content == _fresh(local, branch)


def test_tool_round_trip(client, local):
    """tool_choice required: the call comes back as tool_calls with JSON arguments held to the schema; the tool's
    result goes back as a tool message and the model answers."""
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    call = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER], tool_choice="required",
                                          parallel_tool_calls=False, max_tokens=120, temperature=0)
    choice = call.choices[0]
    assert choice.finish_reason == "tool_calls"
    (tool_call,) = choice.message.tool_calls
    assert tool_call.function.name == "get_weather"
    arguments = json.loads(tool_call.function.arguments)
    assert isinstance(arguments["city"], str) and len(arguments["city"]) <= 20
    messages += [choice.message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": tool_call.id, "content": json.dumps({"sky": "sunny", "c": 21})}]
    answer = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER], max_tokens=12,
                                            temperature=0)
    assert answer.choices[0].message.content is not None or answer.choices[0].message.tool_calls
    assert answer.usage.prompt_tokens_details.cached_tokens > 0  # the call's state was kept


def test_tool_choice_none_and_a_named_function(client):
    none = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Weather?"}],
                                          tools=[WEATHER], tool_choice="none", max_tokens=8, temperature=0)
    assert not none.choices[0].message.tool_calls
    # a greeting, forced into a call ("Hi" forced gets a city the demo model never closes within 120 tokens)
    named = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hello"}],
                                           tools=[WEATHER], max_tokens=120,
                                           tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                           temperature=0)
    assert named.choices[0].message.tool_calls[0].function.name == "get_weather"


def test_json_schema_answers_are_valid_by_construction(client):
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}}, "required": ["city"],
              "additionalProperties": False}
    done = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "A city?"}], max_tokens=40, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": schema, "strict": True}})
    data = json.loads(done.choices[0].message.content)
    assert set(data) == {"city"} and isinstance(data["city"], str)
    # json_object has no length bound: a prompt on which the demo's JSON closes within max_tokens
    obj = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "A JSON object, please."}],
                                         max_tokens=100, temperature=0, response_format={"type": "json_object"})
    assert obj.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(obj.choices[0].message.content), dict)


@pytest.mark.parametrize("body,status,param", [
    ({"model": MODEL, "messages": []}, 400, "messages"),
    ({"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0].role"),
    ({"model": MODEL, "messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "n": 3}, 400, "n"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "temperature": "hot"}, 400, "temperature"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "logprobs": True}, 400, "logprobs"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "frobnicate": 1}, 400, "frobnicate"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function",
      "function": {"name": "f", "parameters": {"properties": []}}}]}, 400, "tools[0]"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 10**6}, 400, "messages"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hello there"}] * 1000}, 400, "messages"),
    ({"model": "gpt-4", "messages": [{"role": "user", "content": "x"}]}, 404, "model"),
    ([1, 2], 400, None),
])
def test_bad_requests_get_openai_errors(server, body, status, param):
    r = httpx.post(f"{server}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == status
    error = r.json()["error"]
    assert error["param"] == param and error["message"] and error["type"]


def test_malformed_json_huge_bodies_and_unknown_routes(server):
    r = httpx.post(f"{server}/v1/chat/completions", content=b"{not json", timeout=30)
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = httpx.post(f"{server}/v1/chat/completions", content=b"x" * (9 << 20), timeout=60)
    assert r.status_code == 413
    assert httpx.get(f"{server}/v1/nothing", timeout=30).status_code == 404
    assert httpx.get(f"{server}/v1/chat/completions", timeout=30).status_code == 405
    health = httpx.get(f"{server}/health", timeout=30).json()
    assert health["status"] == "ok" and health["model"] == MODEL and "kept_bytes" in health["states"]


def test_an_openai_error_reaches_the_client_as_its_exception(client):
    with pytest.raises(APIStatusError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=10**6)
    assert e.value.status_code == 400 and "maximum context length is 4096" in str(e.value)


def test_a_disconnect_mid_stream_cancels_the_generation(server):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Write at length."}], "max_tokens": 3000,
            "stream": True, "temperature": 0}
    with httpx.stream("POST", f"{server}/v1/chat/completions", json=body, timeout=60) as r:
        for _ in r.iter_lines():
            break  # one chunk, then gone
    for _ in range(100):  # the slot is free again at once, not after 3000 tokens
        if not httpx.get(f"{server}/health", timeout=30).json()["generating"]:
            break
        time.sleep(0.1)
    assert not httpx.get(f"{server}/health", timeout=30).json()["generating"]


@pytest.mark.slow
def test_requests_beyond_the_queue_get_429(server):
    import threading

    # a JSON answer the demo model never closes: each request runs its 400 tokens (its plain answers end in 30-90)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "What is a list?"}], "max_tokens": 400,
            "response_format": {"type": "json_object"}}
    statuses = []

    def post() -> None:
        statuses.append(httpx.post(f"{server}/v1/chat/completions", json=body, timeout=120).status_code)

    threads = [threading.Thread(target=post) for _ in range(4)]
    for t in threads:
        t.start()
        time.sleep(0.2)
    for t in threads:
        t.join()
    assert 429 in statuses and 200 in statuses


@pytest.mark.slow
def test_an_api_key_is_required_when_set(bundle):
    proc, base = _serve(bundle, "--api-key", "k")
    try:
        r = httpx.get(f"{base}/v1/models", timeout=30)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        keyed = OpenAI(base_url=f"{base}/v1", api_key="k", max_retries=0)
        assert [m.id for m in keyed.models.list().data] == [MODEL]
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_memory_stays_flat_over_many_bad_requests(served):
    proc, server = served

    def rss() -> int:
        status = Path(f"/proc/{proc.pid}/status").read_text()
        return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS")))

    with httpx.Client(timeout=30) as http:
        bad = [{"model": MODEL, "messages": [{"role": "x"}]}, {"model": "other", "messages": []}, [1], "x"]
        for n in range(100):  # warm-up: allocator pools, caches
            http.post(f"{server}/v1/chat/completions", json=bad[n % 4])
        before = rss()
        for n in range(1000):
            http.post(f"{server}/v1/chat/completions", json=bad[n % 4])
        assert rss() - before < 4096  # kB


@pytest.mark.slow
def test_the_serve_benchmark_drives_the_script_through_http(bundle, tmp_path):
    """lfm-bench serve on the demo bundle: every turn's answer through HTTP is the script's, from turn 2 on the
    kept state serves the earlier turns (cached = what the Python API's kept conversation reuses), the
    continuation after the script equals a fresh generation, and the idle server's memory is measured."""
    from lfm_edge.device_bench.cli import main

    out = tmp_path / "serve"
    assert main(["serve", str(bundle), "--script", "3:24:8", "--runs", "2", "--threads", "1", "--out", str(out)]) == 0
    c = json.loads((out / "bench.json").read_text())["serve"]
    assert [row["turn"] for row in c["turns"]] == [1, 2, 3] and set(c["turns"][0]) == {"turn", "http", "api"}
    for row in c["turns"]:
        http, api = row["http"]["detail"], row["api"]["detail"]
        assert all(d["as_scripted"] for d in http + api) and len(http) == len(api) == 2
        assert [d["cached"] for d in http] == [d["cached"] for d in api]
        assert [d["prompt"] for d in http] == [d["prompt"] for d in api]
        if row["turn"] > 1:
            assert all(d["cached"] > 24 for d in http)
    assert c["exact"]["ours"]["identical"] and c["exact"]["ours"]["kept_cached"] > 3 * 24
    assert c["memory"]["server_idle_mb"] > c["memory"]["model_only_mb"] > 0
    assert (out / "bench.png").read_bytes()[:4] == b"\x89PNG" and "| 3 |" in (out / "bench.md").read_text()
    assert main(["serve", str(bundle), "--peer", "llama-server", "--gguf", str(tmp_path / "x.gguf"),
                 "--llama-server", str(tmp_path / "none")]) == 2


@pytest.mark.slow
def test_reasoning_comes_back_as_reasoning_content_and_its_budget_holds(tmp_path):
    """A scripted model that thinks first: the trace is `reasoning_content`, apart from `content`, whole and
    streamed; the `reasoning_budget` extension ends thinking after that many tokens."""
    from tokenizers import Tokenizer

    from scripted_model import write_bundle

    demo = Path(__file__).resolve().parent.parent / "demo_model"
    tok = Tokenizer.from_file(str(demo / "tokenizer.json"))
    messages = [{"role": "user", "content": "Think first."}]
    probe = write_bundle(tmp_path / "probe", demo, {}, tok.get_vocab_size(), tok.token_to_id("<|im_end|>"))
    at = len(LfmModel(probe).prompt_ids(messages))
    said = tok.encode("<think> step one step two step three</think> The answer.", add_special_tokens=False).ids
    bundle = write_bundle(tmp_path / "thinker", demo, {at + i: t for i, t in enumerate(said)}, tok.get_vocab_size(),
                          tok.token_to_id("<|im_end|>"))
    proc, base = _serve(bundle)
    try:
        client = OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=60)
        whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=40).choices[0].message
        assert whole.content.strip() == "The answer."
        assert whole.model_extra["reasoning_content"].strip() == "step one step two step three"
        reasoning, content = [], []
        for chunk in client.chat.completions.create(model=MODEL, messages=messages, max_tokens=40, stream=True):
            delta = chunk.choices[0].delta if chunk.choices else None
            if delta is not None:
                reasoning.append((delta.model_extra or {}).get("reasoning_content") or "")
                content.append(delta.content or "")
        assert "".join(reasoning) == whole.model_extra["reasoning_content"] and "".join(content) == whole.content
        budget = len(tok.encode(" step one", add_special_tokens=False).ids)  # 4 tokens: the demo keeps spaces apart
        capped = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=40,
                                                extra_body={"reasoning_budget": budget})
        assert capped.choices[0].message.model_extra["reasoning_content"].strip() == "step one"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
