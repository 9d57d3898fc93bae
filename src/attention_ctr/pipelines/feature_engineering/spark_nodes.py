"""Feature engineering on Spark (`kedro run --env spark`): the pandas nodes' tables, for logs
one process cannot hold.

Spark does what needs the whole log: it encodes the ids, sorts the events by (user, time, log
line) and puts each user's events, whole, into one partition of consecutive users. Each
partition then goes through the same functions as the pandas path (`nodes.py`, by
`mapInPandas`), told its first global row: histories, splits and negatives come from the same
code, and negatives from a counter-based generator, so both engines write identical tables.
Partitions are written in order, so the part files of a table, read in name order, are the
pandas table's rows in its order.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from attention_ctr.errors import InputError
from attention_ctr.pipelines.feature_engineering import nodes as pandas_nodes
from attention_ctr.sequences import SAMPLE_COLUMNS

EVENTS_SCHEMA = "user int, item int, category int, behavior byte, timestamp long"
BEHAVIOURS_SCHEMA = (
    "row long, user int, item int, category int, timestamp long, hist_end long, hist_len int, "
    "split byte, keep boolean"
)
SAMPLES_SCHEMA = (
    "user int, item int, category int, label byte, timestamp long, hist_end long, "
    "hist_len int, split byte"
)


def is_spark(data) -> bool:
    """Whether `data` is a Spark DataFrame (without importing pyspark)."""
    return type(data).__module__.startswith("pyspark.sql")


def _per_partition(function):
    """A mapInPandas function that calls `function` once on the whole partition: a partition
    holds whole users, which the pandas functions need."""

    def run(batches):
        frames = [batch for batch in batches if len(batch)]
        if frames:
            yield function(pd.concat(frames, ignore_index=True))

    return run


def _sorted_ids(frame, column: str) -> pd.DataFrame:
    """Distinct values of `column` with their `count` of rows, collected in sorted order: the
    order of pandas' factorize (numbers by value, text by code point), so a value's code is
    its position + 1. Ids, not events: they fit the driver."""
    table = frame.groupBy(column).count().toPandas()
    return table.sort_values(column, ignore_index=True)


def _searchable(ids: pd.Series) -> np.ndarray:
    """Sorted ids as a numpy array binary search runs on in C (text as fixed-width unicode)."""
    values = ids.to_numpy()
    return values.astype(str) if values.dtype == object else values


def _codes_of(values: pd.Series, ids: np.ndarray) -> np.ndarray:
    """The code (position + 1) of each of `values` in the sorted `ids`, which hold them all."""
    values = values.to_numpy()
    if ids.dtype.kind == "U":
        values = values.astype(str)
    return (np.searchsorted(ids, values) + 1).astype(np.int32)


def encode_interactions(interactions, behaviors: list[str]):
    """Spark's `encode_interactions`: the events sorted by (user, time, log line) in partitions
    of whole, consecutive users, with their global `row`; the id tables as pandas frames.

    The id dictionaries are collected (ids fit the driver where events do not) and applied in
    each partition by binary search: joining the events to them would shuffle every event twice.
    """
    from pyspark import StorageLevel
    from pyspark.sql import functions as F

    spark = interactions.sparkSession
    if "line" not in interactions.columns:
        # A single file written by the pandas path: Spark reads its splits in file order.
        interactions = interactions.withColumn("line", F.monotonically_increasing_id())
    known = F.col("behavior").cast("string").isin([str(b) for b in behaviors])
    if interactions.filter(~known).limit(1).count():
        raise InputError(
            "interactions hold a behaviour outside parameter ingestion.validation.behaviors "
            f"{list(behaviors)}"
        )
    users = _sorted_ids(interactions, "user_id")
    items = _sorted_ids(interactions, "item_id")
    categories = _sorted_ids(interactions, "category_id")
    dictionaries = spark.sparkContext.broadcast(
        {
            "user": _searchable(users["user_id"]),
            "item": _searchable(items["item_id"]),
            "category": _searchable(categories["category_id"]),
        }
    )
    offsets = np.concatenate([[0, 0], np.cumsum(users["count"].to_numpy())])
    first_rows = spark.sparkContext.broadcast(offsets)  # [u]: global row of user u's first event

    def encode(frame: pd.DataFrame) -> pd.DataFrame:
        codes = {
            name: _codes_of(frame[f"{name}_id"], ids) for name, ids in dictionaries.value.items()
        }
        row = first_rows.value[int(codes["user"][0])] + np.arange(len(frame))
        return pd.DataFrame(
            {
                **codes,
                "behavior": frame["behavior"].to_numpy(np.int8),
                "timestamp": frame["timestamp"].to_numpy(np.int64),
                "row": row,
            }
        )

    vocabulary = F.array(*[F.lit(str(b)) for b in behaviors])
    # spark.sql.shuffle.partitions ranges of users, which adaptive execution merges (neighbours
    # only, so the order holds) up to spark.sql.adaptive.advisoryPartitionSizeInBytes each.
    ordered = (
        interactions.select(
            "user_id",
            "item_id",
            "category_id",
            F.array_position(vocabulary, F.col("behavior").cast("string")).alias("behavior"),
            F.col("timestamp").cast("long").alias("timestamp"),
            "line",
        )
        .repartitionByRange("user_id")
        .sortWithinPartitions("user_id", "timestamp", "line")
    )
    events = ordered.mapInPandas(_per_partition(encode), f"{EVENTS_SCHEMA}, row long").persist(
        StorageLevel.MEMORY_AND_DISK
    )

    def id_table(raw_ids: pd.Series, code: str, **more) -> pd.DataFrame:
        codes = np.arange(1, len(raw_ids) + 1, dtype=np.int32)
        return pd.DataFrame({"raw_id": raw_ids.to_numpy(), code: codes, **more})

    # An item's category is the one of its first behaviour (real logs have a few conflicts).
    first = events.groupBy("item").agg(F.min_by("category", "row").alias("category")).toPandas()
    item_category = np.zeros(len(items), dtype=np.int32)
    item_category[first["item"].to_numpy() - 1] = first["category"].to_numpy()
    return (
        events,
        id_table(users["user_id"], "user"),
        id_table(items["item_id"], "item", category=item_category),
        id_table(categories["category_id"], "category"),
        pandas_nodes.behavior_table(behaviors),
    )


def build_positive_samples(events, params: dict):
    """Spark's `build_positive_samples`: every behaviour with its sample columns and `row`."""
    from pyspark import StorageLevel
    from pyspark.sql import functions as F

    def samples(frame: pd.DataFrame) -> pd.DataFrame:
        first_row = int(frame["row"].iloc[0])
        return pandas_nodes.behaviour_samples(frame, params, first_row).assign(
            row=frame["row"].to_numpy()
        )

    behaviours = events.mapInPandas(_per_partition(samples), BEHAVIOURS_SCHEMA).persist(
        StorageLevel.MEMORY_AND_DISK
    )
    eligible = F.col("split") >= 0
    totals = behaviours.agg(
        F.count(F.when(eligible, 1)).alias("eligible"),
        F.count(F.when(F.col("keep") & (F.col("split") == pandas_nodes.TRAIN), 1)).alias("train"),
    ).first()
    if not totals["eligible"] or not totals["train"]:
        per_user = behaviours.groupBy("user").agg(F.count("*").alias("n"), F.max("split"))
        summary = per_user.agg(
            F.count("*").alias("users"),
            F.max("n").alias("most"),
            F.count(F.when(F.col("max(split)") >= 0, 1)).alias("eligible_users"),
        ).first()
        pandas_nodes.check_samples(
            int(params["min_user_events"]),
            users=summary["users"],
            max_user_events=summary["most"],
            eligible_users=summary["eligible_users"],
            train=totals["train"],
        )
    return behaviours


def count_item_frequency(behaviours, item_ids: pd.DataFrame) -> pd.DataFrame:
    """Spark's `count_item_frequency`: training behaviours per item."""
    from pyspark.sql import functions as F

    per_item = (
        behaviours.filter(F.col("split") == pandas_nodes.TRAIN).groupBy("item").count().toPandas()
    )
    counts = np.zeros(len(item_ids), dtype=np.int64)
    counts[per_item["item"].to_numpy() - 1] = per_item["count"].to_numpy()
    return pandas_nodes.item_frequency_table(item_ids, counts)


def add_negative_history(events, item_frequency: pd.DataFrame, params: dict):
    """Spark's `add_negative_history`, on each partition of whole users."""
    frequency = events.sparkSession.sparkContext.broadcast(item_frequency)

    def negatives(frame: pd.DataFrame) -> pd.DataFrame:
        first_row = int(frame["row"].iloc[0])
        return pandas_nodes.negative_history(
            frame.drop(columns="row"), frequency.value, params, first_row
        )

    return events.mapInPandas(
        _per_partition(negatives), f"{EVENTS_SCHEMA}, neg_item int, neg_category int"
    )


def assemble_samples(behaviours, item_frequency: pd.DataFrame, params: dict):
    """Spark's `assemble_samples`: the three splits, each in the pandas path's row order."""
    from pyspark import StorageLevel
    from pyspark.sql import functions as F

    frequency = behaviours.sparkSession.sparkContext.broadcast(item_frequency)

    def samples(frame: pd.DataFrame) -> pd.DataFrame:
        first_row = int(frame["row"].iloc[0])
        return pandas_nodes.samples_with_negatives(frame, frequency.value, params, first_row)

    every = behaviours.mapInPandas(_per_partition(samples), SAMPLES_SCHEMA).persist(
        StorageLevel.DISK_ONLY
    )
    return tuple(
        every.filter(F.col("split") == role).select(*SAMPLE_COLUMNS)
        for role in (pandas_nodes.TRAIN, pandas_nodes.VALIDATION, pandas_nodes.TEST)
    )


def trained_items(train_samples) -> np.ndarray:
    """The distinct items of the training samples."""
    return train_samples.select("item").distinct().toPandas()["item"].to_numpy()


def sample_facts(events, behaviours, splits: dict) -> dict:
    """Spark's `sample_facts`: the counts the feature report is made of."""
    from pyspark.sql import functions as F

    event_totals = events.agg(
        F.count("*").alias("events"),
        F.countDistinct("user").alias("users"),
        F.max("user").alias("max_user"),
        F.count(F.when(F.col("neg_item") == 0, 1)).alias("not_found"),
    ).first()
    dropped = F.col("split") < 0
    behaviour_totals = behaviours.agg(
        F.countDistinct(F.when(dropped, F.col("user"))).alias("users_dropped"),
        F.count(F.when(dropped, 1)).alias("events_of_dropped_users"),
        F.count(F.when(~dropped, 1)).alias("eligible_events"),
    ).first()
    per_split = {}
    for name, samples in splits.items():
        totals = samples.agg(
            F.count("*").alias("rows"),
            F.sum("label").alias("positives"),
            F.avg("hist_len").alias("mean"),
        ).first()
        per_split[name] = {
            "rows": int(totals["rows"]),
            "positives": int(totals["positives"] or 0),
            "mean_history_length": float(totals["mean"] or 0.0),
        }
    return {
        "events": int(event_totals["events"]),
        "users": int(event_totals["users"]),
        "max_user": int(event_totals["max_user"]),
        "users_dropped": int(behaviour_totals["users_dropped"]),
        "events_of_dropped_users": int(behaviour_totals["events_of_dropped_users"]),
        "eligible_events": int(behaviour_totals["eligible_events"]),
        "negative_history_not_found": int(event_totals["not_found"]),
        "splits": per_split,
    }
