"""llama.cpp (through llama-cpp-python) as a peer on the same weights: quantize a GGUF from gguf_writer.py
to Q4_0, then time prompt evaluation and greedy decode the way bench.py times our bundles.

Each run loads the model, evaluates a prompt of varied token ids, then decodes `decode_tokens` tokens
greedily (argmax of the last logits, fed back). Timed regions record CPU wait and load average with
bench.timed, and summaries are bench.Metric's: the median of the quiet runs when there are any.
`pip install llama-cpp-python` compiles llama.cpp (several minutes on 2 cores).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .bench import Metric, Sample, timed

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

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


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
    import json
    import subprocess
    import sys

    args = json.dumps({"gguf_path": str(gguf_path), "threads": threads, "prompts": prompts,
                       "decode_tokens": decode_tokens, "runs": runs})
    done = subprocess.run([sys.executable, "-m", "lfm_edge.device_bench.llama_cpp_peer", args],
                          capture_output=True, text=True)
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-3:]
        raise RuntimeError(f"llama.cpp peer on {gguf_path} failed (exit {done.returncode}): {' / '.join(tail)}")
    return json.loads(done.stdout)


if __name__ == "__main__":  # python -m lfm_edge.device_bench.llama_cpp_peer '{"gguf_path": ..., "prompts": [...]}'
    import json
    import sys

    print(json.dumps(llama_decode(**json.loads(sys.argv[1]))))
