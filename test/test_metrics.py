"""Recall@N, positives by distance and the precision/recall curve on hand-computed cases."""

import numpy as np
import pytest

from vpr_ros.evaluation.metrics import (correct_at_n, positives_within, precision_recall,
                                        recall_at_n)


def test_positives_within_radius_counts_the_boundary_and_ignores_z():
    db = np.array([[0, 0, 0], [0, 20, 5], [0, 25, 0], [0, 40, 0], [30, 0, 0]], float)
    q = np.array([[0, 0, 100], [0, 45, 0], [1000, 1000, 0]], float)
    pos = positives_within(q, db, radius_m=25.0)
    assert [p.tolist() for p in pos] == [[0, 1, 2], [1, 2, 3], []]


def test_recall_at_n_hand_case():
    # 4 queries; positives and ranked predictions chosen so that the hits fall at
    # rank 1, rank 3, rank 6 and never.
    positives = [np.array([7]), np.array([2, 3]), np.array([9]), np.array([1])]
    preds = np.array([
        [7, 0, 1, 4, 5, 6],
        [0, 1, 3, 2, 4, 5],
        [0, 1, 2, 3, 4, 9],
        [0, 2, 3, 4, 5, 6],
    ])
    r = recall_at_n(preds, positives, ns=(1, 2, 3, 5, 6, 20))
    assert r == {"1": 0.25, "2": 0.25, "3": 0.5, "5": 0.5, "6": 0.75, "20": 0.75}


def test_recall_ignores_missing_results_and_counts_queries_without_positives_as_misses():
    positives = [np.array([0]), np.array([], dtype=np.int64)]
    preds = np.array([[-1, 0], [-1, -1]])
    assert recall_at_n(preds, positives, ns=(1, 2)) == {"1": 0.0, "2": 0.5}
    assert correct_at_n(preds, positives).tolist() == [[False, True], [False, False]]


def test_recall_rejects_mismatched_inputs():
    with pytest.raises(ValueError):
        recall_at_n(np.zeros((2, 3), int), [np.array([0])])
    with pytest.raises(ValueError):
        recall_at_n(np.zeros(3, int), [np.array([0])] * 3)


def test_precision_recall_hand_case():
    conf = np.array([0.6, 0.9, 0.7, 0.8])
    correct = np.array([True, True, False, True])
    # Sorted by confidence: 0.9 T, 0.8 T, 0.7 F, 0.6 T
    pr = precision_recall(conf, correct)
    np.testing.assert_allclose(pr["thresholds"], [0.9, 0.8, 0.7, 0.6])
    np.testing.assert_allclose(pr["precision"], [1, 1, 2 / 3, 3 / 4])
    np.testing.assert_allclose(pr["recall"], [0.25, 0.5, 0.5, 0.75])
    assert pr["recall_at_100_precision"] == 0.5
    # AP = sum precision x recall increment = 1*.25 + 1*.25 + (2/3)*0 + .75*.25
    assert pr["auc"] == pytest.approx(0.6875)


def test_precision_recall_groups_equal_confidences():
    conf = np.array([0.9, 0.5, 0.5, 0.1])
    correct = np.array([True, True, False, False])
    pr = precision_recall(conf, correct)
    # The two 0.5 queries are accepted together: one point for both.
    np.testing.assert_allclose(pr["thresholds"], [0.9, 0.5, 0.1])
    np.testing.assert_allclose(pr["precision"], [1.0, 2 / 3, 0.5])
    np.testing.assert_allclose(pr["recall"], [0.25, 0.5, 0.5])
    assert pr["recall_at_100_precision"] == 0.25


def test_precision_recall_when_the_most_confident_is_wrong():
    pr = precision_recall(np.array([0.9, 0.2]), np.array([False, True]))
    assert pr["recall_at_100_precision"] == 0.0
    np.testing.assert_allclose(pr["precision"], [0.0, 0.5])
    empty = precision_recall(np.zeros(0), np.zeros(0, bool))
    assert empty["auc"] == 0.0 and len(empty["precision"]) == 0
