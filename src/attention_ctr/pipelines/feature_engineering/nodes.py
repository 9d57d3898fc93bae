"""Feature engineering: ids, time-ordered sequences, leak-free samples, negatives, cold start.

All steps are vectorised over events; per-user quantities come from run boundaries of the
(user, time)-sorted event arrays, never from a loop over users.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from attention_ctr.errors import InputError
from attention_ctr.ranking import popularity_sampler, uniform_sampler
from attention_ctr.sequences import SAMPLE_COLUMNS

logger = logging.getLogger(__name__)

TRAIN, VALIDATION, TEST = 0, 1, 2


def _codes(values: pd.Series) -> tuple[np.ndarray, pd.Index]:
    """Contiguous codes from 1 in sorted raw-id order; 0 stays free for padding/unknown."""
    codes, uniques = pd.factorize(values, sort=True)
    return (codes + 1).astype(np.int32), uniques


def _time_order(user: np.ndarray, timestamp: np.ndarray) -> np.ndarray:
    """Stable order by (user, timestamp): ties keep the log's order."""
    span = int(timestamp.max()) - int(timestamp.min()) if len(timestamp) else 0
    if span < 2**32 and int(user.max(initial=0)) < 2**31:
        key = (user.astype(np.int64) << 32) | (timestamp - timestamp.min())
        return np.argsort(key, kind="stable")
    return np.lexsort((timestamp, user))


def encode_interactions(
    interactions: pd.DataFrame,
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Encode ids contiguously (0 = padding/unknown) and sort behaviours by user, then time."""
    user, user_raw = _codes(interactions["user_id"])
    item, item_raw = _codes(interactions["item_id"])
    category, category_raw = _codes(interactions["category_id"])
    behavior_values = interactions["behavior"]
    if not isinstance(behavior_values.dtype, pd.CategoricalDtype):
        behavior_values = behavior_values.astype("category")
    behavior = (behavior_values.cat.codes.to_numpy() + 1).astype(np.int8)
    timestamp = interactions["timestamp"].to_numpy(dtype=np.int64)

    order = _time_order(user, timestamp)
    events = pd.DataFrame(
        {
            "user": user[order],
            "item": item[order],
            "category": category[order],
            "behavior": behavior[order],
            "timestamp": timestamp[order],
        }
    )
    # An item's category is the one of its first logged behaviour (real logs have a few conflicts).
    _, first = np.unique(events["item"].to_numpy(), return_index=True)
    item_ids = pd.DataFrame(
        {
            "raw_id": np.asarray(item_raw),
            "item": np.arange(1, len(item_raw) + 1, dtype=np.int32),
            "category": events["category"].to_numpy()[first],
        }
    )
    user_ids = pd.DataFrame(
        {"raw_id": np.asarray(user_raw), "user": np.arange(1, len(user_raw) + 1, dtype=np.int32)}
    )
    category_ids = pd.DataFrame(
        {
            "raw_id": np.asarray(category_raw),
            "category": np.arange(1, len(category_raw) + 1, dtype=np.int32),
        }
    )
    behavior_ids = pd.DataFrame(
        {
            "behavior": [str(b) for b in behavior_values.cat.categories],
            "code": np.arange(1, len(behavior_values.cat.categories) + 1, dtype=np.int8),
        }
    )
    return events, user_ids, item_ids, category_ids, behavior_ids


def _user_positions(user: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For user-sorted events: (position within user, user's event count, user's first index)."""
    starts = np.empty(len(user), dtype=bool)
    starts[:1] = True
    np.not_equal(user[1:], user[:-1], out=starts[1:])
    start_index = np.flatnonzero(starts)
    counts = np.diff(np.append(start_index, len(user)))
    first = np.repeat(start_index, counts)
    return np.arange(len(user)) - first, np.repeat(counts, counts), first


def _split_roles(events: pd.DataFrame, min_user_events: int) -> np.ndarray:
    """Per event: TRAIN, VALIDATION (user's second-to-last), TEST (last), -1 (user too short)."""
    position, count, _ = _user_positions(events["user"].to_numpy())
    role = np.full(len(events), TRAIN, dtype=np.int8)
    role[position == count - 2] = VALIDATION
    role[position == count - 1] = TEST
    role[count < min_user_events] = -1
    if len(role) and not (role >= 0).any():
        # Fail here, naming the parameter: later nodes would fail on empty tables instead.
        raise InputError(
            f"Parameter feature_engineering.min_user_events is {min_user_events}, but no user "
            f"has that many behaviours: {len(np.unique(events['user']))} users, at most "
            f"{int(count.max())} behaviours each; lower min_user_events or ingest more events"
        )
    return role


def build_positive_samples(events: pd.DataFrame, params: dict) -> pd.DataFrame:
    """One positive sample per behaviour with its leak-free history window and split.

    The history of a behaviour at time t is the user's behaviours strictly before t (ties at t
    are excluded), the most recent `max_history` of them.
    """
    user = events["user"].to_numpy()
    timestamp = events["timestamp"].to_numpy()
    _, _, user_first = _user_positions(user)
    new_run = np.empty(len(events), dtype=bool)
    new_run[:1] = True
    new_run[1:] = (user[1:] != user[:-1]) | (timestamp[1:] != timestamp[:-1])
    run_first = np.maximum.accumulate(np.where(new_run, np.arange(len(events)), 0))
    hist_len = np.minimum(run_first - user_first, int(params["max_history"]))

    min_user_events = int(params["min_user_events"])
    role = _split_roles(events, min_user_events)
    keep = (role >= 0) & (hist_len > 0)
    if len(events) and not (keep & (role == TRAIN)).any():
        users = len(np.unique(user[role >= 0]))
        raise InputError(
            f"No training sample: the {users} users with at least min_user_events="
            f"{min_user_events} behaviours have none before their validation and test ones "
            "(each needs 3 behaviours at distinct times); raise "
            "feature_engineering.min_user_events to 3 or more, or ingest more events"
        )
    return pd.DataFrame(
        {
            "user": user[keep],
            "item": events["item"].to_numpy()[keep],
            "category": events["category"].to_numpy()[keep],
            "label": np.ones(int(keep.sum()), dtype=np.int8),
            "timestamp": timestamp[keep],
            "hist_end": run_first[keep].astype(np.int64),
            "hist_len": hist_len[keep].astype(np.int32),
            "split": role[keep],
        }
    )


def count_item_frequency(
    events: pd.DataFrame, item_ids: pd.DataFrame, params: dict
) -> pd.DataFrame:
    """Training interactions per item (validation and test behaviours are not counted)."""
    role = _split_roles(events, int(params["min_user_events"]))
    counts = np.bincount(events["item"].to_numpy()[role == TRAIN], minlength=len(item_ids) + 1)[1:]
    return pd.DataFrame(
        {
            "item": item_ids["item"].to_numpy(),
            "category": item_ids["category"].to_numpy(),
            "train_count": counts.astype(np.int64),
        }
    )


def _sampler(item_frequency: pd.DataFrame, sampling: dict):
    """Draw encoded item ids uniformly, by training frequency, or a mix of the two.

    `mixed` draws each negative by popularity with probability `popularity_share`, else
    uniformly: uniform negatives teach what an item is worth by itself, popularity negatives
    what this user prefers among items that are often chosen.
    """
    distribution = sampling["distribution"]
    items = item_frequency["item"].to_numpy()
    counts = item_frequency["train_count"].to_numpy()
    if distribution == "uniform":
        return uniform_sampler(items)
    if distribution not in ("popularity", "mixed"):
        raise ValueError(
            f"Parameter feature_engineering.negative_sampling.distribution is {distribution!r}; "
            "expected 'uniform', 'popularity' or 'mixed'"
        )
    if counts.sum() <= 0:
        raise ValueError(
            f"negative_sampling.distribution {distribution!r} needs items with training "
            "behaviours, and there are none"
        )
    popular = popularity_sampler(items, counts)
    if distribution == "popularity":
        return popular
    share = float(sampling.get("popularity_share", 0.5))
    if not 0.0 <= share <= 1.0:
        raise ValueError(
            f"Parameter feature_engineering.negative_sampling.popularity_share is {share}; "
            "expected a share between 0 and 1"
        )
    uniform = uniform_sampler(items)
    return lambda rng, size: np.where(
        rng.random(size) < share, popular(rng, size), uniform(rng, size)
    )


def _draw_unseen(
    users: np.ndarray,
    seen_keys: np.ndarray,
    n_items: int,
    draw,
    rng: np.random.Generator,
    max_rounds: int,
) -> np.ndarray:
    """For each user, an item the user never interacted with (0 where none was found).

    Rejection sampling in vectorised rounds: only the rejected draws are drawn again.
    """
    result = np.zeros(len(users), dtype=np.int32)
    pending = np.arange(len(users))
    stride = np.int64(n_items + 1)
    for _ in range(max_rounds):
        if not len(pending):
            break
        candidates = draw(rng, len(pending))
        keys = users[pending].astype(np.int64) * stride + candidates
        hit = np.searchsorted(seen_keys, keys)
        seen = seen_keys[np.minimum(hit, len(seen_keys) - 1)] == keys
        result[pending[~seen]] = candidates[~seen]
        pending = pending[seen]
    return result


def index_user_items(events: pd.DataFrame, item_ids: pd.DataFrame) -> np.ndarray:
    """Sorted unique `user * (n_items + 1) + item` keys of every behaviour in the log."""
    keys = events["user"].to_numpy(np.int64) * (len(item_ids) + 1) + events["item"].to_numpy()
    return np.unique(keys)


def add_negative_history(
    events: pd.DataFrame,
    user_item_keys: np.ndarray,
    item_frequency: pd.DataFrame,
    params: dict,
) -> pd.DataFrame:
    """DIEN's negative history: beside each behaviour, an item that user never touched."""
    sampling = params["negative_sampling"]
    rng = np.random.default_rng([int(sampling["seed"]), 1])
    negative = _draw_unseen(
        events["user"].to_numpy(),
        user_item_keys,
        len(item_frequency),
        _sampler(item_frequency, sampling),
        rng,
        int(sampling["max_rounds"]),
    )
    item_category = np.concatenate([[0], item_frequency["category"].to_numpy()])
    return events.assign(neg_item=negative, neg_category=item_category[negative].astype(np.int32))


def assemble_samples(
    positives: pd.DataFrame,
    user_item_keys: np.ndarray,
    item_frequency: pd.DataFrame,
    params: dict,
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Train, validation and test samples: each positive followed by its `ratio` negatives."""
    sampling = params["negative_sampling"]
    ratio = int(sampling["ratio"])
    if ratio < 0:
        raise ValueError(f"negative_sampling.ratio must be >= 0, got {ratio}")
    rng = np.random.default_rng([int(sampling["seed"]), 2])
    source = np.repeat(np.arange(len(positives)), ratio)
    negative_item = _draw_unseen(
        positives["user"].to_numpy()[source],
        user_item_keys,
        len(item_frequency),
        _sampler(item_frequency, sampling),
        rng,
        int(sampling["max_rounds"]),
    )
    found = negative_item > 0
    item_category = np.concatenate([[0], item_frequency["category"].to_numpy()])

    # Interleave without a sort: row r of the output is slot r of positive-then-negatives blocks.
    n_positive = len(positives)
    slot_of = np.full(n_positive * (ratio + 1), -1, dtype=np.int64)
    slot_of[np.arange(n_positive) * (ratio + 1)] = np.arange(n_positive)
    negative_slots = source * (ratio + 1) + 1 + np.tile(np.arange(ratio), n_positive)
    slot_of[negative_slots[found]] = n_positive + np.arange(int(found.sum()))
    order = slot_of[slot_of >= 0]

    negative_source = source[found]
    columns = {
        name: np.concatenate(
            [positives[name].to_numpy(), positives[name].to_numpy()[negative_source]]
        )[order]
        for name in ("user", "timestamp", "hist_end", "hist_len", "split")
    }
    columns["item"] = np.concatenate([positives["item"].to_numpy(), negative_item[found]])[order]
    columns["category"] = np.concatenate(
        [positives["category"].to_numpy(), item_category[negative_item[found]].astype(np.int32)]
    )[order]
    columns["label"] = np.concatenate(
        [np.ones(n_positive, dtype=np.int8), np.zeros(int(found.sum()), dtype=np.int8)]
    )[order]
    split = columns.pop("split")
    return tuple(
        pd.DataFrame({name: columns[name][split == role] for name in SAMPLE_COLUMNS})
        for role in (TRAIN, VALIDATION, TEST)
    )


def build_cold_start_tables(
    item_frequency: pd.DataFrame, train_samples: pd.DataFrame
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Items training never saw, and each category's frequency-weighted averaging weights.

    An item is cold when it is in no training sample (neither a behaviour nor a sampled
    negative): its embedding row is still its random initialisation, so it takes its category's
    average over the items with training behaviours, weighted by their counts (a category's
    weights sum to 1). Rare items that training did see keep their own rows; training blends
    them toward the average only as far as validation says it helps (`cold_start.blend_grid`).
    """
    count = item_frequency["train_count"].to_numpy()
    seen = np.isin(item_frequency["item"].to_numpy(), train_samples["item"].to_numpy()) | (
        count > 0
    )
    cold = item_frequency.loc[~seen, ["item", "category", "train_count"]]
    warm = item_frequency.loc[count > 0, ["category", "item", "train_count"]]
    totals = warm.groupby("category")["train_count"].transform("sum")
    weights = pd.DataFrame(
        {
            "category": warm["category"].to_numpy(),
            "item": warm["item"].to_numpy(),
            "weight": (warm["train_count"] / totals).to_numpy(),
        }
    ).sort_values(["category", "item"], ignore_index=True)
    return cold.reset_index(drop=True), weights


def describe_features(
    events: pd.DataFrame,
    item_ids: pd.DataFrame,
    category_ids: pd.DataFrame,
    behavior_ids: pd.DataFrame,
    train: pd.DataFrame,
    validation: pd.DataFrame,
    test: pd.DataFrame,
    cold_start_items: pd.DataFrame,
    cold_start_weights: pd.DataFrame,
    params: dict,
) -> tuple[dict, dict]:
    """The feature spec models are built from, and a report of what feature engineering did."""
    edges = [int(e) for e in params["time_gap_edges"]]
    if edges != sorted(set(edges)):
        raise ValueError("Parameter feature_engineering.time_gap_edges must be strictly increasing")
    spec = {
        "n_users": int(events["user"].max()),
        "n_items": len(item_ids),
        "n_categories": len(category_ids),
        "n_behaviors": len(behavior_ids),
        "behaviors": behavior_ids["behavior"].tolist(),
        "max_history": int(params["max_history"]),
        "time_gap_edges": edges,
        "n_time_gap_buckets": len(edges) + 2,  # 0 padding, then one more than the edges
        "padding_id": 0,
    }
    role = _split_roles(events, int(params["min_user_events"]))
    users_dropped = np.unique(events["user"].to_numpy()[role < 0])

    def split_counts(samples: pd.DataFrame) -> dict:
        positives = int(samples["label"].sum())
        return {"positives": positives, "negatives": len(samples) - positives}

    ratio = int(params["negative_sampling"]["ratio"])
    positives = sum(int(s["label"].sum()) for s in (train, validation, test))
    negatives = len(train) + len(validation) + len(test) - positives
    cold_categories = set(cold_start_items["category"]) - set(cold_start_weights["category"])
    report = {
        "events": len(events),
        "users": int(events["user"].nunique()),
        "users_dropped_too_few_events": len(users_dropped),
        "events_of_dropped_users": int((role < 0).sum()),
        "behaviours_without_history": int((role >= 0).sum()) - positives,
        "samples": {
            "train": split_counts(train),
            "validation": split_counts(validation),
            "test": split_counts(test),
        },
        "negatives_not_found": positives * ratio - negatives,
        "negative_history_not_found": int((events["neg_item"] == 0).sum()),
        "cold_start": {
            "cold_items_never_in_training": len(cold_start_items),
            "items_with_training_behaviours": len(cold_start_weights),
            "cold_categories_without_warm_items": len(cold_categories),
        },
        "mean_history_length": {
            name: float(s["hist_len"].mean()) if len(s) else 0.0
            for name, s in (("train", train), ("validation", validation), ("test", test))
        },
    }
    logger.info(
        "Features: %d events, %d users (%d dropped), train/val/test samples %d/%d/%d, %d cold",
        report["events"],
        report["users"],
        report["users_dropped_too_few_events"],
        len(train),
        len(validation),
        len(test),
        len(cold_start_items),
    )
    return spec, report
