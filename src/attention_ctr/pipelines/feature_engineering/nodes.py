"""Feature engineering: ids, time-ordered sequences, leak-free samples, negatives, cold start.

All steps are vectorised over events; per-user quantities come from run boundaries of the
(user, time)-sorted event arrays, never from a loop over users.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from attention_ctr.errors import InputError
from attention_ctr.pipelines.feature_engineering import spark_nodes
from attention_ctr.pipelines.feature_engineering.spark_nodes import is_spark
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


def behavior_table(behaviors: list[str]) -> pd.DataFrame:
    """Behaviour codes from 1 in the order of parameter ingestion.validation.behaviors."""
    return pd.DataFrame(
        {
            "behavior": [str(b) for b in behaviors],
            "code": np.arange(1, len(behaviors) + 1, dtype=np.int8),
        }
    )


def encode_interactions(
    interactions: pd.DataFrame, behaviors: list[str]
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Encode ids contiguously (0 = padding/unknown) and sort behaviours by user, then time."""
    if is_spark(interactions):
        return spark_nodes.encode_interactions(interactions, behaviors)
    user, user_raw = _codes(interactions["user_id"])
    item, item_raw = _codes(interactions["item_id"])
    category, category_raw = _codes(interactions["category_id"])
    values = interactions["behavior"]
    if not isinstance(values.dtype, pd.CategoricalDtype):
        values = values.astype("category")  # few distinct values: recode them, not the rows
    behavior = values.cat.set_categories([str(b) for b in behaviors]).cat.codes.to_numpy()
    if (behavior < 0).any():
        raise InputError(
            "interactions hold a behaviour outside parameter ingestion.validation.behaviors "
            f"{list(behaviors)}"
        )
    behavior = (behavior + 1).astype(np.int8)
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
    return events, user_ids, item_ids, category_ids, behavior_table(behaviors)


def _user_positions(user: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For user-sorted events: (position within user, user's event count, user's first index)."""
    starts = np.empty(len(user), dtype=bool)
    starts[:1] = True
    np.not_equal(user[1:], user[:-1], out=starts[1:])
    start_index = np.flatnonzero(starts)
    counts = np.diff(np.append(start_index, len(user)))
    first = np.repeat(start_index, counts)
    return np.arange(len(user)) - first, np.repeat(counts, counts), first


def _roles(user: np.ndarray, min_user_events: int) -> np.ndarray:
    """Per event: TRAIN, VALIDATION (user's second-to-last), TEST (last), -1 (user too short)."""
    position, count, _ = _user_positions(user)
    role = np.full(len(user), TRAIN, dtype=np.int8)
    role[position == count - 2] = VALIDATION
    role[position == count - 1] = TEST
    role[count < min_user_events] = -1
    return role


def behaviour_samples(events: pd.DataFrame, params: dict, first_row: int = 0) -> pd.DataFrame:
    """Every behaviour of whole, (user, time)-sorted users with its sample columns.

    The history of a behaviour at time t is the user's behaviours strictly before t (ties at t
    are excluded), the most recent `max_history` of them: it ends at `hist_end`, the global row
    (`first_row` + position here) of the first behaviour at t. `split` is the behaviour's role
    (-1: its user has fewer than `min_user_events`); `keep` marks those that become samples.
    """
    user = events["user"].to_numpy()
    timestamp = events["timestamp"].to_numpy()
    _, _, user_first = _user_positions(user)
    new_run = np.empty(len(events), dtype=bool)
    new_run[:1] = True
    new_run[1:] = (user[1:] != user[:-1]) | (timestamp[1:] != timestamp[:-1])
    run_first = np.maximum.accumulate(np.where(new_run, np.arange(len(events)), 0))
    hist_len = np.minimum(run_first - user_first, int(params["max_history"]))
    role = _roles(user, int(params["min_user_events"]))
    return pd.DataFrame(
        {
            "user": user,
            "item": events["item"].to_numpy(),
            "category": events["category"].to_numpy(),
            "timestamp": timestamp,
            "hist_end": (run_first + first_row).astype(np.int64),
            "hist_len": hist_len.astype(np.int32),
            "split": role,
            "keep": (role >= 0) & (hist_len > 0),
        }
    )


def check_samples(
    min_user_events: int, users: int, max_user_events: int, eligible_users: int, train: int
) -> None:
    """Fail here, naming the parameter, when the log yields no user or no training sample:
    later nodes would fail on empty tables instead."""
    if users and not eligible_users:
        raise InputError(
            f"Parameter feature_engineering.min_user_events is {min_user_events}, but no user "
            f"has that many behaviours: {users} users, at most {max_user_events} behaviours "
            "each; lower min_user_events or ingest more events"
        )
    if users and not train:
        raise InputError(
            f"No training sample: the {eligible_users} users with at least min_user_events="
            f"{min_user_events} behaviours have none before their validation and test ones "
            "(each needs 3 behaviours at distinct times); raise "
            "feature_engineering.min_user_events to 3 or more, or ingest more events"
        )


def build_positive_samples(events: pd.DataFrame, params: dict) -> pd.DataFrame:
    """Every behaviour with its leak-free history window and split (`behaviour_samples`);
    those marked `keep` become positive samples."""
    if is_spark(events):
        return spark_nodes.build_positive_samples(events, params)
    samples = behaviour_samples(events, params)
    user = samples["user"].to_numpy()
    counts = np.bincount(user)
    eligible = samples["split"].to_numpy() >= 0
    check_samples(
        int(params["min_user_events"]),
        users=int((counts > 0).sum()),
        max_user_events=int(counts.max(initial=0)),
        eligible_users=len(np.unique(user[eligible])),
        train=int((samples["keep"] & (samples["split"] == TRAIN)).sum()),
    )
    return samples


def count_item_frequency(positives: pd.DataFrame, item_ids: pd.DataFrame) -> pd.DataFrame:
    """Training interactions per item (validation and test behaviours are not counted)."""
    if is_spark(positives):
        return spark_nodes.count_item_frequency(positives, item_ids)
    train = positives["split"].to_numpy() == TRAIN
    counts = np.bincount(positives["item"].to_numpy()[train], minlength=len(item_ids) + 1)[1:]
    return item_frequency_table(item_ids, counts)


def item_frequency_table(item_ids: pd.DataFrame, counts: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "item": item_ids["item"].to_numpy(),
            "category": item_ids["category"].to_numpy(),
            "train_count": counts.astype(np.int64),
        }
    )


def _sampler(item_frequency: pd.DataFrame, sampling: dict):
    """`pick(u, choice)`: encoded item ids drawn uniformly, by training frequency, or a mix of
    the two, from uniform numbers `u` (which item) and, for `mixed` only, `choice()` (which
    distribution).

    `mixed` draws each negative by popularity with probability `popularity_share`, else
    uniformly: uniform negatives teach what an item is worth by itself, popularity negatives
    what this user prefers among items that are often chosen.
    """
    distribution = sampling["distribution"]
    items = item_frequency["item"].to_numpy()
    counts = item_frequency["train_count"].to_numpy()

    def uniform(u):
        return items[np.minimum((u * len(items)).astype(np.int64), len(items) - 1)]

    if distribution == "uniform":
        return lambda u, choice: uniform(u)
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
    cdf = np.cumsum(counts.astype(np.float64))
    cdf /= cdf[-1]

    def popular(u):  # items with count 0 are never drawn
        return items[np.minimum(np.searchsorted(cdf, u, side="right"), len(items) - 1)]

    if distribution == "popularity":
        return lambda u, choice: popular(u)
    share = float(sampling.get("popularity_share", 0.5))
    if not 0.0 <= share <= 1.0:
        raise ValueError(
            f"Parameter feature_engineering.negative_sampling.popularity_share is {share}; "
            "expected a share between 0 and 1"
        )
    return lambda u, choice: np.where(choice() < share, popular(u), uniform(u))


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijection of uint64 whose outputs look independent."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def counter_uniforms(counters: np.ndarray, *stream: int) -> np.ndarray:
    """Uniform numbers in [0, 1), one per counter, that depend only on (stream, counter).

    A counter-based generator: a draw is a function of its own key, not of the draws before
    it, so any partition of the rows (one pandas process, many Spark tasks) gets the same
    numbers.
    """
    key = np.zeros(1, dtype=np.uint64)
    for part in stream:
        key = _mix(key * _GOLDEN + np.uint64(part))
    bits = _mix(np.asarray(counters, dtype=np.int64).astype(np.uint64) * _GOLDEN + key)
    return (bits >> np.uint64(11)).astype(np.float64) * 2.0**-53


def user_item_keys(user: np.ndarray, item: np.ndarray, n_items: int) -> np.ndarray:
    """Sorted unique `user * (n_items + 1) + item` keys of the given behaviours."""
    return np.unique(user.astype(np.int64) * (n_items + 1) + item)


def draw_unseen(
    users: np.ndarray,
    counters: np.ndarray,
    seen_keys: np.ndarray,
    n_items: int,
    pick,
    stream: tuple[int, ...],
    max_rounds: int,
) -> np.ndarray:
    """For each user, an item the user never interacted with (0 where none was found).

    Rejection sampling in vectorised rounds: only the rejected draws are drawn again. Round r
    of the draw for `counters[i]` uses the uniforms of (stream, r, counters[i]) alone.
    """
    result = np.zeros(len(users), dtype=np.int32)
    pending = np.arange(len(users))
    stride = np.int64(n_items + 1)
    for round_ in range(max_rounds):
        if not len(pending):
            break
        counter = counters[pending]
        candidates = pick(
            counter_uniforms(counter, *stream, round_, 0),
            lambda: counter_uniforms(counter, *stream, round_, 1),  # noqa: B023 - called now
        )
        keys = users[pending].astype(np.int64) * stride + candidates
        hit = np.searchsorted(seen_keys, keys)
        seen = seen_keys[np.minimum(hit, len(seen_keys) - 1)] == keys
        result[pending[~seen]] = candidates[~seen]
        pending = pending[seen]
    return result


NEGATIVE_HISTORY, NEGATIVE_SAMPLES = 1, 2  # the two negative draws' streams


def negative_history(
    events: pd.DataFrame, item_frequency: pd.DataFrame, params: dict, first_row: int = 0
) -> pd.DataFrame:
    """`events` (whole users) with DIEN's negative history: beside each behaviour, an item
    that user never touched, drawn with the behaviour's global row as counter."""
    sampling = params["negative_sampling"]
    user = events["user"].to_numpy()
    negative = draw_unseen(
        user,
        first_row + np.arange(len(events), dtype=np.int64),
        user_item_keys(user, events["item"].to_numpy(), len(item_frequency)),
        len(item_frequency),
        _sampler(item_frequency, sampling),
        (int(sampling["seed"]), NEGATIVE_HISTORY),
        int(sampling["max_rounds"]),
    )
    item_category = np.concatenate([[0], item_frequency["category"].to_numpy()])
    return events.assign(neg_item=negative, neg_category=item_category[negative].astype(np.int32))


def add_negative_history(
    events: pd.DataFrame, item_frequency: pd.DataFrame, params: dict
) -> pd.DataFrame:
    """DIEN's negative history: beside each behaviour, an item that user never touched."""
    if is_spark(events):
        return spark_nodes.add_negative_history(events, item_frequency, params)
    return negative_history(events, item_frequency, params)


def samples_with_negatives(
    behaviours: pd.DataFrame, item_frequency: pd.DataFrame, params: dict, first_row: int = 0
) -> pd.DataFrame:
    """The kept behaviours of whole users (`behaviour_samples`), each followed by its `ratio`
    negatives, with their `split`. Negative j of the behaviour at global row r is drawn with
    counter `r * ratio + j`."""
    sampling = params["negative_sampling"]
    ratio = int(sampling["ratio"])
    seen_keys = user_item_keys(
        behaviours["user"].to_numpy(), behaviours["item"].to_numpy(), len(item_frequency)
    )
    kept = behaviours["keep"].to_numpy()
    positives = behaviours[kept]
    rows = np.flatnonzero(kept) + first_row
    source = np.repeat(np.arange(len(positives)), ratio)
    negative_item = draw_unseen(
        positives["user"].to_numpy()[source],
        rows[source] * ratio + np.tile(np.arange(ratio), len(positives)),
        seen_keys,
        len(item_frequency),
        _sampler(item_frequency, sampling),
        (int(sampling["seed"]), NEGATIVE_SAMPLES),
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
    return pd.DataFrame({name: columns[name] for name in [*SAMPLE_COLUMNS, "split"]})


def assemble_samples(
    positives: pd.DataFrame, item_frequency: pd.DataFrame, params: dict
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Train, validation and test samples: each positive followed by its `ratio` negatives."""
    ratio = int(params["negative_sampling"]["ratio"])
    if ratio < 0:
        raise ValueError(f"negative_sampling.ratio must be >= 0, got {ratio}")
    if is_spark(positives):
        return spark_nodes.assemble_samples(positives, item_frequency, params)
    samples = samples_with_negatives(positives, item_frequency, params)
    split = samples.pop("split").to_numpy()
    return tuple(
        samples[split == role].reset_index(drop=True) for role in (TRAIN, VALIDATION, TEST)
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
    items = (
        spark_nodes.trained_items(train_samples)
        if is_spark(train_samples)
        else train_samples["item"].to_numpy()
    )
    seen = np.isin(item_frequency["item"].to_numpy(), items) | (count > 0)
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


def sample_facts(
    events: pd.DataFrame,
    positives: pd.DataFrame,
    splits: dict[str, pd.DataFrame],
) -> dict:
    """The counts the feature report is made of (what `spark_nodes.sample_facts` computes on
    Spark)."""
    role = positives["split"].to_numpy()
    return {
        "events": len(events),
        "users": int(events["user"].nunique()),
        "max_user": int(events["user"].max()),
        "users_dropped": int(positives.loc[role < 0, "user"].nunique()),
        "events_of_dropped_users": int((role < 0).sum()),
        "eligible_events": int((role >= 0).sum()),
        "negative_history_not_found": int((events["neg_item"] == 0).sum()),
        "splits": {
            name: {
                "rows": len(samples),
                "positives": int(samples["label"].sum()),
                "mean_history_length": float(samples["hist_len"].mean()) if len(samples) else 0.0,
            }
            for name, samples in splits.items()
        },
    }


def describe_features(
    events: pd.DataFrame,
    positives: pd.DataFrame,
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
    splits = {"train": train, "validation": validation, "test": test}
    facts = (spark_nodes.sample_facts if is_spark(events) else sample_facts)(
        events, positives, splits
    )
    spec = {
        "n_users": facts["max_user"],
        "n_items": len(item_ids),
        "n_categories": len(category_ids),
        "n_behaviors": len(behavior_ids),
        "behaviors": behavior_ids["behavior"].tolist(),
        "max_history": int(params["max_history"]),
        "time_gap_edges": edges,
        "n_time_gap_buckets": len(edges) + 2,  # 0 padding, then one more than the edges
        "padding_id": 0,
    }
    per_split = facts["splits"]
    ratio = int(params["negative_sampling"]["ratio"])
    positives_total = sum(split["positives"] for split in per_split.values())
    negatives_total = sum(split["rows"] for split in per_split.values()) - positives_total
    cold_categories = set(cold_start_items["category"]) - set(cold_start_weights["category"])
    report = {
        "events": facts["events"],
        "users": facts["users"],
        "users_dropped_too_few_events": facts["users_dropped"],
        "events_of_dropped_users": facts["events_of_dropped_users"],
        "behaviours_without_history": facts["eligible_events"] - positives_total,
        "samples": {
            name: {"positives": split["positives"], "negatives": split["rows"] - split["positives"]}
            for name, split in per_split.items()
        },
        "negatives_not_found": positives_total * ratio - negatives_total,
        "negative_history_not_found": facts["negative_history_not_found"],
        "cold_start": {
            "cold_items_never_in_training": len(cold_start_items),
            "items_with_training_behaviours": len(cold_start_weights),
            "cold_categories_without_warm_items": len(cold_categories),
        },
        "mean_history_length": {
            name: split["mean_history_length"] for name, split in per_split.items()
        },
    }
    logger.info(
        "Features: %d events, %d users (%d dropped), train/val/test samples %d/%d/%d, %d cold",
        report["events"],
        report["users"],
        report["users_dropped_too_few_events"],
        per_split["train"]["rows"],
        per_split["validation"]["rows"],
        per_split["test"]["rows"],
        len(cold_start_items),
    )
    return spec, report
