"""onnxruntime-genai's own model builder as a peer: its `lfm2_moe` int4 CPU export of the same checkpoint.

The builder (`python -m onnxruntime_genai.models.builder`, written with Liquid's engineers) is what a user of
ONNX would pick instead of lfm-export. Its CPU int4 recipe, as the builder's own defaults and Microsoft's
olive recipe for LFM2.5-8B-A1B set it (CPU_INT4 below): MatMulNBits int4 block 32, accuracy_level 4 (int8
activations), round-to-nearest (`algo_config=default`), symmetric; QMoE experts int4 block 32; the router
kept in float; the tied embedding shared with the head.

Both exporters must read the same weights, so the random full-geometry model is written once as a Hugging
Face checkpoint (`write_checkpoint`: safetensors, transformers 5's Lfm2Moe layout, bfloat16 like the released
checkpoint) and each exporter runs on it in its own process, whose wall time and peak RSS are its export
figures (`run_export`). `GenaiModel` runs a builder bundle with onnxruntime-genai's own runtime (Model and
Generator), the way its users do.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ...export.random_tokenizer import random_tokenizer_files
from ...export.random_weights import RandomCheckpoint
from ...runtime.memory import maxrss_mb
from .genai import genai_view

__all__ = ["CPU_INT4", "ExportRun", "GenaiModel", "builder_command", "ours_command", "run_export",
           "write_checkpoint"]

# The builder's CPU int4 recipe, spelled out (each value is also its default for `-e cpu -p int4`, 0.18.0).
CPU_INT4: dict[str, str] = {"block_size": "32", "accuracy_level": "4", "algo_config": "default",
                            "is_symmetric": "true", "moe_quant_type": "int4", "qmoe_block_size": "32"}


@dataclass
class ExportRun:
    """One exporter's run in its own process: wall seconds and that process's peak RSS."""
    label: str
    command: list[str]
    seconds: float
    peak_rss_mb: float
    bundle_mb: float
    returncode: int

    def as_dict(self) -> dict:
        return asdict(self)


def write_checkpoint(spec: str, folder: Path, dtype: str = "bfloat16",
                     progress: Callable[[str], None] = lambda m: None) -> Path:
    """A Hugging Face checkpoint of `spec` (`lfm2.5-8b-a1b` or `lfm2.5-8b-a1b:LAYERS`, export/random_weights.py)
    in `folder`: config.json, one safetensors shard per layer and an index, and the random-weights tokenizer.
    The values are export/random_weights.py's (N(0, 0.02), norms near 1), seeded by tensor name, in `dtype`.
    Written to a temporary folder beside `folder` and moved into place when complete."""
    import torch
    from safetensors.torch import save_file
    from transformers import Lfm2MoeConfig, Lfm2MoeForCausalLM

    folder = Path(folder)
    if (folder / "model.safetensors.index.json").is_file():
        return folder
    random = RandomCheckpoint(spec)
    raw = dict(random.raw_config, architectures=["Lfm2MoeForCausalLM"], dtype=dtype)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in Lfm2MoeForCausalLM(Lfm2MoeConfig(**raw)).state_dict().items()}
    shapes.pop("lm_head.weight")  # tied to the embedding, as the released checkpoint stores it
    shards: dict[str, list[str]] = {}
    for name in shapes:
        key = name.split(".")[2] if name.startswith("model.layers.") else "rest"
        shards.setdefault(key, []).append(name)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch_dtype = getattr(torch, dtype)
    weight_map = {}
    for i, (key, names) in enumerate(shards.items()):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        progress(f"checkpoint shard {i + 1}/{len(shards)} ({key})")
        tensors = {n: torch.from_numpy(random.tensor(n, shapes[n])).to(torch_dtype) for n in names}
        save_file(tensors, str(tmp / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, file))
        del tensors
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (tmp / "config.json").write_text(json.dumps(raw, indent=2))
    for name, text in random_tokenizer_files(random.raw_config).items():
        (tmp / name).write_text(text)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


def builder_command(checkpoint: Path, out: Path, cache: Path, options: dict[str, str] | None = None) -> list[str]:
    """onnxruntime-genai's builder, int4 for the CPU, with `options` (default CPU_INT4) as its extra options."""
    opts = CPU_INT4 if options is None else options
    return [sys.executable, "-P", "-m", "onnxruntime_genai.models.builder", "-i", str(checkpoint), "-o", str(out),
            "-p", "int4", "-e", "cpu", "-c", str(cache), "--extra_options", *(f"{k}={v}" for k, v in opts.items())]


def ours_command(checkpoint: Path, out: Path, args: Sequence[str] = ("--target", "android")) -> list[str]:
    """lfm-export of `checkpoint` (default: the phone bundle, `--target android`) in a process of its own."""
    return [sys.executable, "-P", "-m", "lfm_edge.export.cli", str(checkpoint), "--out", str(out), "--quiet",
            *args]


def run_export(label: str, command: list[str], out: Path, log: Path | None = None) -> ExportRun:
    """Run an exporter's `command` (which writes `out`): its wall time and peak RSS (the child's, from wait4).
    A failure raises with the end of its output."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    sink = open(log, "w") if log else subprocess.DEVNULL  # noqa: SIM115 - closed below
    try:
        start = time.perf_counter()
        proc = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT if log else subprocess.DEVNULL,
                                env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
    finally:
        if log:
            sink.close()
    if proc.returncode != 0:
        tail = log.read_text()[-3000:] if log else ""
        raise RuntimeError(f"{label}: {' '.join(command)} exited with {proc.returncode}\n{tail}")
    size = sum(p.stat().st_size for p in Path(out).rglob("*") if p.is_file()) / 1e6
    return ExportRun(label, command, round(seconds, 1), round(maxrss_mb(usage.ru_maxrss), 1), round(size, 1),
                     proc.returncode)


class GenaiModel:
    """A builder bundle in onnxruntime-genai's runtime with `threads` intra-op threads (its genai_config.json
    changed in a view of symlinks, the bundle itself untouched), timed the way studies/ab.py times ours:
    a prompt in one call, then one token per call, with the ids given (no sampling)."""

    def __init__(self, bundle: Path, threads: int):
        import tempfile

        import onnxruntime_genai as og

        self._og = og
        self._view = tempfile.TemporaryDirectory(prefix="genai-view-")
        self.config = config = genai_view(bundle, Path(self._view.name), threads)
        self.model = og.Model(self._view.name)
        self.vocab_size = int(config["model"]["vocab_size"])

    def generator(self, length: int):
        params = self._og.GeneratorParams(self.model)
        params.set_search_options(do_sample=False, max_length=length)
        return self._og.Generator(self.model, params)

    def window_logits(self, windows: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """Logits of every position of each window, each from an empty state, one token per call (the bundle
        may keep only the last row of a prompt's logits)."""
        out = []
        for w in windows:
            gen = self.generator(len(w) + 1)
            rows = []
            for t in w:
                gen.append_tokens(np.array([[t]], dtype=np.int32))
                rows.append(np.asarray(gen.get_output("logits"), dtype=np.float32).reshape(-1, self.vocab_size)[-1])
            out.append(np.stack(rows))
            del gen
        return out
