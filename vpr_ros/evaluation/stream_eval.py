"""Scoring the stream localizer on a sequence with ground truth (shared by every evaluator).

:func:`run_stream` feeds per-frame retrieval results, in driving order, through a fresh
:class:`vpr_ros.stream.StreamLocalizer`; :func:`stream_report` turns its answers into the
report's ``stream`` object:

* ``recall``: Recall@1/5/10/20 of the ranking "stream answer first, then the frame's own
  retrieval candidates" (so R@N >= the stream's R@1 and comparable to single-frame R@N);
* ``recall_at_100_precision``: the largest fraction of frames accepted, in order of
  calibrated confidence, before the first wrong one;
* ``precision_of_published`` / ``published_fraction``: the frames whose confidence reaches
  the calibrated threshold (those the node publishes on ``~/pose``), their precision and
  how many they are;
* ``calibration``: the fit on all frames (what ``--save-map`` stores in the manifest).

To keep these honest the confidences and the threshold used for the three gate numbers
are **cross-fitted**: the sequence is cut into two contiguous halves and each half is
scored with the calibration fitted on the other (contiguous, not even/odd, because
neighbouring frames of a stream are alike).  Ground truth only ever scores; it never
feeds the localizer.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence

import numpy as np

from ..stream import (METHOD, StreamConfig, StreamLocalizer, calibrated_confidence,
                      fit_calibration)
from .metrics import precision_recall, recall_at_n

DEFAULT_NS = (1, 5, 10, 20)


def run_stream(positions: np.ndarray, cand_idx: np.ndarray, cand_sims: np.ndarray,
               map_descriptors=None, query_descriptors: Optional[np.ndarray] = None,
               stamps_ns: Optional[np.ndarray] = None, odometry: Optional[np.ndarray] = None,
               rerank_scores: Optional[np.ndarray] = None,
               degenerate: Optional[np.ndarray] = None,
               config: Optional[StreamConfig] = None, progress: bool = False) -> Dict:
    """Run one stream over Q frames; arrays of answers, raw confidences and prior fits.

    ``odometry`` (Q, 3): the odometry position at each frame (any fixed odometry frame),
    NaN rows where there is none.  Without stamps, frames are spaced one second apart.
    """
    from tqdm import tqdm

    q = len(cand_idx)
    stream = StreamLocalizer(positions, descriptors=map_descriptors, config=config)
    stamps = (np.asarray(stamps_ns, dtype=np.int64) if stamps_ns is not None
              and len(stamps_ns) == q and (np.asarray(stamps_ns) >= 0).all()
              and (np.diff(np.asarray(stamps_ns)) > 0).all()
              else np.arange(q, dtype=np.int64) * 1_000_000_000)
    out = {k: np.zeros(q) for k in ("raw", "fit", "ms")}
    out["answer"] = np.zeros(q, dtype=np.int64)
    out["localized"] = np.zeros(q, dtype=bool)
    odo_used = 0
    for i in tqdm(range(q), desc="stream", unit="frame", disable=not progress):
        if odometry is not None and np.isfinite(odometry[i]).all():
            stream.add_odometry(int(stamps[i]), odometry[i])
        est = stream.observe(cand_idx[i], cand_sims[i],
                             descriptor=None if query_descriptors is None else query_descriptors[i],
                             stamp_ns=int(stamps[i]),
                             rerank_scores=None if rerank_scores is None else rerank_scores[i],
                             degenerate=bool(degenerate[i]) if degenerate is not None else False)
        out["answer"][i] = est.place_index
        out["raw"][i] = est.raw_confidence
        out["fit"][i] = est.prior_fit
        out["ms"][i] = est.timings_ms.get("stream", 0.0)
        odo_used += est.used_odometry
    out["used_odometry_frames"] = int(odo_used)
    out["config"] = stream.config
    return out


def ranked_with_answer(answer: np.ndarray, single_ranked: np.ndarray) -> np.ndarray:
    """(Q, K) ranking: the stream answer first, then the frame's candidates without it."""
    q, k = single_ranked.shape
    ranked = np.empty((q, k), dtype=np.int64)
    for i in range(q):
        rest = single_ranked[i][single_ranked[i] != answer[i]]
        ranked[i] = np.r_[answer[i], rest][:k]
    return ranked


def cross_fitted(raw: np.ndarray, fit: np.ndarray, correct: np.ndarray,
                 target_precision: float, fit_margin: float = StreamConfig.fit_margin):
    """Confidence and acceptance of each frame from the calibration of the other half."""
    q = len(raw)
    conf = np.zeros(q)
    accepted = np.zeros(q, dtype=bool)
    half = q // 2
    folds = [np.arange(q) < half, np.arange(q) >= half]
    for test, train in ((folds[0], folds[1]), (folds[1], folds[0])):
        if not test.any():
            continue
        params = fit_calibration(raw[train], fit[train], correct[train], target_precision,
                                 quiet=True, fit_margin=fit_margin)
        conf[test] = calibrated_confidence(raw[test], fit[test], params, fit_margin)
        accepted[test] = conf[test] >= params["threshold"]
    return conf, accepted


def stream_report(run: Dict, single_ranked: np.ndarray, positives: Sequence[np.ndarray],
                  target_precision: float = 0.99, ns=DEFAULT_NS,
                  motion_prior_fits: Optional[bool] = None,
                  odometry_given: bool = False) -> Dict:
    """The report's ``stream`` object (see module docstring) plus arrays under ``_arrays``."""
    answer = run["answer"]
    ranked = ranked_with_answer(answer, single_ranked)
    correct = np.array([a in set(p.tolist()) for a, p in zip(answer, positives)], dtype=bool)
    margin = run["config"].fit_margin
    calibration = fit_calibration(run["raw"], run["fit"], correct, target_precision,
                                  fit_margin=margin)
    conf, accepted = cross_fitted(run["raw"], run["fit"], correct, target_precision, margin)
    pr = precision_recall(conf, correct)
    published = int(accepted.sum())
    k = single_ranked.shape[1]
    ms = run["ms"][1:] if len(run["ms"]) > 1 else run["ms"]
    report = {
        "recall": recall_at_n(ranked, positives, ns=tuple(n for n in ns if n <= k)),
        "recall_at_100_precision": float(pr["recall_at_100_precision"]),
        "precision_of_published": (float(correct[accepted].mean()) if published else None),
        "published_fraction": float(published / max(len(answer), 1)),
        "method": run.get("method", METHOD),
        "target_precision": float(target_precision),
        "odometry": bool(odometry_given),
        "frames_with_odometry": int(run.get("used_odometry_frames", 0)),
        "stream_answered_fraction": float(np.mean(run["fit"] > run["config"].fit_margin)),
        "motion_prior_fits": motion_prior_fits,
        "pr_auc": float(pr["auc"]),
        "calibration": calibration,
        "latency_ms": {"median": float(np.median(ms)) if len(ms) else 0.0,
                       "p95": float(np.percentile(ms, 95)) if len(ms) else 0.0},
        "_arrays": {"answer": answer, "correct": correct, "confidence": conf,
                    "accepted": accepted, "pr": pr},
    }
    return report
