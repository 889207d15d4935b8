"""Several localization methods scored on the same frames, side by side.

A *method* is a way of answering each frame with a ranked list of map places: the
single-frame first stage (global descriptor + FAISS), the two-stage pipeline (re-ranked
with SelaVPR local features), a stream localizer, ...  :data:`FRAME_METHODS` derives
each method's answer from one per-frame record of the live node (what ``vpr demo`` and
``vpr eval bag --realtime`` collect), so one replay scores them all; a method whose
answer is missing from the records (no re-ranking, no stream) is left out.  Adding a row
= adding an entry to :data:`FRAME_METHODS` (or building a :class:`MethodAnswers` by hand).

:func:`compare_methods` scores every method against the ground truth (Recall@N, error of
the top-1 place, latency of the stages the method needs) and :func:`format_table`
prints them as one table; :func:`method_tracks` gives the plots their inputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from .metrics import positives_within, recall_at_n

# Stages of the node's timings_ms that only the second stage / the stream localizer need.
SECOND_STAGE_TIMINGS = ("rerank_extract", "rerank")
STREAM_TIMINGS = ("stream",)


def _latency(rec: dict, without=()) -> float:
    """The node's total time for the frame without the given stages."""
    timings = rec.get("timings_ms") or {}
    total = float(timings.get("total", rec.get("latency_ms", np.nan)))
    return total - sum(float(timings[k]) for k in without if k in timings)


@dataclass
class MethodAnswers:
    """One method's answers: per frame, place indices best first (empty = no answer)."""

    name: str
    ranked: List[List[int]]
    latency_ms: List[float] = field(default_factory=list)
    confident: Optional[List[bool]] = None


def _first_stage(rec: dict) -> Optional[dict]:
    """The global-descriptor order: the published candidates sorted by their similarity.

    With re-ranking the node publishes the re-ranked order and each candidate's global
    similarity (``scores``); sorting by it (stable) restores the FAISS order of the same
    candidates, i.e. the answer the node gives without re-ranking.
    """
    sims = np.asarray([np.nan if s is None else s for s in rec["scores"]], dtype=np.float64)
    order = np.argsort(-np.nan_to_num(sims, nan=-np.inf), kind="stable")
    return {"ranked": [int(rec["place_indices"][i]) for i in order],
            "latency_ms": _latency(rec, SECOND_STAGE_TIMINGS + STREAM_TIMINGS)}


def _two_stage(rec: dict) -> Optional[dict]:
    if not rec.get("reranked"):
        return None
    return {"ranked": [int(i) for i in rec["place_indices"]],
            "latency_ms": _latency(rec, STREAM_TIMINGS), "confident": bool(rec.get("confident"))}


SINGLE_FRAME = "single-frame (global)"
TWO_STAGE = "two-stage (re-ranked)"
STREAM = "stream localizer"


def _stream(rec: dict) -> Optional[dict]:
    """The stream localizer's answer (over the frame answers above it: re-ranked when the
    node re-ranks); confident = what the node published as confident."""
    st = rec.get("stream")
    if not st:
        return None
    # the stream's answer first, then the frame's own candidates (as vpr eval recall ranks)
    answer = int(st["place_index"])
    rest = [int(i) for i in rec["place_indices"] if int(i) != answer]
    return {"ranked": [answer] + rest, "latency_ms": _latency(rec),
            "confident": bool(st["confident"])}


# name -> function(per-frame record) -> {"ranked": [...], "latency_ms": x, "confident": b}
# or None when the record has no answer of that method.
FRAME_METHODS: Dict[str, Callable[[dict], Optional[dict]]] = {
    SINGLE_FRAME: _first_stage,
    TWO_STAGE: _two_stage,
    STREAM: _stream,
}


def answers_from_frames(frames: Sequence[dict],
                        methods: Optional[Dict[str, Callable]] = None) -> List[MethodAnswers]:
    """The methods present in the node's per-frame records (in ``methods`` order)."""
    out = []
    for name, fn in (methods or FRAME_METHODS).items():
        answers = [fn(rec) for rec in frames]
        if not answers or any(a is None for a in answers):
            continue
        conf = [a.get("confident") for a in answers]
        out.append(MethodAnswers(name, [a["ranked"] for a in answers],
                                 [a.get("latency_ms", np.nan) for a in answers],
                                 None if any(c is None for c in conf) else conf))
    return out


def _stats(values) -> Optional[dict]:
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=np.float64)
    if v.size == 0:
        return None
    return {"mean": float(v.mean()), "p50": float(np.median(v)),
            "p90": float(np.percentile(v, 90)), "p95": float(np.percentile(v, 95)),
            "max": float(v.max())}


def compare_methods(methods: Sequence[MethodAnswers], gt_xy: np.ndarray, db_xy: np.ndarray,
                    radius_m: float, ns=(1, 5, 10)) -> List[dict]:
    """One row per method: recall@N, top-1 error (m) and latency (ms) statistics."""
    gt_xy = np.asarray(gt_xy, dtype=np.float64)[:, :2]
    db_xy = np.asarray(db_xy, dtype=np.float64)[:, :2]
    positives = positives_within(gt_xy, db_xy, radius_m)
    rows = []
    for m in methods:
        if len(m.ranked) != len(gt_xy):
            raise ValueError(f"method {m.name!r}: {len(m.ranked)} answers for {len(gt_xy)} frames")
        k = max([len(r) for r in m.ranked] + [1])
        preds = np.full((len(m.ranked), k), -1, dtype=np.int64)
        for i, r in enumerate(m.ranked):
            preds[i, :len(r)] = r
        top1 = preds[:, 0]
        err = np.where(top1 >= 0, np.linalg.norm(db_xy[np.maximum(top1, 0)] - gt_xy, axis=1),
                       np.nan)
        row = {"method": m.name, "frames": len(m.ranked),
               "recall": recall_at_n(preds, positives, ns=tuple(n for n in ns if n <= k) or (1,)),
               "error_m": _stats(err), "latency_ms": _stats(m.latency_ms),
               "_top1": top1, "_err": err,
               "_correct": np.array([t in set(p.tolist()) for t, p in zip(top1, positives)])}
        if m.confident is not None:
            confident = np.asarray(m.confident, dtype=bool)
            row["confident_frames"] = int(confident.sum())
            row["precision_of_confident"] = (float(row["_correct"][confident].mean())
                                             if confident.any() else None)
            row["_confident"] = confident
        rows.append(row)
    return rows


def public_rows(rows: Sequence[dict]) -> List[dict]:
    return [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]


def format_table(rows: Sequence[dict], ns=(1, 5, 10)) -> str:
    """The rows as an aligned text table (recall in %, error in m, latency in ms)."""
    def pct(v):
        return "-" if v is None else f"{100 * v:.1f}"

    def num(d, key):
        return "-" if not d else f"{d[key]:.1f}"

    def published(r):
        if "confident_frames" not in r:
            return "-"
        return f"{r['confident_frames']} ({pct(r['precision_of_confident'])} %)"

    header = (["method"] + [f"R@{n}" for n in ns]
              + ["median err m", "p90 err m", "poses published (precision)",
                 "latency ms (mean)", "p95"])
    table = [header]
    for r in rows:
        table.append([r["method"]] + [pct(r["recall"].get(str(n))) for n in ns]
                     + [num(r["error_m"], "p50"), num(r["error_m"], "p90"), published(r),
                        num(r["latency_ms"], "mean"), num(r["latency_ms"], "p95")])
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = []
    for j, row in enumerate(table):
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]
        lines.append("  ".join(cells))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def method_tracks(rows: Sequence[dict], db_xy: np.ndarray) -> List[dict]:
    """Per method: matched place positions, correctness and confidence, for the plots."""
    db_xy = np.asarray(db_xy, dtype=np.float64)[:, :2]
    out = []
    for r in rows:
        top1 = r["_top1"]
        xy = np.where((top1 >= 0)[:, None], db_xy[np.maximum(top1, 0)], np.nan)
        out.append({"label": r["method"], "xy": xy, "place": top1, "correct": r["_correct"],
                    "err": r["_err"], "confident": r.get("_confident")})
    return out
