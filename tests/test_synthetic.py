"""The seeded synthetic generator: determinism, shape, and the planted multi-interest structure."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from attention_ctr.synthetic import LOG_COLUMNS, SyntheticLogConfig, generate_behavior_logs

SMALL = {"users": 150, "items": 600, "categories": 12, "events": 6000}


def generate(**overrides) -> pd.DataFrame:
    return generate_behavior_logs(SyntheticLogConfig.from_params({**SMALL, **overrides}))


def previous_k(values: np.ndarray, users: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(matches: value equals one of the same user's k previous values, rows with k previous)."""
    n = len(values)
    has_history = np.ones(n, dtype=bool)
    has_history[:k] = False
    hit = np.zeros(n, dtype=bool)
    for lag in range(1, k + 1):
        has_history[lag:] &= users[lag:] == users[:-lag]
        hit[lag:] |= values[lag:] == values[:-lag]
    return hit, has_history


def test_same_seed_same_frame_different_seed_different():
    first = generate(seed=3)
    pd.testing.assert_frame_equal(first, generate(seed=3))
    other = generate(seed=4)
    assert not first.equals(other)
    assert not np.array_equal(first["item_id"].to_numpy(), other["item_id"].to_numpy())


def test_shape_counts_and_time_order():
    events = generate(seed=11, min_events_per_user=7)
    assert list(events.columns) == LOG_COLUMNS
    assert len(events) == SMALL["events"]
    per_user = events.groupby("user_id", sort=False).size()
    assert len(per_user) == SMALL["users"]
    assert per_user.sum() == SMALL["events"]
    assert per_user.min() >= 7
    assert events["item_id"].nunique() <= SMALL["items"]
    assert events["category_id"].nunique() <= SMALL["categories"]
    assert set(events["behavior"].astype(str)) == {"pv", "cart", "fav", "buy"}
    assert (events[["user_id", "item_id", "category_id"]] > 0).all().all()

    users = events["user_id"].to_numpy()
    assert (np.diff(users) != 0).sum() == SMALL["users"] - 1, "each user's rows are contiguous"
    same_user = users[1:] == users[:-1]
    assert (np.diff(events["timestamp"].to_numpy())[same_user] >= 0).all()
    start = pd.Timestamp("2017-11-25", tz="UTC").timestamp()
    assert events["timestamp"].min() >= start
    assert events["timestamp"].max() <= start + 9 * 86_400

    # An item belongs to exactly one category, as in Taobao.
    assert (events.groupby("item_id")["category_id"].nunique() == 1).all()


def test_behaviour_mix_follows_the_parameter():
    events = generate(seed=5, behavior_mix={"pv": 0.5, "buy": 0.5})
    share = events["behavior"].astype(str).value_counts(normalize=True)
    assert set(share.index) == {"pv", "buy"}
    assert abs(share["pv"] - 0.5) < 0.05


@pytest.mark.parametrize("seed", [0, 42])
def test_recent_behaviours_predict_the_next_one(seed):
    """The planted signal: the next behaviour follows the user's recent, matching interest."""
    events = generate(seed=seed)
    users = events["user_id"].to_numpy()
    categories = events["category_id"].to_numpy()
    items = events["item_id"].to_numpy()
    k = 5

    # Category: recent behaviours name the next category far more often than chance would.
    hit, rows = previous_k(categories, users, k)
    share = events["category_id"].value_counts(normalize=True)
    chance = 1 - (1 - share.reindex(categories).to_numpy()) ** k
    assert hit[rows].mean() > 0.8
    assert hit[rows].mean() > chance[rows].mean() + 0.25

    # Item: within an interest the user walks through neighbouring items, revisiting some.
    item_hit, _ = previous_k(items, users, k)
    item_share = events["item_id"].value_counts(normalize=True)
    item_chance = 1 - (1 - item_share.reindex(items).to_numpy()) ** k
    assert item_hit[rows].mean() > 10 * item_chance[rows].mean()

    # Recency matters: late in a history, the last 5 behaviours beat the user's first 5.
    position = events.groupby("user_id", sort=False).cumcount().to_numpy()
    first_row = np.flatnonzero(position == 0)[np.cumsum(position == 0) - 1]
    first_hit = np.zeros(len(events), dtype=bool)
    for offset in range(k):
        first_hit |= categories == categories[first_row + offset]
    late = rows & (position >= 30)
    assert late.sum() > 500
    assert hit[late].mean() > first_hit[late].mean() + 0.2


@pytest.mark.parametrize(
    ("params", "named"),
    [
        ({"userz": 10}, "userz"),
        ({"events": 100, "users": 50, "min_events_per_user": 5}, "events"),
        ({"items": 5, "categories": 10}, "items"),
        ({"min_interests": 3, "max_interests": 2}, "min_interests"),
        ({"drift_prob": 1.5}, "drift_prob"),
        ({"behavior_mix": {"pv": 1.0, "click": 0.5}}, "click"),
        ({"behavior_mix": {"pv": -1.0}}, "behavior_mix"),
        ({"min_events_per_user": 0}, "min_events_per_user"),
    ],
    ids=[
        "unknown-key",
        "too-few-events",
        "items<categories",
        "interests",
        "prob",
        "mix-key",
        "mix-negative",
        "min-events",
    ],
)
def test_invalid_parameters_raise_naming_the_parameter(params, named):
    with pytest.raises(ValueError, match=named):
        SyntheticLogConfig.from_params({**SMALL, **params})
