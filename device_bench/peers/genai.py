"""Peers measured on the same bundle in the same run: onnxruntime-genai (the native mobile runtime)."""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from ..common import link_view


def genai_view(bundle: Path, folder: Path, threads: int) -> dict:
    """The bundle's files linked into `folder` with a genai_config.json that sets onnxruntime-genai's intra-op
    threads to `threads` (as ours run); the bundle itself untouched. Returns that config."""
    link_view(bundle, folder, skip={"genai_config.json"})
    config = json.loads((Path(bundle) / "genai_config.json").read_text())
    config["model"]["decoder"].setdefault("session_options", {})["intra_op_num_threads"] = threads
    (folder / "genai_config.json").write_text(json.dumps(config))
    return config


def genai_decode(bundle: Path, threads: int, prompt: int, decode: int, runs: int) -> dict:
    """Decode tok/s of onnxruntime-genai on this bundle (greedy, varied prompt ids), median of `runs`."""
    try:
        import onnxruntime_genai as og
    except ImportError:
        return {"error": "onnxruntime-genai is not installed"}
    with tempfile.TemporaryDirectory() as tmp:
        config = genai_view(bundle, Path(tmp), threads)
        model = og.Model(tmp)
        rng = np.random.default_rng(0)
        vocab = min(int(config["model"].get("vocab_size", 1000)), 30000)
        speeds = []
        for r in range(runs + 1):
            params = og.GeneratorParams(model)
            params.set_search_options(do_sample=False, max_length=prompt + decode, min_length=prompt + decode)
            generator = og.Generator(model, params)
            generator.append_tokens(rng.integers(100, vocab, (1, prompt)).astype(np.int32))
            generator.generate_next_token()  # the first token closes the prefill
            start, steps = time.perf_counter(), 0
            while not generator.is_done():
                generator.generate_next_token()
                steps += 1
            if r:  # the first run warms up
                speeds.append(steps / (time.perf_counter() - start))
            del generator
    return {"decode_tps": statistics.median(speeds), "runs": runs, "samples": speeds, "prompt": prompt,
            "decode_tokens": decode, "version": og.__version__ if hasattr(og, "__version__") else "?"}
