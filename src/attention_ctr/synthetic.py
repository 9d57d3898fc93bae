"""Seeded synthetic behaviour logs with structure that attention can find and pooling cannot.

Each user holds a few interests (category slots). Behaviours come in sessions, each session
follows one interest, and an interest occasionally drifts to a new category. Within an interest
the user walks through neighbouring items of the category, so the next item is predicted by the
*recent behaviours of the matching interest*, while the average over the whole history blurs
all interests (and their stale, drifted-away categories) together.

Everything is vectorised over events: per-group cumulative sums on a stably sorted order replace
the per-user loop a simulation would naturally be written with.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

LOG_COLUMNS = ["user_id", "item_id", "category_id", "behavior", "timestamp"]
BEHAVIORS = ("pv", "cart", "fav", "buy")


@dataclass(frozen=True)
class SyntheticLogConfig:
    users: int = 2_000
    items: int = 6_000
    categories: int = 40
    events: int = 200_000
    seed: int = 42
    start: str = "2017-11-25"
    days: float = 9.0
    min_events_per_user: int = 5
    min_interests: int = 3
    max_interests: int = 6
    session_switch_prob: float = 0.15
    drift_prob: float = 0.01
    item_step: int = 2
    noise_prob: float = 0.05
    behavior_mix: tuple[float, float, float, float] = (0.895, 0.055, 0.029, 0.021)

    @classmethod
    def from_params(cls, params: dict) -> SyntheticLogConfig:
        known = set(cls.__dataclass_fields__)
        unknown = set(params) - known
        if unknown:
            raise ValueError(
                f"Unknown parameter(s) under ingestion.synthetic: {sorted(unknown)}; "
                f"expected some of {sorted(known)}"
            )
        values = dict(params)
        if isinstance(values.get("behavior_mix"), dict):
            mix = values["behavior_mix"]
            if set(mix) - set(BEHAVIORS):
                raise ValueError(
                    f"Unknown behaviour(s) in ingestion.synthetic.behavior_mix: "
                    f"{sorted(set(mix) - set(BEHAVIORS))}; expected some of {list(BEHAVIORS)}"
                )
            values["behavior_mix"] = tuple(float(mix.get(b, 0.0)) for b in BEHAVIORS)
        config = cls(**values)
        config.check()
        return config

    def check(self) -> None:
        problems = []
        if self.users < 1 or self.items < 1 or self.categories < 1:
            problems.append("users, items and categories must be positive")
        if self.items < self.categories:
            problems.append(f"items ({self.items}) must be >= categories ({self.categories})")
        if self.min_events_per_user < 1:
            problems.append("min_events_per_user must be >= 1 (every user needs a history)")
        if self.events < self.users * self.min_events_per_user:
            problems.append(
                f"events ({self.events}) must be >= users * min_events_per_user "
                f"({self.users} * {self.min_events_per_user})"
            )
        if not 1 <= self.min_interests <= self.max_interests:
            problems.append("need 1 <= min_interests <= max_interests")
        for name in ("session_switch_prob", "drift_prob", "noise_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                problems.append(f"{name} must lie in [0, 1]")
        if (
            len(self.behavior_mix) != len(BEHAVIORS)
            or min(self.behavior_mix) < 0
            or sum(self.behavior_mix) <= 0
        ):
            problems.append(f"behavior_mix needs non-negative weights for {BEHAVIORS}")
        if problems:
            raise ValueError("Invalid ingestion.synthetic parameters: " + "; ".join(problems))


def _mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser: a fast, seedable, vectorised hash of uint64 keys."""
    x = x.astype(np.uint64, copy=True)
    with np.errstate(over="ignore"):
        x ^= x >> np.uint64(30)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return x


def _hash_uniform(seed: int, *keys: np.ndarray) -> np.ndarray:
    """Deterministic uniform [0, 1) numbers keyed by integer arrays."""
    h = np.full(np.broadcast(*keys).shape, _mix64(np.array([seed], dtype=np.uint64))[0])
    for key in keys:
        h = _mix64(h ^ key.astype(np.uint64))
    return (h >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def _group_starts(keys_sorted: np.ndarray) -> np.ndarray:
    """Boolean mask marking the first element of every run of equal keys."""
    starts = np.empty(len(keys_sorted), dtype=bool)
    starts[:1] = True
    np.not_equal(keys_sorted[1:], keys_sorted[:-1], out=starts[1:])
    return starts


def _grouped_cumsum(values: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Cumulative sum that restarts at every True in `starts` (values already grouped)."""
    total = np.cumsum(values)
    start_idx = np.flatnonzero(starts)
    run_lengths = np.diff(np.append(start_idx, len(values)))
    offsets = np.repeat(total[start_idx] - values[start_idx], run_lengths)
    return total - offsets


def _events_per_user(cfg: SyntheticLogConfig, rng: np.random.Generator) -> np.ndarray:
    weights = rng.lognormal(0.0, 0.6, cfg.users)
    spare = cfg.events - cfg.users * cfg.min_events_per_user
    counts = np.floor(weights / weights.sum() * spare).astype(np.int64) + cfg.min_events_per_user
    remainder = cfg.events - int(counts.sum())
    counts[rng.permutation(cfg.users)[:remainder]] += 1
    return counts


def _category_layout(cfg: SyntheticLogConfig, rng: np.random.Generator):
    """Zipf-like category sizes summing to `items`, each category at least one item."""
    weights = 1.0 / np.arange(1, cfg.categories + 1) ** 0.8
    rng.shuffle(weights)
    sizes = np.floor(weights / weights.sum() * (cfg.items - cfg.categories)).astype(np.int64) + 1
    sizes[np.argmax(sizes)] += cfg.items - int(sizes.sum())
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    popularity = sizes / sizes.sum()
    return sizes, offsets, np.cumsum(popularity)


def generate_behavior_logs(cfg: SyntheticLogConfig) -> pd.DataFrame:
    """Generate a Taobao-UserBehavior-shaped log, sorted by user then time."""
    rng = np.random.default_rng(cfg.seed)
    n = cfg.events
    counts = _events_per_user(cfg, rng)
    user = np.repeat(np.arange(cfg.users, dtype=np.int64), counts)
    user_start = np.repeat(np.cumsum(counts) - counts, counts)
    first_of_user = np.arange(n) == user_start

    # Sessions: each session follows one of the user's interest slots.
    new_session = (rng.random(n) < cfg.session_switch_prob) | first_of_user
    session = np.cumsum(new_session) - 1
    interests = rng.integers(cfg.min_interests, cfg.max_interests + 1, cfg.users)
    session_user = user[new_session]
    slot = np.floor(rng.random(len(session_user)) * interests[session_user]).astype(np.int64)[
        session
    ]

    # Drift: an interest slot occasionally moves to a new category; its epoch counts the moves.
    drift = (rng.random(n) < cfg.drift_prob) & ~first_of_user
    slot_key = user * cfg.max_interests + slot
    order = np.argsort(slot_key, kind="stable")  # groups (user, slot), time order kept inside
    epoch = np.empty(n, dtype=np.int64)
    epoch[order] = _grouped_cumsum(drift[order].astype(np.int64), _group_starts(slot_key[order]))

    sizes, offsets, category_cdf = _category_layout(cfg, rng)
    seed = cfg.seed + 1
    category = np.searchsorted(category_cdf, _hash_uniform(seed, user, slot, epoch), side="right")
    category = np.minimum(category, cfg.categories - 1)

    # Within an interest epoch the user walks through neighbouring items of the category.
    interest_key = (slot_key * (int(epoch.max()) + 1) + epoch)[order]
    interest_starts = _group_starts(interest_key)
    steps = rng.integers(-cfg.item_step, cfg.item_step + 1, n)
    walk = np.empty(n, dtype=np.int64)
    walk[order] = _grouped_cumsum(steps[order], interest_starts)
    start_pos = _hash_uniform(seed + 1, user, slot, epoch) ** 3  # long tail: popular items first
    position = np.floor(start_pos * sizes[category]).astype(np.int64) + walk
    item = offsets[category] + np.mod(position, sizes[category])

    # A little exploration noise: random items from random categories.
    noise = rng.random(n) < cfg.noise_prob
    noise_item = rng.integers(0, cfg.items, int(noise.sum()))
    item[noise] = noise_item
    category[noise] = np.searchsorted(offsets, noise_item, side="right") - 1

    # Time: short gaps inside a session, long gaps between sessions, spread over the window.
    gaps = np.where(new_session, rng.exponential(1.0, n), rng.exponential(0.03, n))
    gaps[first_of_user] = 0.0
    elapsed = _grouped_cumsum(gaps, first_of_user)
    user_total = np.repeat(elapsed[np.cumsum(counts) - 1], counts)
    span = cfg.days * 86_400
    user_span = np.repeat(rng.uniform(0.5, 1.0, cfg.users) * span, counts)
    user_offset = np.repeat(rng.uniform(0.0, 1.0, cfg.users), counts) * (span - user_span)
    start = int(pd.Timestamp(cfg.start, tz="UTC").timestamp())
    timestamp = start + np.floor(
        user_offset + elapsed / np.maximum(user_total, 1e-9) * user_span
    ).astype(np.int64)

    mix = np.asarray(cfg.behavior_mix, dtype=np.float64)
    behavior_code = np.searchsorted(np.cumsum(mix / mix.sum()), rng.random(n), side="right")
    behavior = pd.Categorical.from_codes(np.minimum(behavior_code, 3), categories=list(BEHAVIORS))

    # Raw ids look like Taobao's: positive, sparse and unordered, so encoding has work to do.
    raw_user = rng.permutation(cfg.users * 3)[: cfg.users] + 1
    raw_item = rng.permutation(cfg.items * 3)[: cfg.items] + 1
    raw_category = rng.permutation(cfg.categories * 3)[: cfg.categories] + 1
    return pd.DataFrame(
        {
            "user_id": raw_user[user],
            "item_id": raw_item[item],
            "category_id": raw_category[category],
            "behavior": behavior,
            "timestamp": timestamp,
        }
    )
