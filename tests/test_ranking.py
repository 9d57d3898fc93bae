"""The ranking protocol's parts: candidate draws, the history shuffle, the metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest

from attention_ctr.ranking import (
    derangement,
    draw_distinct_unseen,
    popularity_sampler,
    ranking_quality,
    uniform_sampler,
)


def test_a_planted_ranking_gets_known_hit_rates_and_ndcg():
    # three users, four candidates each; the positive is ranked 1st, 3rd and 4th (last)
    groups = np.repeat([10, 11, 12], 4)
    labels = np.array([1, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1])
    scores = np.array([0.9, 0.1, 0.2, 0.3, 0.8, 0.7, 0.6, 0.1, 0.9, 0.8, 0.7, 0.2])
    quality = ranking_quality(groups, labels, scores)
    ranks = np.array([1, 3, 4])
    assert quality["users"] == 3 and quality["candidates_per_user"] == 4
    assert quality["hr@1"] == pytest.approx(1 / 3)
    assert quality["hr@5"] == pytest.approx(1.0)
    assert quality["mrr"] == pytest.approx(np.mean(1 / ranks))
    assert quality["ndcg@5"] == pytest.approx(np.mean(1 / np.log2(ranks + 1)))
    # per-user AUC: 3/3, 1/3, 0/3
    assert quality["gauc"] == pytest.approx((1 + 1 / 3 + 0) / 3)


def test_ties_count_against_the_positive():
    groups = np.repeat([1, 2], 3)
    labels = np.array([1, 0, 0, 1, 0, 0])
    quality = ranking_quality(groups, labels, np.full(6, 0.5))
    assert quality["hr@1"] == 0 and quality["hr@5"] == 1
    assert quality["mrr"] == pytest.approx(1 / 3)
    assert quality["gauc"] == pytest.approx(0.5) and quality["auc"] == pytest.approx(0.5)


def test_two_positives_in_one_list_are_refused():
    with pytest.raises(ValueError, match="exactly one positive"):
        ranking_quality(np.array([1, 1, 1]), np.array([1, 1, 0]), np.array([0.1, 0.2, 0.3]))


@pytest.mark.parametrize("size", [2, 3, 10, 1001])
def test_the_history_shuffle_is_a_seeded_derangement(size):
    first = derangement(size, np.random.default_rng(3))
    assert sorted(first) == list(range(size))
    assert not (first == np.arange(size)).any()
    np.testing.assert_array_equal(first, derangement(size, np.random.default_rng(3)))
    with pytest.raises(ValueError, match="at least 2 users"):
        derangement(1, np.random.default_rng(0))


@pytest.mark.parametrize("kind", ["uniform", "popularity"])
def test_candidates_are_distinct_and_never_the_users_own_items(kind):
    rng = np.random.default_rng(0)
    n_items, stride = 50, 51
    items = np.arange(1, n_items + 1)
    counts = rng.integers(0, 20, n_items)
    users = np.arange(1, 31)
    own = {(u, i) for u in users for i in rng.choice(items, 10, replace=False)}
    seen = np.unique([u * stride + i for u, i in own])
    draw = uniform_sampler(items) if kind == "uniform" else popularity_sampler(items, counts)
    drawn = draw_distinct_unseen(users, 15, seen, stride, draw, np.random.default_rng(1), 200)
    assert drawn.shape == (30, 15) and (drawn > 0).all()
    for user, row in zip(users, drawn):
        assert len(set(row)) == 15
        assert not any((user, item) in own for item in row)
        if kind == "popularity":
            assert (counts[row - 1] > 0).all()
    again = draw_distinct_unseen(users, 15, seen, stride, draw, np.random.default_rng(1), 200)
    np.testing.assert_array_equal(drawn, again)


def test_slots_without_an_unseen_item_stay_empty():
    items = np.arange(1, 4)
    seen = np.array([1 * 4 + 1, 1 * 4 + 2])  # user 1 had items 1 and 2: only 3 is left
    drawn = draw_distinct_unseen(
        np.array([1]), 2, seen, 4, uniform_sampler(items), np.random.default_rng(0), 50
    )
    assert sorted(drawn[0]) == [0, 3]
    assert math.isclose(ranking_quality(np.ones(2), np.array([1, 0]), np.array([1, 0]))["auc"], 1)
