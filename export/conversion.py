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
LAYOUTS = {"exact": "the file's blocks as the kernels read them, bit for bit where the kernels have the block type",
           "head": "the file's blocks, but for the LM head's scan in the policy's layout; its top logits rescored from "
                   "the file's own vocabulary blocks, which the embedding reads",
           "experts": "as `head`, and the experts re-laid into the policy's layout, re-quantized from the file's "
                      "values",
           "fast": "re-laid into the policy's layout, re-quantized from the file's values; the LM head's top logits "
                   "rescored from the file's own vocabulary blocks"}


def kernel_name(q: Quantized, exact: bool) -> str:
    kind = "symmetric" if q.zero_points is None else "zero points"
    if q.zero_points is not None and q.zero_points.dtype == np.float32:
        kind = "float zero points"
    return f"int{q.bits} block {q.block_size} {kind}" + (" (the file's values, exactly)" if exact else "")


def _added(total: float, squares: np.ndarray) -> float:
    """total plus the row sums of `squares` [rows, ...], added one row after the other: the same float whether a
    tensor is measured whole or by slices of rows (the vocabulary: export/quant_ops.py), which a sum over the whole
    array (numpy's pairwise summation) is not."""
    rows = squares.reshape(squares.shape[0] if squares.ndim else 1, -1).sum(axis=1)
    return float(np.cumsum(np.concatenate([[total], rows]))[-1])  # np.cumsum adds in order


class ConversionLog:
    """Per GGUF tensor: type, kernel layout, sum of squared error and of squared value, max abs error.
    Inactive (records nothing) for checkpoints that are not GGUF files."""

    def __init__(self, checkpoint: Any):
        self.ckpt = checkpoint
        self.active = hasattr(checkpoint, "stored_type") and hasattr(checkpoint, "gguf_tensor")
        self.rows: dict[str, dict[str, Any]] = {}
        self.notes: dict[str, list[str]] = {}  # GGUF tensor -> what else reads it (note)

    def _row(self, name: str, kernel: str) -> dict[str, Any]:
        key = self.ckpt.gguf_tensor(name)
        if key not in self.rows:
            self.rows[key] = {"tensor": key, "type": self.ckpt.stored_type(name), "kernel": kernel,
                              "err_sq": 0.0, "ref_sq": 0.0, "max_abs_error": 0.0}
        return self.rows[key]

    def exact(self, name: str, kernel: str) -> None:
        if self.active:
            self._row(name, kernel)

    def note(self, name: str, text: str) -> None:
        """Say more about how the kernels read a tensor (the vocabulary's rescoring copy)."""
        if self.active:
            self.notes.setdefault(self.ckpt.gguf_tensor(name), []).append(text)

    def measured(self, name: str, reference: np.ndarray, approx: np.ndarray, kernel: str) -> None:
        if not self.active:
            return
        row = self._row(name, kernel)
        diff = approx.astype(np.float64) - reference
        row["max_abs_error"] = max(row["max_abs_error"], float(np.abs(diff).max(initial=0.0)))
        row["err_sq"] = _added(row["err_sq"], np.square(diff, out=diff))
        row["ref_sq"] = _added(row["ref_sq"], np.square(reference, dtype=np.float64))

    def report(self, weight_names: list[str]) -> list[dict[str, Any]]:
        """One row per GGUF tensor the model read; tensors no quantized op touched stayed float32 (their
        dequantized values, exactly)."""
        for name in weight_names:
            self._row(name, FLOAT32)
        rows = []
        for row in self.rows.values():
            rel = (row["err_sq"] / row["ref_sq"]) ** 0.5 if row["ref_sq"] > 0 else 0.0
            kernel = "; ".join([row["kernel"], *self.notes.get(row["tensor"], [])])
            rows.append({"tensor": row["tensor"], "type": row["type"], "kernel": kernel,
                         "relative_rms_error": rel, "max_abs_error": row["max_abs_error"]})
        return rows

    def write(self, folder: Path, weight_names: list[str], source: str, layout: str | None = None,
              against_exact: dict[str, Any] | None = None) -> dict[str, Any]:
        """conversion.json and conversion.md; returns the summary the manifest records. `layout`: the
        --gguf-layout written; `against_exact`: KL(the file's blocks exactly || this bundle) on held-out text."""
        rows = self.report(weight_names)
        (folder / "conversion.json").write_text(json.dumps(
            {"source": source, "gguf_layout": layout, "against_exact": against_exact, "tensors": rows}, indent=2))
        lines = [f"# Conversion from {Path(source).name}", ""]
        if layout is not None:
            lines += [f"Layout: `{layout}` ({LAYOUTS.get(layout, layout)}).", ""]
        if against_exact is not None:
            lines += [f"KL(the file's values exactly || this bundle): {against_exact['kl']:.4g}, top-1 agreement "
                      f"{against_exact['top1']:.1%}, over {against_exact['tokens']} predictions of "
                      f"{against_exact['text']}. The `exact` layout computes what llama.cpp computes on the file "
                      "(KL 0.0014 on the demo model's Q4_0, device_bench/README.md \"GGUF in\").", ""]
        lines += ["Error of each tensor as the kernels read it, against the GGUF's own values.", "",
                 "| tensor | GGUF type | kernel layout | relative RMS error | max abs error |", "|---|---|---|---|---|"]
        lines += [f"| {r['tensor']} | {r['type']} | {r['kernel']} | {r['relative_rms_error']:.3g} | "
                  f"{r['max_abs_error']:.3g} |" for r in rows]
        (folder / "conversion.md").write_text("\n".join(lines) + "\n")
        converted = [r for r in rows if r["relative_rms_error"] > 0]
        worst = max(converted, key=lambda r: r["relative_rms_error"], default=None)
        summary = {} if against_exact is None else {"kl_against_exact": against_exact["kl"]}
        return summary | {"tensors": len(rows), "exact": len(rows) - len(converted), "converted": len(converted),
                "worst": None if worst is None else {k: worst[k] for k in ("tensor", "type", "relative_rms_error")},
                "types": sorted({r["type"] for r in rows})}
