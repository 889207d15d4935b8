"""Evaluation: Recall@N, precision/recall of the confidence gate, benchmark datasets, plots."""

from .metrics import positives_within, precision_recall, recall_at_n

__all__ = ["positives_within", "precision_recall", "recall_at_n"]
