"""Seeded candidate lists: the ranking protocol's and the explanations'.

Every candidate row shares its user's test-sample pointers into `events`, so it is scored for
the moment the test sample describes; seeded, so every model ranks the same lists.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from attention_ctr.ranking import (
    draw_distinct_unseen,
    popularity_sampler,
    uniform_sampler,
)
from attention_ctr.sequences import SAMPLE_COLUMNS

CANDIDATE_DISTRIBUTIONS = ("uniform", "popularity")


def ranking_candidates(
    test_samples: pd.DataFrame,
    events: pd.DataFrame,
    item_frequency: pd.DataFrame,
    distributions: list[str],
    per_user: int,
    seed: int,
    max_rounds: int,
) -> pd.DataFrame:
    """Each test user's held-out behaviour plus `per_user` distinct items the user never had,
    per distribution (`uniform` over all items, `popularity` by training behaviours)."""
    positives = test_samples[test_samples["label"] == 1].sort_values("user", kind="stable")
    items = item_frequency["item"].to_numpy(np.int64)
    stride = len(items) + 1
    seen = np.unique(events["user"].to_numpy(np.int64) * stride + events["item"].to_numpy())
    item_category = np.zeros(stride, dtype=np.int64)
    item_category[items] = item_frequency["category"].to_numpy()
    samplers = {
        "uniform": uniform_sampler(items),
        "popularity": popularity_sampler(items, item_frequency["train_count"].to_numpy()),
    }
    frames = []
    for distribution in distributions:
        rng = np.random.default_rng([seed, CANDIDATE_DISTRIBUTIONS.index(distribution)])
        drawn = draw_distinct_unseen(
            positives["user"].to_numpy(),
            per_user,
            seen,
            stride,
            samplers[distribution],
            rng,
            max_rounds,
        )
        lists = np.concatenate([positives["item"].to_numpy(np.int64)[:, None], drawn], axis=1)
        rows = positives.loc[positives.index.repeat(lists.shape[1])].reset_index(drop=True)
        rows["item"] = lists.reshape(-1)
        rows["category"] = item_category[rows["item"].to_numpy()]
        rows["label"] = (np.arange(len(rows)) % lists.shape[1] == 0).astype(np.int8)
        rows = rows[rows["item"] > 0]  # slots no unseen item was found for
        frames.append(rows[SAMPLE_COLUMNS].assign(distribution=distribution))
    return pd.concat(frames, ignore_index=True)


def explanation_candidates(
    test_samples: pd.DataFrame, item_ids: pd.DataFrame, users: int, per_user: int, seed: int
) -> pd.DataFrame:
    """Candidate samples for `users` seeded users: their test item plus `per_user - 1`
    distinct sampled items (never the test item)."""
    positives = test_samples[test_samples["label"] == 1]
    rng = np.random.default_rng(seed)
    n_users = min(users, len(positives))
    chosen = positives.iloc[np.sort(rng.choice(len(positives), n_users, replace=False))]
    n_items = len(item_ids)
    sampled_count = min(per_user - 1, n_items - 1)
    if sampled_count < 0:
        raise ValueError("Parameter evaluation.explanations.candidates must be at least 1")
    target = chosen["item"].to_numpy(np.int64)
    # Codes 1 .. n_items - 1 without repeats, shifted past the target: never the target itself.
    drawn = np.stack(
        [rng.choice(n_items - 1, sampled_count, replace=False) + 1 for _ in range(n_users)]
    ).reshape(n_users, sampled_count)
    items = np.concatenate([target[:, None], drawn + (drawn >= target[:, None])], axis=1)
    item_category = np.zeros(n_items + 1, dtype=np.int64)
    item_category[item_ids["item"].to_numpy()] = item_ids["category"].to_numpy()
    candidates = chosen.loc[chosen.index.repeat(items.shape[1])].reset_index(drop=True)
    candidates["item"] = items.reshape(-1)
    candidates["category"] = item_category[candidates["item"].to_numpy()]
    candidates["label"] = (np.arange(len(candidates)) % items.shape[1] == 0).astype(np.int8)
    return candidates[SAMPLE_COLUMNS]
