"""What became of each tensor of a GGUF: its stored type, the kernel layout it now has, and the error between
the two, measured against the file's own values (gguf-py's dequantization). Written into the bundle as
conversion.json and conversion.md beside the other quality files.

Q4_0 and Q8_0 blocks go into the kernels as they are (error 0 by construction, checked in the tests); float
tensors keep the error of the chosen policy; K-quants and the other block types are dequantized and
re-quantized, and this is where that cost shows.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ..quant.blocks import Quantized

FLOAT32 = "float32"


def kernel_name(q: Quantized, exact: bool) -> str:
    kind = "symmetric" if q.zero_points is None else "zero points"
    if q.zero_points is not None and q.zero_points.dtype == np.float32:
        kind = "float zero points"
    return f"int{q.bits} block {q.block_size} {kind}" + (" (the file's values, exactly)" if exact else "")


class ConversionLog:
    """Per GGUF tensor: type, kernel layout, sum of squared error and of squared value, max abs error.
    Inactive (records nothing) for checkpoints that are not GGUF files."""

    def __init__(self, checkpoint: Any):
        self.ckpt = checkpoint
        self.active = hasattr(checkpoint, "stored_type") and hasattr(checkpoint, "gguf_tensor")
        self.rows: dict[str, dict[str, Any]] = {}

    def _row(self, name: str, kernel: str) -> dict[str, Any]:
        key = self.ckpt.gguf_tensor(name)
        if key not in self.rows:
            self.rows[key] = {"tensor": key, "type": self.ckpt.stored_type(name), "kernel": kernel,
                              "err_sq": 0.0, "ref_sq": 0.0, "max_abs_error": 0.0}
        return self.rows[key]

    def exact(self, name: str, kernel: str) -> None:
        if self.active:
            self._row(name, kernel)

    def measured(self, name: str, reference: np.ndarray, approx: np.ndarray, kernel: str) -> None:
        if not self.active:
            return
        row = self._row(name, kernel)
        diff = approx.astype(np.float64) - reference
        row["err_sq"] += float((diff * diff).sum())
        row["ref_sq"] += float((reference.astype(np.float64) ** 2).sum())
        row["max_abs_error"] = max(row["max_abs_error"], float(np.abs(diff).max(initial=0.0)))

    def report(self, weight_names: list[str]) -> list[dict[str, Any]]:
        """One row per GGUF tensor the model read; tensors no quantized op touched stayed float32 (their
        dequantized values, exactly)."""
        for name in weight_names:
            self._row(name, FLOAT32)
        rows = []
        for row in self.rows.values():
            rel = (row["err_sq"] / row["ref_sq"]) ** 0.5 if row["ref_sq"] > 0 else 0.0
            rows.append({"tensor": row["tensor"], "type": row["type"], "kernel": row["kernel"],
                         "relative_rms_error": rel, "max_abs_error": row["max_abs_error"]})
        return rows

    def write(self, folder: Path, weight_names: list[str], source: str) -> dict[str, Any]:
        """conversion.json and conversion.md; returns the summary the manifest records."""
        rows = self.report(weight_names)
        (folder / "conversion.json").write_text(json.dumps({"source": source, "tensors": rows}, indent=2))
        lines = [f"# Conversion from {Path(source).name}", "",
                 "Error of each tensor as the kernels read it, against the GGUF's own values.", "",
                 "| tensor | GGUF type | kernel layout | relative RMS error | max abs error |", "|---|---|---|---|---|"]
        lines += [f"| {r['tensor']} | {r['type']} | {r['kernel']} | {r['relative_rms_error']:.3g} | "
                  f"{r['max_abs_error']:.3g} |" for r in rows]
        (folder / "conversion.md").write_text("\n".join(lines) + "\n")
        converted = [r for r in rows if r["relative_rms_error"] > 0]
        worst = max(converted, key=lambda r: r["relative_rms_error"], default=None)
        return {"tensors": len(rows), "exact": len(rows) - len(converted), "converted": len(converted),
                "worst": None if worst is None else {k: worst[k] for k in ("tensor", "type", "relative_rms_error")},
                "types": sorted({r["type"] for r in rows})}
