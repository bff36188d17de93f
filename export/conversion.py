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


class ConversionLog:
    """Per GGUF tensor: type, kernel layout, sum of squared error and of squared value, max abs error.
    Inactive (records nothing) for checkpoints that are not GGUF files."""

    def __init__(self, checkpoint: Any):
        self.ckpt = checkpoint
        self.active = hasattr(checkpoint, "stored_type") and hasattr(checkpoint, "gguf_tensor")
        self.rows: dict[str, dict[str, Any]] = {}
        self.notes: dict[str, list[str]] = {}  # GGUF tensor -> what else reads it (note)
        self._slices: dict[str, tuple[PairwiseSum, PairwiseSum]] = {}  # a tensor measured by rows, until complete

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

    def measured(self, name: str, reference: np.ndarray, approx: np.ndarray, kernel: str,
                 rows_of: int | None = None) -> None:
        """Add the error of `approx` against `reference`. `rows_of`: they are the next rows of a tensor of that
        many rows, given in order (the vocabulary, quantized by rows): its sums are then the whole tensor's, to the
        bit (`PairwiseSum`)."""
        if not self.active:
            return
        row = self._row(name, kernel)
        diff = approx.astype(np.float64) - reference
        row["max_abs_error"] = max(row["max_abs_error"], float(np.abs(diff).max(initial=0.0)))
        if rows_of is None:
            row["err_sq"] += float((diff * diff).sum())
            row["ref_sq"] += float((reference.astype(np.float64) ** 2).sum())
            return
        n = rows_of * (reference.size // reference.shape[0])
        err, ref = self._slices.setdefault(name, (PairwiseSum(n), PairwiseSum(n)))
        err.add(np.square(diff, out=diff).reshape(-1))
        ref.add(np.square(reference, dtype=np.float64).reshape(-1))
        if err.complete:
            row["err_sq"] += err.value()
            row["ref_sq"] += ref.value()
            del self._slices[name]

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


class PairwiseSum:
    """numpy's sum of n float64 values (a contiguous array's `.sum()`), fed in consecutive pieces: the same float,
    bit for bit, without the values together in memory. numpy sums pairwise: a range of more than 128 values is
    split at half its length rounded down to a multiple of 8, each half summed the same way, the two sums added;
    128 or fewer are summed by its unrolled loop. So each range of that tree that lies inside one piece is that
    piece's `np.add.reduce` over it (its own call makes the same splits below it), a leaf cut by a piece's end
    waits for its other values (at most 128), and the root is put together from those sums when all n have come."""

    LEAF = 128  # numpy's PW_BLOCKSIZE

    def __init__(self, n: int):
        self.n, self.seen = n, 0
        self._sums: dict[tuple[int, int], float] = {}
        self._waiting: dict[tuple[int, int], list[np.ndarray]] = {}

    @property
    def complete(self) -> bool:
        return self.seen == self.n

    def add(self, values: np.ndarray) -> None:
        """The next values (1-D float64)."""
        start, stop = self.seen, self.seen + values.size
        if stop > self.n:
            raise ValueError(f"PairwiseSum: {stop} values given for a sum of {self.n}")
        self._visit(0, self.n, start, stop, values)
        self.seen = stop

    def value(self) -> float:
        if not self.complete:
            raise ValueError(f"PairwiseSum: {self.seen} of {self.n} values given")
        return self._value(0, self.n)

    @staticmethod
    def _middle(lo: int, hi: int) -> int:
        half = (hi - lo) // 2
        return lo + half - half % 8

    def _visit(self, lo: int, hi: int, start: int, stop: int, values: np.ndarray) -> None:
        if hi <= start or lo >= stop:
            return
        if start <= lo and hi <= stop:
            self._sums[(lo, hi)] = float(np.add.reduce(values[lo - start:hi - start]))
        elif hi - lo <= self.LEAF:
            parts = self._waiting.setdefault((lo, hi), [])
            parts.append(values[max(lo, start) - start:min(hi, stop) - start].copy())
            if sum(p.size for p in parts) == hi - lo:
                self._sums[(lo, hi)] = float(np.add.reduce(np.concatenate(self._waiting.pop((lo, hi)))))
        else:
            middle = self._middle(lo, hi)
            self._visit(lo, middle, start, stop, values)
            self._visit(middle, hi, start, stop, values)

    def _value(self, lo: int, hi: int) -> float:
        found = self._sums.get((lo, hi))
        if found is not None:
            return found
        middle = self._middle(lo, hi)
        return self._value(lo, middle) + self._value(middle, hi)
