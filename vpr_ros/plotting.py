"""The one place that sets matplotlib's backend: every plot of vpr_ros (evaluation,
training curves, benchmarks) gets ``pyplot`` from here, on the non-interactive Agg
backend (no display needed, safe in a headless node or CI), and writes PNGs atomically."""

from __future__ import annotations

from pathlib import Path


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (imported on first use: matplotlib is slow
    to import and most commands draw nothing)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def save_png(fig, path: Path, dpi: int = 110, close: bool = True, **savefig_kwargs) -> Path:
    """Write ``fig`` to ``path`` as PNG atomically (a reader never sees half a file)."""
    from .atomic import atomic_path

    path = Path(path)
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=dpi, format="png", **savefig_kwargs)
    if close:
        pyplot().close(fig)
    return path
