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
                label=f"{label} (AP {pr['auc']:.3f}, "
                      f"R@100%P {100 * pr['recall_at_100_precision']:.1f}%)")
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


# --------------------------------------------------------------------------- along a route

METHOD_COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown")


def route_coordinates(route_xy: np.ndarray) -> np.ndarray:
    """Distance along a route (m) of each of its points: cumulative length of the polyline
    through the map places in map order (a mapping drive's order)."""
    xy = np.asarray(route_xy, dtype=np.float64)[:, :2]
    if len(xy) == 0:
        return np.zeros(0)
    return np.r_[0.0, np.cumsum(np.linalg.norm(np.diff(xy, axis=0), axis=1))]


def along_route(xy: np.ndarray, route_xy: np.ndarray, route_s: np.ndarray) -> np.ndarray:
    """Distance along the route of the map place nearest to each point (NaN stays NaN)."""
    from scipy.spatial import cKDTree

    xy = np.asarray(xy, dtype=np.float64)[:, :2]
    out = np.full(len(xy), np.nan)
    ok = np.isfinite(xy).all(axis=1)
    if ok.any() and len(route_xy):
        _, idx = cKDTree(np.asarray(route_xy, dtype=np.float64)[:, :2]).query(xy[ok])
        out[ok] = np.asarray(route_s)[idx]
    return out


def plot_route_over_time(t: np.ndarray, gt_xy: np.ndarray, tracks: Sequence[dict],
                         route_xy: np.ndarray, path: Path, title: str = "",
                         xlabel: str = "time since first frame (s)") -> np.ndarray:
    """Matched place along the route over time, one panel per method, ground truth beside.

    ``tracks``: dicts with ``label``, ``xy`` (N, 2) matched place positions (NaN = no
    answer), ``correct`` (N,) bool and optionally ``confident`` (N,) bool.  A correct
    answer sits on the ground-truth line (green), a wrong one away from it (red); hollow
    markers are answers the method was not confident about.  Any number of methods
    (single-frame, two-stage, stream, ...) share the axes.  Returns the ground truth's
    distance along the route.
    """
    plt = _plt()
    route_s = route_coordinates(route_xy)
    gt_s = along_route(gt_xy, route_xy, route_s)
    n = max(len(tracks), 1)
    fig, axes = plt.subplots(n, 1, figsize=(9.5, 1.2 + 2.0 * n), dpi=110, sharex=True,
                             sharey=True, squeeze=False)
    for ax, tr in zip(axes[:, 0], tracks):
        s = along_route(tr["xy"], route_xy, route_s)
        ok = np.asarray(tr["correct"], dtype=bool)
        conf = tr.get("confident")
        conf = np.ones(len(s), bool) if conf is None else np.asarray(conf, dtype=bool)
        ax.plot(t, gt_s, "-", c="0.25", lw=1.2, label="ground truth", zorder=2)
        for mask, colour, label, filled in ((ok & conf, "tab:green", "correct", True),
                                            (~ok & conf, "tab:red", "wrong", True),
                                            (ok & ~conf, "tab:green", "correct, unsure", False),
                                            (~ok & ~conf, "tab:red", "wrong, unsure", False)):
            if mask.any():
                ax.scatter(t[mask], s[mask], s=10, zorder=3, label=f"{label} ({mask.sum()})",
                           c=colour if filled else "none", edgecolors=colour)
        ax.set_title(f"{tr['label']}: R@1 {100 * ok.mean():.1f}%", fontsize=9, loc="left")
        ax.set_ylabel("along route (m)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    axes[-1, 0].set_xlabel(xlabel)
    fig.suptitle(title or "matched place along the route", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
    return gt_s


def plot_error_over_time(t: np.ndarray, tracks: Sequence[dict], radius_m: float, path: Path,
                         title: str = "", xlabel: str = "time since first frame (s)",
                         cap_radii: float = 10.0) -> dict:
    """Top-1 error (m) over time on a linear axis from 0, one panel per method.

    Errors above ``cap_radii`` x the radius are drawn as triangles on the top edge (and
    counted in the panel title) so that one 5 km mistake does not flatten everything else.
    Hollow markers: the method was not confident.
    """
    plt = _plt()
    finite = [np.asarray(tr["err"], dtype=np.float64) for tr in tracks]
    largest = max([float(np.nanmax(e)) for e in finite if np.isfinite(e).any()] + [0.0])
    cap = cap_radii * radius_m
    top = cap if largest > cap else max(2.0 * radius_m, 1.1 * largest)
    n = max(len(tracks), 1)
    fig, axes = plt.subplots(n, 1, figsize=(8, 1.0 + 1.7 * n), dpi=110, sharex=True,
                             sharey=True, squeeze=False)
    for j, (ax, tr, err) in enumerate(zip(axes[:, 0], tracks, finite)):
        colour = METHOD_COLOURS[j % len(METHOD_COLOURS)]
        over = err > top
        conf = tr.get("confident")
        conf = np.ones(len(err), bool) if conf is None else np.asarray(conf, dtype=bool)
        ok = ~over
        ax.scatter(t[ok & conf], err[ok & conf], s=9, c=colour, zorder=3)
        ax.scatter(t[ok & ~conf], err[ok & ~conf], s=9, facecolors="none", edgecolors=colour,
                   zorder=3)
        if over.any():
            ax.scatter(t[over], np.full(over.sum(), top), marker="^", s=16, c=colour,
                       zorder=4, clip_on=False)
        ax.axhline(radius_m, ls="--", c="tab:red", lw=1)
        within = float(np.mean(err <= radius_m)) if len(err) else 0.0
        ax.set_title(f"{tr['label']}: median {np.nanmedian(err):.0f} m, {100 * within:.1f}% "
                     f"within {radius_m:g} m, {over.sum()} frames > {top:.0f} m (triangles)",
                     fontsize=8, loc="left")
        ax.set_ylim(0, top * 1.02)
        ax.set_ylabel("error (m)")
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel(xlabel)
    fig.suptitle(title or "error of the top-1 place over time (hollow: not confident; "
                 "dashed: radius)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, format="png")
    ylim = tuple(float(v) for v in axes[0, 0].get_ylim())
    plt.close(fig)
    return {"ylim": ylim, "off_scale": {tr["label"]: int(np.sum(e > top))
                                        for tr, e in zip(tracks, finite)}}


def plot_trajectory(gt_xy: np.ndarray, tracks: Sequence[dict], db_xy: np.ndarray, path: Path,
                    title: str = "", radius_m: float = 25.0) -> dict:
    """Ground-truth path and each method's matched places, zoomed on the driven part.

    The view is the ground truth's extent plus a margin (map places outside it are cut
    off).  An elongated route (one side of its extent over 4x the other, e.g. a straight
    railway) is drawn in route-aligned axes, along-track horizontally and cross-track
    vertically at their own scales, so it fills the figure instead of being a vertical
    line; other routes keep east/north at equal scale.
    """
    plt = _plt()
    gt = np.asarray(gt_xy, dtype=np.float64)[:, :2]
    db = np.asarray(db_xy, dtype=np.float64)[:, :2]
    centre = gt.mean(axis=0) if len(gt) else np.zeros(2)
    origin = gt[0] if len(gt) else np.zeros(2)
    rotate = False
    axes_xy = np.eye(2)
    if len(gt) > 1:
        _, _, vt = np.linalg.svd(gt - centre, full_matrices=False)
        proj = (gt - centre) @ vt.T
        span = proj.max(axis=0) - proj.min(axis=0)
        if span[0] > 4.0 * max(span[1], 1e-9):
            rotate = True
            axes_xy = vt.T
            if axes_xy[:, 0] @ (gt[-1] - gt[0]) < 0:      # along-track follows the drive
                axes_xy = -axes_xy

    def view(xy):
        xy = np.asarray(xy, dtype=np.float64)[:, :2]
        return (xy - origin) @ axes_xy if rotate else xy

    g = view(gt)
    lo, hi = np.nanmin(g, axis=0), np.nanmax(g, axis=0)
    long_span = float(np.max(hi - lo)) if len(g) else 1.0
    margin = np.maximum(0.05 * (hi - lo), 2.0 * radius_m)
    if rotate:   # cross-track: at least +-10% of the route length, to see any offset at all
        margin[1] = max(margin[1], 0.1 * long_span)
    lo, hi = lo - margin, hi + margin
    fig, ax = plt.subplots(figsize=(9, 4) if rotate else (6, 5.5), dpi=110)
    d = view(db)
    inside = ((d >= lo) & (d <= hi)).all(axis=1)
    ax.scatter(d[inside, 0], d[inside, 1], s=4, c="0.8", label="map places", zorder=1)
    ax.plot(g[:, 0], g[:, 1], "-", c="0.3", lw=1.2, label="ground truth", zorder=2)
    markers = ("o", "x", "s", "D", "+")
    for j, tr in enumerate(tracks):
        p = view(tr["xy"])
        ok = np.asarray(tr["correct"], dtype=bool)
        m = markers[j % len(markers)]
        out = ~((p >= lo) & (p <= hi)).all(axis=1) & np.isfinite(p).all(axis=1)
        for mask, colour, word in ((ok & ~out, "tab:green", "correct"),
                                   (~ok & ~out, "tab:red", "wrong")):
            if mask.any():
                kw = {"c": colour} if m in "x+" else {"facecolors": "none", "edgecolors": colour}
                ax.scatter(p[mask, 0], p[mask, 1], s=22, marker=m, zorder=3,
                           label=f"{tr['label']}: {word} ({mask.sum()})", **kw)
        if out.any():   # far-off answers: an arrow on the border, pointing their way
            q = np.clip(p[out], lo, hi)
            d = p[out] - q
            arrows = np.where(np.abs(d[:, 0]) >= np.abs(d[:, 1]),
                              np.where(d[:, 0] > 0, ">", "<"), np.where(d[:, 1] > 0, "^", "v"))
            for k, arrow in enumerate(sorted(set(arrows))):
                sel = arrows == arrow
                ax.scatter(q[sel, 0], q[sel, 1], s=30, marker=arrow, c="tab:red", zorder=4,
                           clip_on=False, label=(f"{tr['label']}: {out.sum()} outside the view"
                                                 if k == 0 else None))
    ax.set_xlim(lo[0], hi[0])
    ax.set_ylim(lo[1], hi[1])
    if rotate:
        ax.set_xlabel("along track (m)")
        ax.set_ylabel("cross track (m)")
        note = " (route-aligned axes, not to scale)"
    else:
        ax.set_aspect("equal", adjustable="datalim")
        ax.set_xlabel("x / east (m)")
        ax.set_ylabel("y / north (m)")
        note = ""
    ax.set_title((title or "trajectory") + note, fontsize=9)
    ax.legend(fontsize=7, loc="best")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, format="png")
    view_box = {"route_aligned": rotate, "xlim": tuple(float(v) for v in ax.get_xlim()),
                "ylim": tuple(float(v) for v in ax.get_ylim())}
    plt.close(fig)
    return view_box
