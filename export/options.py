"""What an export is asked to do, as data, checked in one place (`ExportOptions.resolved`).

`lfm-export` builds one from its arguments and Python callers from keywords (`export(checkpoint, out, **kw)`):
the same defaults and the same checks for both. Defaults follow the target: phones get the int4 policy and an
int8 KV cache, a desktop fp32 for both; the portable op set has only the fp32 cache; a quantized GGUF keeps its
blocks (int4), even for a desktop.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..quant.policy import Policy, get_policy
from .calibration import GPTQ_TOKENS, WINDOW
from .checkpoint import VOCABULARY_ROWS
from .kernel_support import check_policy
from .kv_cache import DEFAULT_MARGIN, KV_CACHES
from .onnx_ops import WeightTransform

__all__ = ["GGUF_LAYOUTS", "OP_SETS", "TARGETS", "ExportError", "ExportOptions"]

TARGETS = ("desktop", "android", "ios")
OP_SETS = ("contrib", "portable")
# Phones decode at the speed of memory: every bit per weight is speed there.
TARGET_QUANT = {"desktop": "fp32", "android": "int4", "ios": "int4"}
# ... and long context lives in the KV cache: int8 holds 4x the context of fp32 in the same memory, at the
# measured cost in quant/README.md ("KV cache precision"). Desktop keeps the exact fp32 cache.
TARGET_KV_CACHE = {"desktop": "fp32", "android": "int8", "ios": "int8"}
# Decode threads a target's runtime starts with (genai_config's session_options; LfmSession reads it too):
# phones decode fastest on their big cores only (4 on current Snapdragon/Dimensity/Tensor parts, Apple's 2
# performance cores); on a desktop onnxruntime's default, one thread per physical core, is right.
TARGET_THREADS = {"desktop": None, "android": 4, "ios": 2}
# A quantized GGUF's weights, by the parts each layout re-lays: `exact` keeps the file's blocks as the kernels read
# them (Q4_0/Q8_0 block 32, Q6_K as int8 block 16: the values llama.cpp computes with, bit for bit); the others
# re-quantize their parts into the policy's layout from the file's values (experts and the vocabulary's scan int4
# block 256, linears block 128), and a re-laid vocabulary has the LM head's top logits rescored from the file's own
# blocks, which the embedding also reads. Measured at full LFM2.5-8B-A1B geometry against llama.cpp on the same
# Q4_0 file (device_bench/results/notes/2026-12-07-gguf-layout.md).
GGUF_LAYOUTS = {"exact": (), "head": ("vocabulary",), "experts": ("vocabulary", "experts"),
                "fast": ("vocabulary", "experts", "linears")}
# Phones decode at the speed of memory, so they get `experts`: the re-laid head and experts cost KL 0.0052 against
# the exact layout on the trained demo model's Q4_0 (`fast`, with its linears re-laid too: 0.019, over the 0.01
# the project holds GGUF imports to), and they are most of the bytes: at full geometry the head's 328 MB become
# ~136 and the experts' block 32 the block 256 onnxruntime repacks at 4.25 bits instead of 6. A desktop keeps the
# file's values (the notes above).
TARGET_GGUF_LAYOUT = {"desktop": "exact", "android": "experts", "ios": "experts"}


class ExportError(ValueError):
    """An export that cannot proceed; the message names the argument, file or tensor."""


@dataclass(frozen=True)
class ExportOptions:
    """How to export. `quant`: a policy's name (quant/policy.py) or a Policy, None for the target's default;
    `kv_cache`: fp32 / int8 / int4, None for the target's; `transform` rewrites each float weight as it is read
    (tests use it for fake quantization); `random_weights`: a preset of random_weights.py instead of a checkpoint;
    `calibration_tokens`: how many tokens GPTQ's calibration pass reads (more: a steadier estimate of each
    linear's inputs, a slower export); `eval_text`: held-out text for a quality report against fp32
    (quality.md), `eval_text_name` what the report calls it (the CLI: the file's name); `tokenizer`: a GGUF's
    tokenizer.json (or its folder) when the file carries none; `force`: replace an `out` folder that holds
    something other than an lfm-edge bundle; `gguf_layout`: one of GGUF_LAYOUTS (exact, head, experts, fast) for a
    quantized GGUF, None for the target's default (TARGET_GGUF_LAYOUT); `vocabulary_rows`: rows of the vocabulary
    table quantized at a time (memory only: the bundle's bytes are the same at any value; tests lower it to cut a
    small table into several slices)."""

    ops: str = "contrib"
    quant: str | Policy | None = None
    target: str = "desktop"
    kv_cache: str | None = None
    kv_margin: float = DEFAULT_MARGIN
    calibration_tokens: int = GPTQ_TOKENS
    kv_calibration_text: str | None = None
    eval_text: str | None = None
    eval_text_name: str | None = None
    tokenizer: str | Path | None = None
    random_weights: str | None = None
    transform: WeightTransform | None = None
    progress: Callable[[str], None] | None = None
    force: bool = False
    gguf_layout: str | None = None
    vocabulary_rows: int = VOCABULARY_ROWS

    def resolved(self, quantized_gguf: bool = False) -> ExportOptions:
        """These options with every default filled in (`quantized_gguf`: the checkpoint is a GGUF whose weights
        are stored in blocks) and every value checked; ExportError names the option that is wrong.
        `gguf_layout` resolves to None unless a quantized policy meets a quantized GGUF (nothing to re-lay)."""
        if self.target not in TARGETS:
            raise ExportError(f"--target {self.target!r}: expected one of {TARGETS}")
        if self.ops not in OP_SETS:
            raise ExportError(f"--ops {self.ops!r}: expected one of {OP_SETS}")
        quant = self.quant if self.quant is not None else "int4" if quantized_gguf else TARGET_QUANT[self.target]
        try:
            policy = quant if isinstance(quant, Policy) else get_policy(quant)
        except ValueError as e:
            raise ExportError(str(e)) from None
        quantized = any((policy.experts, policy.linears, policy.embedding))
        if quantized and self.ops != "contrib":
            raise ExportError(f"--quant {policy.name} needs --ops contrib (its kernels are onnxruntime contrib ops)")
        if quantized:
            try:  # before any tracing: the installed onnxruntime runs every kernel the policy needs
                check_policy(policy)
            except ValueError as e:
                raise ExportError(str(e)) from None
        kv = self.kv_cache or ("fp32" if self.ops == "portable" else TARGET_KV_CACHE[self.target])
        if kv not in KV_CACHES:
            raise ExportError(f"--kv-cache {kv!r}: expected one of {KV_CACHES}")
        if kv != "fp32" and self.ops != "contrib":
            raise ExportError(f"--kv-cache {kv} needs --ops contrib: the quantized cache is GroupQueryAttention's "
                              "(com.microsoft); the portable op set has no standard op that attends over an int8 "
                              "cache, so it keeps --kv-cache fp32")
        if isinstance(self.kv_margin, bool) or not isinstance(self.kv_margin, (int, float)) or \
                not math.isfinite(self.kv_margin) or self.kv_margin <= 0:
            raise ExportError(f"--kv-margin {self.kv_margin!r}: expected a number > 0")
        if isinstance(self.calibration_tokens, bool) or not isinstance(self.calibration_tokens, int) or \
                not WINDOW // 8 <= self.calibration_tokens <= 1 << 20:
            raise ExportError(f"--calibration-tokens {self.calibration_tokens!r}: expected an integer in "
                              f"{WINDOW // 8}..{1 << 20}")
        if isinstance(self.vocabulary_rows, bool) or not isinstance(self.vocabulary_rows, int) or \
                self.vocabulary_rows < 1:
            raise ExportError(f"vocabulary_rows {self.vocabulary_rows!r}: expected an integer >= 1")
        if self.tokenizer is not None and self.random_weights:
            raise ExportError("--tokenizer is for GGUF files; --random-weights brings a stand-in tokenizer")
        if self.gguf_layout is not None and self.gguf_layout not in GGUF_LAYOUTS:
            raise ExportError(f"--gguf-layout {self.gguf_layout!r}: expected one of {tuple(GGUF_LAYOUTS)}")
        if self.gguf_layout is not None and not quantized_gguf:
            raise ExportError(f"--gguf-layout {self.gguf_layout}: for a GGUF file whose weights are stored in "
                              "quantized blocks; this checkpoint has none")
        if self.gguf_layout is not None and not quantized:
            raise ExportError(f"--gguf-layout {self.gguf_layout}: needs a quantized policy (--quant "
                              f"{policy.name} keeps every weight in float32)")
        layout = (self.gguf_layout or TARGET_GGUF_LAYOUT[self.target]) if quantized_gguf and quantized else None
        return dataclasses.replace(self, quant=policy, kv_cache=kv, gguf_layout=layout)

    @property
    def policy(self) -> Policy:
        """The quantization policy (after `resolved`)."""
        assert isinstance(self.quant, Policy), "ExportOptions.resolved() first"
        return self.quant

    @property
    def quantized(self) -> bool:
        return any((self.policy.experts, self.policy.linears, self.policy.embedding))
