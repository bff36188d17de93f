"""Our bundle against llama.cpp on the very same GGUF: tokenization and logits.

`lfm-export FILE.gguf` claims the bundle computes what the file holds; llama.cpp (llama-cpp-python) is the
file's own runtime, so the check is direct: both tokenize the held-out text (the ids must agree), both compute
logits for every position of the same token windows, and we report KL(llama.cpp || ours), greedy (top-1)
agreement and both perplexities (export/quality.py's `compare`, with llama.cpp as the reference side).

    python -m lfm_edge.device_bench.studies.gguf_crosscheck [GGUF] [--text FILE]
        [--out build/bench/gguf_crosscheck.json]

Without a GGUF: the demo model written as an f32 GGUF (gguf_writer.py) and quantized to Q4_0 by llama.cpp
itself (its default: the tied vocabulary in Q6_K), evaluated on the demo's held-out text.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

from ...export.checkpoint import Checkpoint
from ...export.cli import demo_model_path
from ...export.exporter import export
from ...export.options import GGUF_LAYOUTS
from ...export.quality import compare, token_windows
from ...export.quality import window_logits as our_logits
from ...runtime.files import write_text
from ..peers.gguf_writer import write_gguf
from ..peers.llama_cpp import quantize_q4_0, window_logits

TEXTS = ["Hello world! It's 2024, isn't it?", "  leading spaces\n\n\ttabs and ünïcödé, 12345678 digits",
         "<|im_start|>user\nWhat's a list?<|im_end|>\n<|im_start|>assistant\n", "code: def f(x):\n    return x**2",
         "émojis 🙂🙃 and CJK 汉字 and Ελληνικά", "   ", "'s 'T 'Re 'LL don't I'M"]


def llama_tokens(gguf_path: str | Path, texts: list[str]) -> list[list[int]]:
    """llama.cpp's tokenization of each text (special tokens parsed, BOS as the file says)."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(gguf_path), vocab_only=True, verbose=False)
    try:
        return [llm.tokenize(t.encode(), add_bos=llm.metadata.get("tokenizer.ggml.add_bos_token") == "true",
                             special=True) for t in texts]
    finally:
        llm.close()


def crosscheck(gguf_path: Path, text: str, work: Path, window: int = 128, max_tokens: int = 4096,
               quant: str = "int4", gguf_layout: str | None = None) -> dict:
    """`gguf_layout`: the export's --gguf-layout (None: its default)."""
    from tokenizers import Tokenizer


    bundle = export(gguf_path, work / "bundle", quant=quant, gguf_layout=gguf_layout).bundle
    ours = Tokenizer.from_file(str(bundle / "tokenizer.json"))
    texts = TEXTS + [text[:2000]]
    theirs = llama_tokens(gguf_path, texts)
    same = [ours.encode(t).ids == ids for t, ids in zip(texts, theirs, strict=True)]
    windows = token_windows(bundle / "tokenizer.json", text, window, max_tokens)
    reference = window_logits(gguf_path, windows)
    result = compare(reference, our_logits(bundle, windows), windows)
    conversion = json.loads((bundle / "conversion.json").read_text())["tensors"]
    manifest = json.loads((bundle / "manifest.json").read_text())
    return {"gguf": str(gguf_path), "quant": quant, "gguf_layout": manifest.get("gguf_layout"),
            "layout": manifest.get("layout"), "bytes_per_token": manifest["bytes_per_token"]["total"],
            "conversion_tensors": conversion, "window": window, "windows": len(windows),
            "texts_tokenized_identically": sum(same), "texts": len(same), "kl_llama_vs_ours": result["kl"],
            "greedy_agreement": result["top1"], "ppl_ours": result["ppl"], "ppl_llama": result["ppl_fp32"],
            "tokens": result["tokens"], "exact_tensors": sum(r["relative_rms_error"] == 0 for r in conversion),
            "tensors": len(conversion)}


def demo_q4_0(work: Path) -> Path:
    """The demo model as llama.cpp's own Q4_0 (from our f32 GGUF, tokenizer included)."""

    f32 = write_gguf(Checkpoint(demo_model_path()), work / "demo-f32.gguf", f16=False)
    return quantize_q4_0(f32, work / "demo-q4_0.gguf")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lfm_edge.device_bench.studies.gguf_crosscheck",
                                     description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("gguf", nargs="?", help="default: the demo model, quantized to Q4_0 by llama.cpp")
    parser.add_argument("--text", help="held-out text (default: the demo model's heldout.txt)")
    parser.add_argument("--quant", default="int4", help="export policy (Q4_0/Q8_0 blocks are kept under any)")
    parser.add_argument("--gguf-layout", choices=tuple(GGUF_LAYOUTS), default=None,
                        help="the bundle's --gguf-layout (default: lfm-export's)")
    parser.add_argument("--window", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=4096)
    parser.add_argument("--out", default="build/bench/gguf_crosscheck.json")
    args = parser.parse_args(argv)

    text = Path(args.text).read_text() if args.text else (demo_model_path() / "heldout.txt").read_text()
    with tempfile.TemporaryDirectory(prefix="lfm-gguf-crosscheck-") as tmp:
        gguf_path = Path(args.gguf) if args.gguf else demo_q4_0(Path(tmp))
        result = crosscheck(gguf_path, text, Path(tmp), args.window, args.max_tokens, args.quant,
                            args.gguf_layout)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_text(args.out, json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0 if np.isfinite(result["kl_llama_vs_ours"]) else 1


if __name__ == "__main__":
    sys.exit(main())
