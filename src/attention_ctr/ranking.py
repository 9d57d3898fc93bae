"""The ranking protocol users judge a recommender by (plain numpy, no Kedro, no torch).

Each test user's held-out last behaviour is ranked against N items the user never had, drawn
`uniform`ly over the catalogue or by training `popularity`; the scores come from the served
model (see `attention_ctr.pipelines.evaluation.nodes.rank_test_users`). Metrics per user, then
averaged: hit rate HR@K, NDCG@K, reciprocal rank, and the AUC of the positive against the user's
candidates; the pooled AUC over every (user, candidate) pair beside them.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

HIT_CUTOFFS = (1, 5, 10)
NDCG_CUTOFFS = (5, 10)


def popularity_sampler(items: np.ndarray, counts: np.ndarray):
    """Draw from `items` in proportion to `counts` (items with count 0 are never drawn)."""
    cdf = np.cumsum(counts.astype(np.float64))
    if not len(cdf) or cdf[-1] <= 0:
        raise ValueError("popularity candidates need items with training behaviours")
    cdf /= cdf[-1]
    return lambda rng, size: items[
        np.minimum(np.searchsorted(cdf, rng.random(size), side="right"), len(items) - 1)
    ]


def uniform_sampler(items: np.ndarray):
    """Draw uniformly from `items`."""
    return lambda rng, size: items[rng.integers(0, len(items), size)]


def draw_distinct_unseen(
    users: np.ndarray,
    per_user: int,
    seen_keys: np.ndarray,
    stride: int,
    draw,
    rng: np.random.Generator,
    max_rounds: int,
) -> np.ndarray:
    """`[len(users), per_user]` items, distinct per user and never in `seen_keys` (sorted
    `user * stride + item`); 0 where none was found in `max_rounds` vectorised rounds."""
    result = np.zeros((len(users), per_user), dtype=np.int64)
    slot_user = np.repeat(np.asarray(users, dtype=np.int64), per_user)
    pending = np.arange(len(slot_user))
    taken = np.asarray(seen_keys, dtype=np.int64)
    for _ in range(max_rounds):
        if not len(pending):
            break
        candidates = draw(rng, len(pending)).astype(np.int64)
        keys = slot_user[pending] * stride + candidates
        hit = np.minimum(np.searchsorted(taken, keys), max(len(taken) - 1, 0))
        fresh = taken[hit] != keys if len(taken) else np.ones(len(keys), dtype=bool)
        _, first = np.unique(keys, return_index=True)  # one slot per repeated draw
        once = np.zeros(len(keys), dtype=bool)
        once[first] = True
        accepted = fresh & once
        result.reshape(-1)[pending[accepted]] = candidates[accepted]
        taken = np.union1d(taken, keys[accepted])
        pending = pending[~accepted]
    return result


def derangement(size: int, rng: np.random.Generator) -> np.ndarray:
    """A seeded permutation with no fixed point: position i takes index `result[i] != i`.

    A random cycle through all positions (shuffle, then each takes the next one's index).
    """
    if size < 2:
        raise ValueError(f"a history shuffle needs at least 2 users, got {size}")
    order = rng.permutation(size)
    result = np.empty(size, dtype=np.int64)
    result[order] = np.roll(order, -1)
    return result


def positive_ranks(groups: np.ndarray, labels: np.ndarray, scores: np.ndarray) -> pd.DataFrame:
    """Per group (one user's candidate list with one positive): the positive's rank (1 = top;
    ties count against it, so a constant model never hits) and its AUC against the group's
    negatives (ties one half)."""
    frame = pd.DataFrame(
        {"group": np.asarray(groups), "label": np.asarray(labels), "score": np.asarray(scores)}
    )
    positive = frame[frame["label"] == 1].set_index("group")["score"]
    if positive.index.duplicated().any():
        raise ValueError("each user's candidate list must hold exactly one positive")
    negatives = frame[frame["label"] == 0]
    reference = positive.reindex(negatives["group"]).to_numpy()
    counts = (
        pd.DataFrame(
            {
                "group": negatives["group"].to_numpy(),
                "above": negatives["score"].to_numpy() > reference,
                "tied": negatives["score"].to_numpy() == reference,
            }
        )
        .groupby("group")[["above", "tied"]]
        .sum()
    )
    counts = counts.reindex(positive.index, fill_value=0)
    listed = negatives.groupby("group").size().reindex(positive.index, fill_value=0)
    rank = 1 + counts["above"] + counts["tied"]
    auc = (listed - counts["above"] - 0.5 * counts["tied"]) / listed.where(listed > 0)
    return pd.DataFrame({"rank": rank.astype(np.int64), "negatives": listed, "auc": auc})


def ranking_quality(groups: np.ndarray, labels: np.ndarray, scores: np.ndarray) -> dict:
    """HR@{1,5,10}, NDCG@{5,10}, MRR, GAUC (mean per-user AUC) and pooled AUC."""
    ranks = positive_ranks(groups, labels, scores)
    rank = ranks["rank"].to_numpy(np.float64)
    result = {
        "users": len(ranks),
        "candidates_per_user": float(ranks["negatives"].mean() + 1) if len(ranks) else 0.0,
        "auc": float(roc_auc_score(labels, scores)) if len(np.unique(labels)) == 2 else None,
        "gauc": float(ranks["auc"].mean()) if len(ranks) else None,
        "mrr": float(np.mean(1.0 / rank)) if len(ranks) else None,
    }
    for cutoff in HIT_CUTOFFS:
        result[f"hr@{cutoff}"] = float(np.mean(rank <= cutoff)) if len(ranks) else None
    for cutoff in NDCG_CUTOFFS:
        gain = np.where(rank <= cutoff, 1.0 / np.log2(rank + 1.0), 0.0)
        result[f"ndcg@{cutoff}"] = float(np.mean(gain)) if len(ranks) else None
    return result
