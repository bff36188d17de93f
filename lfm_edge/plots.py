"""One way to draw the project's plots: matplotlib without a display, a figure written atomically as PNG.

    with figure(out / "bench.png", title="decode speed") as (fig, ax):
        ax.plot(...)

matplotlib is imported when a plot is drawn (it is the export extra's, not the runtime's).
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .runtime.files import write_atomic

__all__ = ["figure", "whole_numbers"]


@contextmanager
def figure(path: str | Path, rows: int = 1, cols: int = 1, *, size: tuple[float, float] = (7.5, 4.5),
           title: str | None = None, dpi: int = 110) -> Iterator[tuple[Any, Any]]:
    """(figure, axes) for the block; on leaving it, laid out and written to `path` (the axes: one, or an
    array for rows x cols > 1). Nothing is written when the block raises."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(rows, cols, figsize=size)
    try:
        yield fig, axes
        if title:
            fig.suptitle(title)
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=dpi)
        write_atomic(path, buffer.getvalue())
    finally:
        plt.close(fig)


def whole_numbers(axis: Any) -> None:
    """Ticks at whole numbers only on `axis` (e.g. `ax.xaxis`): turns and rounds, never turn 1.25."""
    from matplotlib.ticker import MaxNLocator

    axis.set_major_locator(MaxNLocator(integer=True))
