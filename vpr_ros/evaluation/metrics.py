"""Retrieval metrics: Recall@N, ground-truth positives by distance, precision/recall curve.

Definitions (also in docs/evaluation.md):

* A database place is a *positive* of a query when their planar (x, y) distance is at
  most ``radius_m`` (25 m is the usual VPR threshold).
* Recall@N is the fraction of queries with at least one positive among the first N
  predictions.  Queries without any positive count as misses (the standard benchmark
  definition; a dataset with such queries should say so).
* The precision/recall curve scores the *confidence gate*: a query is accepted when its
  confidence is >= the threshold; precision = correct accepted / accepted and
  recall = correct accepted / all queries.  Equal confidences are accepted or rejected
  together, so each point of the curve is a threshold a user can actually set.
"""

from __future__ import annotations

from typing import Dict, List, Sequence

import numpy as np

from ..constants import RADIUS_M

DEFAULT_NS = (1, 5, 10, 20)


def positives_within(query_xy: np.ndarray, db_xy: np.ndarray,
                     radius_m: float = RADIUS_M) -> List[np.ndarray]:
    """For each query, the sorted indices of database places within ``radius_m`` (x, y only)."""
    from scipy.spatial import cKDTree

    query_xy = np.asarray(query_xy, dtype=np.float64)[:, :2]
    db_xy = np.asarray(db_xy, dtype=np.float64)[:, :2]
    if len(db_xy) == 0:
        return [np.zeros(0, dtype=np.int64) for _ in range(len(query_xy))]
    tree = cKDTree(db_xy)
    # A tiny tolerance so a place exactly at the radius counts (float rounding of UTM values).
    hits = tree.query_ball_point(query_xy, r=float(radius_m) + 1e-6)
    return [np.array(sorted(h), dtype=np.int64) for h in hits]


def correct_at_n(predictions: np.ndarray, positives: Sequence[np.ndarray]) -> np.ndarray:
    """(Q, K) bool: True at column n when prediction n of the query is a positive."""
    predictions = np.asarray(predictions)
    if predictions.ndim != 2:
        raise ValueError(f"predictions must be (Q, K), got shape {predictions.shape}")
    if len(positives) != len(predictions):
        raise ValueError(f"{len(predictions)} prediction rows but {len(positives)} positive lists")
    out = np.zeros(predictions.shape, dtype=bool)
    for q, (row, pos) in enumerate(zip(predictions, positives)):
        out[q] = np.isin(row, np.asarray(pos))
    return out


def recall_at_n(predictions: np.ndarray, positives: Sequence[np.ndarray],
                ns: Sequence[int] = DEFAULT_NS) -> Dict[str, float]:
    """Fraction of queries with a positive among their first N predictions, for each N.

    ``predictions`` holds place indices, best first; negative indices (FAISS' "no result")
    never count.  N larger than the number of columns uses all columns.
    """
    hits = correct_at_n(predictions, positives)
    num = len(hits)
    out: Dict[str, float] = {}
    for n in ns:
        if n < 1:
            raise ValueError(f"N must be >= 1, got {n}")
        if num == 0:
            out[str(n)] = 0.0
        else:
            out[str(n)] = float(hits[:, :n].any(axis=1).mean())
    return out


def precision_recall(confidence: np.ndarray, correct: np.ndarray) -> dict:
    """Precision/recall of accepting queries whose confidence is >= a threshold.

    Returns ``precision``, ``recall``, ``thresholds`` (one entry per distinct confidence,
    highest first), ``recall_at_100_precision`` (largest recall with no wrong acceptance,
    0 when even the most confident query is wrong) and ``auc`` (average precision: the
    area under the step curve, sum over thresholds of precision x recall increment).
    """
    confidence = np.asarray(confidence, dtype=np.float64).reshape(-1)
    correct = np.asarray(correct, dtype=bool).reshape(-1)
    if confidence.shape != correct.shape:
        raise ValueError(f"confidence {confidence.shape} and correct {correct.shape} differ")
    num = len(confidence)
    if num == 0:
        return {"precision": np.zeros(0), "recall": np.zeros(0), "thresholds": np.zeros(0),
                "recall_at_100_precision": 0.0, "auc": 0.0}
    order = np.argsort(-confidence, kind="stable")
    conf_sorted = confidence[order]
    tp = np.cumsum(correct[order])
    accepted = np.arange(1, num + 1)
    # Last position of every run of equal confidences = the point of that threshold.
    last_of_group = np.r_[conf_sorted[1:] != conf_sorted[:-1], True]
    tp = tp[last_of_group]
    accepted = accepted[last_of_group]
    thresholds = conf_sorted[last_of_group]
    precision = tp / accepted
    recall = tp / num
    perfect = precision >= 1.0
    r100 = float(recall[perfect].max()) if perfect.any() else 0.0
    recall_steps = np.diff(np.r_[0.0, recall])
    auc = float(np.sum(precision * recall_steps))
    return {"precision": precision, "recall": recall, "thresholds": thresholds,
            "recall_at_100_precision": r100, "auc": auc}
