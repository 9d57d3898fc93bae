"""AUC, GAUC and logloss of slices of the test split."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from attention_ctr.training import score


def group_auc(users: np.ndarray, labels: np.ndarray, scores: np.ndarray) -> tuple[float, int]:
    """GAUC: per-user AUC averaged with impression weights over users with both classes.

    Per-user AUC is the Mann-Whitney statistic from within-user average ranks (ties count
    one half, as in scikit-learn). Returns (GAUC, users counted); NaN when no user counts.
    """
    frame = pd.DataFrame(
        {
            "user": np.asarray(users),
            "label": np.asarray(labels, dtype=np.int64),
            "score": np.asarray(scores, dtype=np.float64),
        }
    )
    frame["rank"] = frame.groupby("user")["score"].rank()
    frame["positive_rank"] = frame["rank"] * frame["label"]
    per_user = frame.groupby("user").agg(
        impressions=("label", "size"),
        positives=("label", "sum"),
        positive_rank=("positive_rank", "sum"),
    )
    negatives = per_user["impressions"] - per_user["positives"]
    counted = per_user[(per_user["positives"] > 0) & (negatives > 0)]
    if counted.empty:
        return math.nan, 0
    positives = counted["positives"]
    auc = (counted["positive_rank"] - positives * (positives + 1) / 2) / (
        positives * (counted["impressions"] - positives)
    )
    weights = counted["impressions"]
    return float((auc * weights).sum() / weights.sum()), len(counted)


def finite_or_none(value: float) -> float | None:
    """JSON has no NaN: an undefined metric is written as null."""
    return None if value is None or not math.isfinite(value) else float(value)


def ranking_metrics(users: np.ndarray, labels: np.ndarray, probabilities: np.ndarray) -> dict:
    """AUC, GAUC and logloss of one slice of samples (null where undefined)."""
    labels = np.asarray(labels)
    if not len(labels):
        return {
            "samples": 0,
            "positives": 0,
            "auc": None,
            "gauc": None,
            "gauc_users": 0,
            "logloss": None,
        }
    auc_and_logloss = score(labels, probabilities)
    gauc, gauc_users = group_auc(users, labels, probabilities)
    return {
        "samples": len(labels),
        "positives": int(labels.sum()),
        "auc": finite_or_none(auc_and_logloss["auc"]),
        "gauc": finite_or_none(gauc),
        "gauc_users": gauc_users,
        "logloss": auc_and_logloss["logloss"],
    }


# Buckets of the target item's training behaviours: (label, lowest count, highest count).
FREQUENCY_BUCKETS = (("0", 0, 0), ("1-4", 1, 4), ("5-19", 5, 19), ("20+", 20, math.inf))


def test_metrics(test_predictions: pd.DataFrame) -> dict:
    """Metrics on the test split, with the cold-start blend and without it, overall and per
    training-frequency bucket of the target item, and on the never-trained (cold) items."""

    def metrics(rows: pd.DataFrame, column: str) -> dict:
        return ranking_metrics(
            rows["user"].to_numpy(), rows["label"].to_numpy(), rows[column].to_numpy()
        )

    def both(rows: pd.DataFrame) -> dict:
        return {
            "with_blend": metrics(rows, "probability"),
            "without_blend": metrics(rows, "probability_without_blend"),
        }

    count = test_predictions["item_train_count"]
    buckets = {
        label: both(test_predictions[(count >= low) & (count <= high)])
        for label, low, high in FREQUENCY_BUCKETS
    }
    return {
        "test": metrics(test_predictions, "probability"),
        "test_without_blend": metrics(test_predictions, "probability_without_blend"),
        "by_item_frequency": buckets,
        "cold_items": metrics(test_predictions[test_predictions["cold_item"]], "probability"),
    }
