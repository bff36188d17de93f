"""The physical limit of decoding: every active weight is read once per token, so
    tokens/s <= read bandwidth / bytes read per token.

Bytes per token come from the bundle itself: `lfm-export` computes them once (export/footprint.py) and records
them in manifest.json, where this reads them (runtime/bundle.py token_bytes), also on a phone without the onnx
package; bundles without that entry (onnxruntime-genai's builder) are measured by the same function.
Bandwidth is measured here, or taken from a phone SoC table.

Phone predictions are about the model that matters, LFM2.5-8B-A1B under the default phone policy (int4),
whatever bundle was measured (`phone_prediction`): its bytes per token (from its geometry, or from the
measured bundle's manifest when that bundle is it) times phone bandwidth times an efficiency (the share of
the bandwidth ceiling decode reaches) measured on a memory-bound model. A small bundle (the demo model: under
1 MB per token, in the CPU's caches) says nothing about that share, so then the full model's recorded one is used.
A share above 1 (decode faster than the measured bandwidth allows for the geometry's bytes) is capped at 1: counted
from the router (studies/expert_reads.py), a decode step reads the geometry's bytes (k distinct experts per layer,
and random weights route like chance, so a cache could not serve the previous token's experts either), so such a
share says the bandwidth probe read low that day, not that a token read less. A share measured on random weights
says so.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..runtime.bundle import TokenBytes, token_bytes

TARGET_TOKENS_PER_SECOND = 30.0

# Peak LPDDR bandwidth (GB/s) of phone SoCs; `achievable` is the share the best CPU decoders reach
# (about 55% on phones; docs/design.md, "Speed").
PHONE_SOCS: dict[str, float] = {
    "Snapdragon 8 Gen 2 (LPDDR5X-8400)": 67.0,
    "Snapdragon 8 Gen 3 (LPDDR5X-9600)": 76.8,
    "Snapdragon 8 Elite (LPDDR5X-10667)": 84.8,
    "Dimensity 9300 (LPDDR5T-9600)": 76.8,
    "Apple A17 Pro (LPDDR5-6400)": 51.2,
    "Apple A18 Pro (LPDDR5X-7500)": 60.0,
    "Tensor G4 (LPDDR5X-8533)": 68.3,
    "Snapdragon 7 Gen 3 (LPDDR5-6400)": 51.2,
}
PHONE_ACHIEVABLE = 0.55

# The model phone predictions are about: LFM2.5-8B-A1B (export/random_weights.py PRESETS) under the default
# phone policy (export/options.py TARGET_QUANT: android and ios export int4).
REFERENCE_MODEL = "LFM2.5-8B-A1B"
REFERENCE_PRESET = "lfm2.5-8b-a1b"
REFERENCE_POLICY = "int4"
# That model's bytes per token: the manifest of `lfm-export --random-weights lfm2.5-8b-a1b --target android`
# (the bundle FULL_MODEL_EFFICIENCY below was measured on, 2026-11-30).
REFERENCE_BYTES_PER_TOKEN = 878_804_076


@dataclass(frozen=True)
class RecordedEfficiency:
    """A decode measured on the full model: the share of the read-bandwidth ceiling it reached."""

    decode_tps: float
    bytes_per_token: float
    read_bandwidth_gbs: float
    measured: str  # date, machine
    source: str  # where the numbers are written down
    random_weights: bool = False  # measured on a --random-weights bundle (routing unlike a trained model's)

    @property
    def fraction(self) -> float:
        return self.decode_tps * self.bytes_per_token / (self.read_bandwidth_gbs * 1e9)

    def describe(self) -> str:
        return f"{self.decode_tps:.1f} tok/s at {self.read_bandwidth_gbs:.1f} GB/s, {self.measured}, {self.source}"


# device_bench/results/notes/2026-11-30-block-256.md: the full LFM2.5-8B-A1B geometry's int4 android bundle, decode
# median of 10 rounds alternated with llama.cpp Q4_0 (ab.py, 512-token prompt, 128 tokens,
# results/2026-11-30-ab-int4-block256-vs-llama-q4_0-10rounds.json ours_decode), its manifest's 879 MB per token and
# this machine's quiet read bandwidth (2026-11-22): 77% of the ceiling. (The int4 layout before block 256, 920 MB
# per token, reached 76% the same way on 2026-11-22: 29.51 tok/s.) That bundle has random weights
# (`lfm-export --random-weights lfm2.5-8b-a1b`): no trained checkpoint was exported at full size.
FULL_MODEL_EFFICIENCY = RecordedEfficiency(
    decode_tps=31.08, bytes_per_token=878_804_076, read_bandwidth_gbs=35.6,
    measured="2-core AMD EPYC Zen 4, 2 threads, 2026-11-30", source="device_bench/RESULTS.md, decode",
    random_weights=True)

# A measured bundle's own efficiency carries over to LFM2.5-8B-A1B only when its decode streams from DRAM as the
# full model's does: it must read at least 8x the CPU's largest cache per token (so a cache could serve at most an
# eighth of the reads; sysfs on Linux and Android, 32 MiB assumed where unreadable) and at least 256 MB (below
# that a step is a few ms, where per-node overhead, ~5.5 ms per token at full size
# (device_bench/results/notes/2026-11-29-decode-overhead.md), would
# weigh more than bandwidth). The demo model (1.6 MB) is far below; 6 layers of the full width (358 MB) and the
# full model (879 MB) are above on this machine (32 MiB L3: threshold 268 MB) and on phones.
MEMORY_BOUND_MIN_BYTES = 256e6
MEMORY_BOUND_CACHE_MULTIPLE = 8
ASSUMED_CACHE_BYTES = 32 << 20


def bytes_per_token(bundle: Path) -> TokenBytes:
    """What lfm-export recorded in manifest.json, else (another exporter's bundle) computed from its graph."""
    recorded = token_bytes(bundle)
    if recorded is not None:
        return recorded
    from ..export.footprint import bytes_per_token as from_graph  # needs onnx, which a phone build lacks

    return from_graph(Path(bundle))


def read_bandwidth(gib: float = 1.0, repeats: int = 5) -> float:
    """Read bandwidth in GB/s: the best of several passes of a memory-bound dot product over `gib` GiB."""
    a = np.ones(int(gib * (1 << 30)) // 4, dtype=np.float32)
    a @ a  # noqa: B018 - touch every page first
    best = 0.0
    for _ in range(repeats):
        t = time.perf_counter()
        a @ a  # noqa: B018
        best = max(best, a.nbytes / (time.perf_counter() - t) / 1e9)
    return best


def ceiling(bandwidth_gbs: float, token_bytes: float) -> float:
    return bandwidth_gbs * 1e9 / token_bytes


def share_of_ceiling(fraction: float) -> str:
    """"N% of it" after a ceiling (bench.md, the app), and what a share above 100% means."""
    above = (", more than the measured bandwidth allows: the bandwidth probe read low (a token reads the bytes "
             "counted: studies/expert_reads.py)")
    return f"{fraction:.0%} of it" + (above if fraction > 1 else "")


def phone_predictions(token_bytes: float, fraction: float | None = None) -> list[dict]:
    """Predicted decode tok/s per SoC at `fraction` of peak bandwidth (default: what phones reach)."""
    share = PHONE_ACHIEVABLE if fraction is None else fraction
    rows = []
    for soc, bandwidth in PHONE_SOCS.items():
        tps = ceiling(bandwidth, token_bytes) * share
        rows.append({"soc": soc, "bandwidth_gbs": bandwidth, "ceiling_tps": round(ceiling(bandwidth, token_bytes), 1),
                     "predicted_tps": round(tps, 1), "meets_target": tps >= TARGET_TOKENS_PER_SECOND})
    return rows


def reference_bytes_per_token() -> tuple[float, str]:
    """LFM2.5-8B-A1B's bytes per token under the default phone policy, and where the number comes from."""
    return float(REFERENCE_BYTES_PER_TOKEN), "its int4 bundle's manifest (recorded)"


def is_reference_bundle(bundle: Path, tokens: TokenBytes) -> bool:
    """Whether `bundle` is LFM2.5-8B-A1B under the default phone policy: an lfm2_moe bundle quantized with that
    policy (manifest.json) whose bytes per token are the geometry's (within 0.1%: the graph adds a few kB of
    rotary tables and such; another depth, width or vocabulary is megabytes away)."""
    try:
        manifest = json.loads((Path(bundle) / "manifest.json").read_text())
        same_policy = manifest.get("quant") == REFERENCE_POLICY and manifest.get("model_type") == "lfm2_moe"
    except (OSError, ValueError, AttributeError):
        return False
    return same_policy and abs(tokens.total / reference_bytes_per_token()[0] - 1) < 1e-3


def _manifest(bundle: Path | None) -> dict:
    """A bundle's manifest.json for labels and notes: {} where there is none or it is no JSON object."""
    try:
        manifest = json.loads((Path(bundle) / "manifest.json").read_text())
    except (OSError, ValueError, TypeError):
        return {}
    return manifest if isinstance(manifest, dict) else {}


def random_weights_preset(bundle: Path | None) -> str | None:
    """The preset a `lfm-export --random-weights` bundle was made from (manifest.json), else None."""
    return _preset(_manifest(bundle).get("source"))


def _preset(source: Any) -> str | None:
    preset = source.get("random_weights") if isinstance(source, dict) else None
    return str(preset) if preset else None


def bundle_label(bundle: Path) -> str:
    """What a bundle is, for a reader: its source (hub id, checkpoint folder name, or random-weights preset) and
    quantization policy from manifest.json, else its folder's name."""
    manifest = _manifest(bundle)
    source = manifest.get("source") if isinstance(manifest.get("source"), dict) else {}
    preset = _preset(source)
    name = source.get("hub_id") or source.get("name") or (f"random weights {preset}" if preset else "")
    return f"{name or Path(bundle).name} {manifest.get('quant') or ''}".strip()


def last_level_cache_bytes() -> int | None:
    """The largest CPU cache (sysfs: Linux and Android), or None where it cannot be read."""
    sizes = []
    for f in Path("/sys/devices/system/cpu").glob("cpu[0-9]*/cache/index[0-9]*/size"):
        try:
            text = f.read_text().strip().upper()
            scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
            sizes.append(int(text.rstrip("KMG")) * scale)
        except (OSError, ValueError):
            continue
    return max(sizes) if sizes else None


def memory_bound_bytes(cache_bytes: int | None = None) -> float:
    """Bytes per token from which a bundle's measured efficiency stands for a memory-bound model's (see
    MEMORY_BOUND_MIN_BYTES); `cache_bytes` defaults to this CPU's largest cache."""
    cache = cache_bytes or last_level_cache_bytes() or ASSUMED_CACHE_BYTES
    return max(MEMORY_BOUND_MIN_BYTES, MEMORY_BOUND_CACHE_MULTIPLE * cache)


@dataclass
class PhonePrediction:
    """Predicted decode of `model` on each phone SoC: bandwidth x efficiency / bytes_per_token."""

    model: str  # what the rows are about, e.g. "LFM2.5-8B-A1B int4"
    bytes_per_token: float
    bytes_from: str  # "its int4 bundle's manifest (recorded)", or "this bundle's manifest" when it is that bundle
    efficiency: float  # share of the bandwidth ceiling decode reaches
    efficiency_measured_here: bool  # the measured bundle's own (memory-bound), else FULL_MODEL_EFFICIENCY
    efficiency_from: str
    measured_bytes_per_token: float  # the measured bundle's (0: unknown)
    memory_bound_bytes: float  # the threshold its bytes per token were held against
    phones: list[dict] = field(default_factory=list)
    # the efficiency was measured on random weights (here, or the recorded one); bench.json from before
    # 2026-12-07 has neither field
    random_weights: bool = False
    capped_from: float = 0.0  # the share measured here when it exceeded 1 (then efficiency is 1), else 0

    @property
    def reaching(self) -> int:
        return sum(p["meets_target"] for p in self.phones)

    def predicted_range(self, target: float = TARGET_TOKENS_PER_SECOND) -> str:
        """The predicted range and how many phones reach the target, e.g. "45-74 tok/s predicted; reaches 30
        tok/s on all 8"."""
        tps = [p["predicted_tps"] for p in self.phones]
        n, reached = len(tps), self.reaching
        where = (f"reaches {target:.0f} tok/s on all {n}" if reached == n else
                 f"below the {target:.0f} tok/s target on all {n}" if reached == 0 else
                 f"reaches {target:.0f} tok/s on {reached} of {n}")
        return f"{min(tps):.0f}-{max(tps):.0f} tok/s predicted; {where}"

    def verdict(self, target: float = TARGET_TOKENS_PER_SECOND) -> str:
        """One line: the model, the predicted range, how many phones reach the target."""
        return f"{self.model} on phones: {self.predicted_range(target)}"

    def basis(self) -> str:
        """Where the numbers come from, in a sentence or two."""
        if self.efficiency_measured_here:
            eff = (f"the efficiency measured here on this bundle ({self.measured_bytes_per_token / 1e6:.0f} MB per "
                   "token: memory-bound)")
        else:
            why = (f"this bundle is too small for its own to carry over ({self.measured_bytes_per_token / 1e6:.1f} MB "
                   f"per token, under the {self.memory_bound_bytes / 1e6:.0f} MB from which decode is memory-bound)"
                   if self.measured_bytes_per_token else "this bundle's bytes per token are unknown")
            eff = f"the full model's measured efficiency ({self.efficiency_from}); {why}"
        out = (f"{self.model}: {self.bytes_per_token / 1e6:.0f} MB read per token ({self.bytes_from}) at "
               f"{self.efficiency:.0%} of each phone's memory bandwidth, {eff}.")
        if self.capped_from:
            out += (f" Capped at 100%: decode here reached {self.capped_from:.0%} of the ceiling, faster than the "
                    "measured bandwidth allows for the bytes a token reads (counted from the router: the "
                    "geometry's), so the bandwidth measured here is low.")
        if self.random_weights:
            out += (" That efficiency was measured on random weights, whose tokens read the geometry's bytes (k "
                    "experts per layer, routed like chance); a trained model reads as many per token, but its "
                    "routing and values are not these.")
        return out


def phone_prediction(bundle: Path | None, tokens: TokenBytes | None, fraction_here: float,
                     cache_bytes: int | None = None) -> PhonePrediction:
    """Each phone's decode of LFM2.5-8B-A1B int4. Bytes per token: the measured bundle's when it is that model,
    else the geometry's. Efficiency: `fraction_here` (the measured bundle's best decode / its ceiling, at most 1)
    when the bundle is memory-bound (`memory_bound_bytes`), else FULL_MODEL_EFFICIENCY."""
    ref_bytes, bytes_from = reference_bytes_per_token()
    if tokens is not None and bundle is not None and is_reference_bundle(bundle, tokens):
        ref_bytes, bytes_from = tokens.total, "this bundle's manifest"
    threshold = memory_bound_bytes(cache_bytes)
    own = tokens is not None and tokens.total >= threshold and fraction_here > 0
    # a share above 1 is no efficiency: a token reads the geometry's bytes (studies/expert_reads.py), so the
    # bandwidth measured for the ceiling was low
    efficiency = min(fraction_here, 1.0) if own else FULL_MODEL_EFFICIENCY.fraction
    source = "measured here" if own else FULL_MODEL_EFFICIENCY.describe()
    random = random_weights_preset(bundle) is not None if own else FULL_MODEL_EFFICIENCY.random_weights
    return PhonePrediction(
        model=f"{REFERENCE_MODEL} {REFERENCE_POLICY}", bytes_per_token=ref_bytes, bytes_from=bytes_from,
        efficiency=efficiency, efficiency_measured_here=own, efficiency_from=source,
        measured_bytes_per_token=tokens.total if tokens is not None else 0.0, memory_bound_bytes=threshold,
        phones=phone_predictions(ref_bytes, efficiency), random_weights=random,
        capped_from=fraction_here if own and fraction_here > 1 else 0.0)
