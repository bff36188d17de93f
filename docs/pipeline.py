"""Draw docs/pipeline.png: the pipeline's data flow, and which folder may import which (lfm_edge/layers.py).

    python docs/pipeline.py [--out docs/pipeline.png]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lfm_edge.layers import ALLOWED
from lfm_edge.plots import figure

FLOW = [  # (box text, x, y): left to right, then the two that use the runtime
    ("checkpoint folder,\nhub id or GGUF", 0.0, 2.0), ("export/ + quant/\nlfm-export", 2.1, 2.0),
    ("bundle\nmodel.onnx + data,\nmanifest.json", 4.2, 2.0), ("runtime/\nLfmModel, Conversation,\nbackends, lfm-chat",
                                                              6.5, 2.0),
    ("device_bench/\nlfm-bench", 8.8, 2.7), ("mobile_app/\nKivy app, lfm-app", 8.8, 1.3),
]
FLOW_EDGES = [(0, 1), (1, 2), (2, 3), (3, 4), (3, 5)]
LAYOUT = {  # the import layers, right of the flow: one row per layer, who imports above what it imports, placed
    # so that no arrow crosses a box
    "mobile_app": (14.4, 4.15), "device_bench": (12.0, 3.35), "export": (10.9, 2.55), "lfm_edge": (15.0, 1.75),
    "quant": (10.9, 0.95), "runtime": (13.9, 0.95),
}


def box(ax, x: float, y: float, text: str, color: str) -> None:
    ax.text(x, y, text, ha="center", va="center", fontsize=9,
            bbox={"boxstyle": "round,pad=0.45", "fc": color, "ec": "#555555"})


def draw(out: Path) -> None:
    with figure(out, size=(15, 5.0)) as (_, ax):
        for text, x, y in FLOW:
            box(ax, x, y, text, "#dbe9f6" if "/" in text else "#f2f2f2")
        for a, b in FLOW_EDGES:
            (_, x0, y0), (_, x1, y1) = FLOW[a], FLOW[b]
            ax.annotate("", (x1 - 0.95, y1), (x0 + 0.95, y0), arrowprops={"arrowstyle": "-|>", "lw": 1.5})
        ax.text(4.4, 4.2, "data: a checkpoint becomes a bundle the runtime runs", ha="center", fontsize=11)
        for folder, (x, y) in LAYOUT.items():
            box(ax, x, y, "lfm_edge/\n(plots, layers)" if folder == "lfm_edge" else f"{folder}/", "#dbe9f6")
        for folder, targets in ALLOWED.items():
            for target in targets:
                if folder in LAYOUT and target in LAYOUT:
                    (x0, y0), (x1, y1) = LAYOUT[folder], LAYOUT[target]
                    ax.annotate("", (x1, y1 + 0.22), (x0, y0 - 0.22),
                                arrowprops={"arrowstyle": "-|>", "color": "tab:orange", "lw": 1.2})
        ax.text(13.0, 4.75, "imports: only downward (tests/test_layers.py)", ha="center", fontsize=11)
        ax.axvline(10.2, color="#bbbbbb", lw=0.8)
        ax.set(xlim=(-1.0, 16.0), ylim=(0.4, 5.0))
        ax.axis("off")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "pipeline.png")
    draw(parser.parse_args().out)


if __name__ == "__main__":
    main()
