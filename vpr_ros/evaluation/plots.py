"""PNG plots of an evaluation (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Sequence

import numpy as np


def _plt():
    from ..plotting import pyplot

    return pyplot()


def plot_recall_curves(curves: Dict[str, Dict[str, float]], path: Path, title: str = "") -> None:
    """Recall@N against N, one line per method (e.g. global, re-ranked, temporal)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 4), dpi=110)
    for label, rec in curves.items():
        ns = sorted(int(n) for n in rec)
        ax.plot(ns, [100 * rec[str(n)] for n in ns], marker="o", label=label)
        for n in ns:
            ax.annotate(f"{100 * rec[str(n)]:.1f}", (n, 100 * rec[str(n)]),
                        textcoords="offset points", xytext=(0, 5), ha="center", fontsize=7)
    ax.set_xscale("log")
    ax.set_xticks(sorted({int(n) for rec in curves.values() for n in rec}))
    ax.get_xaxis().set_major_formatter(plt.matplotlib.ticker.ScalarFormatter())
    ax.set_xlabel("N (candidates)")
    ax.set_ylabel("Recall@N (%)")
    ax.set_ylim(0, 105)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    ax.set_title(title or "Recall@N")
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)


def plot_pr_curves(curves: Dict[str, dict], path: Path, title: str = "") -> None:
    """Precision/recall of the confidence gate (metrics.precision_recall outputs)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 4), dpi=110)
    for label, pr in curves.items():
        r, p = np.r_[0.0, pr["recall"]], np.r_[1.0, pr["precision"]]
        ax.step(100 * r, 100 * p, where="post",
                label=f"{label} (AP {pr['auc']:.3f}, R@100%P {100 * pr['recall_at_100_precision']:.1f}%)")
    ax.set_xlabel("Recall (% of all queries accepted and correct)")
    ax.set_ylabel("Precision (% of accepted that are correct)")
    ax.set_xlim(0, 100)
    ax.set_ylim(0, 105)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    ax.set_title(title or "Confidence gate: precision / recall")
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)


def plot_examples(queries: Sequence[Path], matches: Sequence[Sequence[Path]],
                  correct: Sequence[Sequence[bool]], path: Path,
                  captions: Optional[Sequence[str]] = None, title: str = "") -> None:
    """A grid: one row per query (query image, then its top matches framed green when
    correct, red when wrong)."""
    from ..preprocess import load_image

    plt = _plt()
    rows = len(queries)
    cols = 1 + max((len(m) for m in matches), default=0)
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 1.5 * rows + 0.4), dpi=100,
                             squeeze=False)
    for r in range(rows):
        ax = axes[r][0]
        ax.imshow(load_image(queries[r]))
        ax.set_title(captions[r] if captions else "query", fontsize=7)
        for c in range(1, cols):
            ax = axes[r][c]
            if c - 1 < len(matches[r]):
                ax.imshow(load_image(matches[r][c - 1]))
                color = "#1a9850" if correct[r][c - 1] else "#d73027"
                for spine in ax.spines.values():
                    spine.set_edgecolor(color)
                    spine.set_linewidth(4)
                ax.set_title(f"top {c}", fontsize=7, color=color)
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
            if not ax.images:
                ax.axis("off")
    fig.suptitle(title or "queries and their top matches (green = within radius)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
