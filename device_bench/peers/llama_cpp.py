"""llama.cpp (through llama-cpp-python) as a peer on the same weights: quantize a GGUF from gguf_writer.py
to Q4_0 (or another llama-quantize mix), then time prompt evaluation and greedy decode the way speed.py times
our bundles; and a conversation server that replays a scripted conversation through llama.cpp's own prefix
reuse (conversation.py).

Each run loads the model, evaluates a prompt of varied token ids, then decodes `decode_tokens` tokens
greedily (argmax of the last logits, fed back). Timed regions record CPU wait and load average with
measure.timed, and summaries are measure.Metric's: the median of the quiet runs when there are any.
`pip install llama-cpp-python` compiles llama.cpp (several minutes on 2 cores). Runs in a process of its own
(`python -m lfm_edge.device_bench.peers.llama_cpp decode|conversation SPEC`), so its peak RSS is its own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ...runtime.memory import maxrss_mb, status_mb
from ..measure import Metric, Sample, cpu_wait_seconds, timed

# llama.cpp's quantization mixes (llama-quantize's names) the benchmarks and quality reports compare against.
LLAMA_FORMATS = ("Q4_0", "Q4_K_M", "Q3_K_M", "Q2_K", "Q8_0", "Q4_K_S", "Q3_K_S", "Q3_K_L", "Q5_K_M", "Q6_K")


def quantize(src: str | Path, dst: str | Path, fmt: str = "Q4_0", threads: int = 2, pure: bool = False) -> Path:
    """llama.cpp's own quantization of an f16/f32 GGUF into `fmt` (a llama-quantize name such as Q4_0 or
    Q4_K_M), with llama-quantize's defaults: the tied embedding (also the LM head) gets the mix's output type
    (Q6_K for Q4_0); `pure` gives every tensor the base type."""
    import llama_cpp

    if fmt not in LLAMA_FORMATS:
        raise ValueError(f"llama.cpp format {fmt!r}: expected one of {', '.join(LLAMA_FORMATS)}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{fmt}")
    params.nthread = threads
    params.pure = pure
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({src} -> {dst}, {fmt}) returned {rc}")
    return Path(dst)


def quantize_q4_0(src: str | Path, dst: str | Path, threads: int = 2, pure: bool = False) -> Path:
    """`quantize(src, dst, "Q4_0")`, the format most comparisons use."""
    return quantize(src, dst, "Q4_0", threads, pure)


def window_logits(gguf_path: str | Path, windows: list[list[int]], threads: int = 2) -> list[np.ndarray]:
    """llama.cpp's logits for every position of each window (each from an empty context), as float32."""
    import llama_cpp

    longest = max(len(w) for w in windows)
    llm = llama_cpp.Llama(model_path=str(gguf_path), n_ctx=longest + 8, n_batch=longest, n_ubatch=longest,
                          n_threads=threads, logits_all=True, verbose=False)
    out = []
    for w in windows:
        llm.reset()
        llm.eval(list(w))
        out.append(np.array(llm.scores[:len(w)], dtype=np.float32))
    llm.close()
    return out


def _peak_rss_mb() -> float:
    import resource

    return maxrss_mb(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def _one_run(gguf_path: str | Path, threads: int, prompts: list[int], decode_tokens: int,
             rng: np.random.Generator) -> dict:
    """One load, a prompt of each length, and a greedy decode: (wall, cpu-wait share, loadavg) of each region,
    and the decoded tokens."""
    import llama_cpp

    box: dict[str, llama_cpp.Llama] = {}
    longest = max(prompts)

    def load() -> None:
        box["llm"] = llama_cpp.Llama(model_path=str(gguf_path), n_threads=threads, n_threads_batch=threads,
                                     n_ctx=longest + decode_tokens + 16, n_batch=max(longest, 32),
                                     n_ubatch=max(longest, 32), verbose=False)

    times = {"load": timed(load, threads)}
    llm = box["llm"]
    vocab = llm.n_vocab()

    def next_token() -> int:
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(vocab,))
        return int(np.argmax(logits))

    for p in prompts:
        prompt = rng.integers(100, min(vocab, 30000), p).tolist()  # varied ids, as bench.py feeds
        llm.reset()
        times[f"prompt/{p}"] = timed(lambda x=prompt: llm.eval(x), threads)
    out = [next_token()]

    def decode() -> None:
        for _ in range(decode_tokens):
            llm.eval([out[-1]])
            out.append(next_token())

    times["decode"] = timed(decode, threads)
    llm.close()
    return {"times": times, "tokens": out}


def llama_decode(gguf_path: str | Path, threads: int, prompts: list[int], decode_tokens: int, runs: int,
                 seed: int = 0) -> dict:
    """Load time, prompt tok/s at each prompt length and greedy decode tok/s of llama.cpp on `gguf_path` with
    `threads` threads: `runs` measured runs after one warm-up, each with a fresh load. Peak RSS is this
    process's: run it in a process of its own (`llama_decode_in_subprocess`) to measure llama.cpp alone."""
    import llama_cpp

    rng = np.random.default_rng(seed)
    metrics = {"load": Metric("s"), "decode": Metric("tok/s")} | {f"prompt/{p}": Metric("tok/s") for p in prompts}
    distinct: list[int] = []
    for r in range(runs + 1):
        run = _one_run(gguf_path, threads, prompts, decode_tokens, rng)
        if not r:  # the first run warms up
            continue
        for key, (wall, wait, la) in run["times"].items():
            tokens = decode_tokens if key == "decode" else int(key.split("/")[1]) if "/" in key else 0
            metrics[key].samples.append(Sample(tokens / wall if tokens else wall, wall, wait, la))
        distinct.append(len(set(run["tokens"])))
    summary = {k: m.summary() for k, m in metrics.items()}
    return {"decode_tps": summary["decode"]["median"],
            "prompt_tps": {str(p): summary[f"prompt/{p}"]["median"] for p in prompts},
            "load_s": summary["load"]["median"], "peak_rss_mb": _peak_rss_mb(), "runs": runs,
            "decode_tokens": decode_tokens, "threads": threads,
            "distinct_decoded_tokens": distinct, "file_bytes": Path(gguf_path).stat().st_size,
            "version": llama_cpp.__version__, "metrics": summary}


def llama_decode_in_subprocess(gguf_path: str | Path, threads: int, prompts: list[int], decode_tokens: int,
                               runs: int) -> dict:
    """llama_decode in a fresh Python process, so its peak RSS is llama.cpp's and not ours as well."""
    args = json.dumps({"gguf_path": str(gguf_path), "threads": threads, "prompts": prompts,
                       "decode_tokens": decode_tokens, "runs": runs})
    done = subprocess.run([sys.executable, "-m", "lfm_edge.device_bench.peers.llama_cpp", "decode", args],
                          capture_output=True, text=True)
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-3:]
        raise RuntimeError(f"llama.cpp peer on {gguf_path} failed (exit {done.returncode}): {' / '.join(tail)}")
    return json.loads(done.stdout)


# --- a conversation through llama.cpp's own prefix reuse, in a process of its own -------------------------------

def conversation_server(spec: dict) -> None:
    """Reads one JSON command per line on stdin, writes one JSON result per line: {"prompt": ids, "answer": ids}
    runs Llama.generate over the whole history (its own prefix reuse decides what to evaluate), forced to the
    scripted answer, and reports the time to the first token."""
    import llama_cpp
    import llama_cpp.llama_cpp as api

    if spec.get("n_rs_seq"):  # recurrent-state snapshots for rollback: llama.Llama takes no argument for it
        default_params = api.llama_context_default_params

        def params() -> Any:
            p = default_params()
            p.n_rs_seq = spec["n_rs_seq"]
            return p

        api.llama_context_default_params = params
    t0 = time.perf_counter()
    llm = llama_cpp.Llama(model_path=spec["gguf"], n_threads=spec["threads"], n_threads_batch=spec["threads"],
                          n_ctx=spec["n_ctx"], n_batch=512, n_ubatch=512, verbose=False)
    print(json.dumps({"ready": True, "load_s": time.perf_counter() - t0, "version": llama_cpp.__version__,
                      "file_bytes": Path(spec["gguf"]).stat().st_size, "n_rs_seq": api.llama_n_rs_seq(llm.ctx)}),
          flush=True)
    evaluated: list[int] = []  # tokens of each eval call: the first one of a turn is what it prefilled
    real_eval = llm.eval

    def counting_eval(tokens: Sequence[int]) -> None:
        evaluated.append(len(tokens))
        real_eval(tokens)

    llm.eval = counting_eval
    for line in sys.stdin:
        cmd = json.loads(line)
        evaluated.clear()
        prompt, answer = cmd["prompt"], cmd["answer"]
        if cmd.get("reset"):
            llm.reset()
        held = list(llm._input_ids[:llm.n_tokens])
        common = 0
        for a, b in zip(held, prompt, strict=False):
            if a != b:
                break
            common += 1
        n = [0]

        def force(_ids: np.ndarray, scores: np.ndarray, answer=answer, n=n) -> np.ndarray:
            scores[:] = -np.inf
            scores[answer[min(n[0], len(answer) - 1)]] = 0.0
            n[0] += 1
            return scores

        wait0, start = cpu_wait_seconds(), time.perf_counter()
        first, wait_first, out = 0.0, 0.0, []
        for token in llm.generate(prompt, temp=0.0, logits_processor=llama_cpp.LogitsProcessorList([force])):
            if not out:
                first, wait_first = time.perf_counter() - start, cpu_wait_seconds() - wait0
            out.append(int(token))
            if len(out) >= len(answer):
                break
        print(json.dumps({"ttft": first, "cpu_wait_share": wait_first / max(first * spec["threads"], 1e-9),
                          "loadavg": [round(x, 2) for x in os.getloadavg()], "held": len(held), "common": common,
                          "prefilled": evaluated[0] if evaluated else 0,
                          "as_scripted": out == list(answer)}), flush=True)


class ConversationPeer:
    """conversation_server, as a subprocess of this one (lfm-bench conversation --peer llama)."""

    def __init__(self, gguf: str | Path, threads: int, n_ctx: int, n_rs_seq: int = 0):
        spec = json.dumps({"gguf": str(gguf), "threads": threads, "n_ctx": n_ctx, "n_rs_seq": n_rs_seq})
        command = [sys.executable, "-m", "lfm_edge.device_bench.peers.llama_cpp", "conversation", spec]
        self.proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
        self.info = self._read()

    def _read(self) -> dict:
        for line in self.proc.stdout:  # a crash may print a debugger's backtrace here before it exits
            if line.startswith("{"):
                return json.loads(line)
        tail = [t for t in self.proc.stderr.read().strip().splitlines() if "GGML" in t or "error" in t.lower()][-3:]
        raise RuntimeError(f"llama.cpp peer failed (exit {self.proc.wait()}): {' / '.join(tail)}")

    def turn(self, prompt: Sequence[int], answer: Sequence[int], reset: bool = False) -> dict:
        self.proc.stdin.write(json.dumps({"prompt": list(prompt), "answer": list(answer), "reset": reset}) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def peak_rss_mb(self) -> float:
        return status_mb("VmHWM", pid=self.proc.pid).get("VmHWM", 0.0)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)


if __name__ == "__main__":  # python -m lfm_edge.device_bench.peers.llama_cpp decode|conversation '{...}'
    if sys.argv[1] == "decode":
        print(json.dumps(llama_decode(**json.loads(sys.argv[2]))))
    else:
        conversation_server(json.loads(sys.argv[2]))
