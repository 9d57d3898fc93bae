"""Ingestion on Spark (`kedro run --env spark`): the pandas path's validation, row for row.

Every row a reader gave (`attention_ctr.spark_raw_logs`) is kept or quarantined with the first
reason it fails, in `nodes.REASONS` order, exactly as `nodes.validate_behavior_logs` does.
"""

from __future__ import annotations

from attention_ctr.spark_raw_logs import SparkRawEvents
from attention_ctr.synthetic import LOG_COLUMNS

# Integer text: a sign, digits, maybe a zero fraction ("7.000" is 7).
INTEGER = r"^[+-]?[0-9]+(\.0*)?$"
# What pandas' to_numeric reads as a finite number (Java's parser also takes "12d", "0x1p4").
DECIMAL = r"^[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?$"
# What Python's str.strip() strips (Unicode whitespace); Spark's trim() takes only spaces.
WHITESPACE = "".join(c for c in map(chr, range(0x3001)) if c.isspace())


def _strip(text):
    from pyspark.sql import functions as F

    return F.btrim(text, F.lit(WHITESPACE))


def _blank(text):
    """Null, or nothing but whitespace. (Trimming every value costs: most start with a digit.)"""
    from pyspark.sql import functions as F

    starts_blank = F.substring(text, 1, 1).isin(list(WHITESPACE))
    return text.isNull() | (text == "") | (starts_blank & (_strip(text) == ""))


def _with_integers(frame, columns):
    """`frame` with `_c`, each text column `c` as long: integer text over the whole int64 range,
    other numbers when integral and exact as a float ("1e3"); null otherwise (the pandas
    `_integers` rule).

    Staged, one small expression per step: the whole rule for four columns in one step made a
    generated method over 8 KB, which HotSpot leaves interpreted by default (2x slower). Plain
    digits, nearly every value, are cast at once; the later steps see only the rest.
    """
    from pyspark.sql import functions as F

    frame = frame.select(
        "*",
        *[
            F.when(F.col(c).rlike(r"^[0-9]{1,18}\z"), F.col(c).try_cast("long")).alias(f"_{c}")
            for c in columns
        ],
    )
    frame = frame.select(
        "*",
        *[F.when(F.col(f"_{c}").isNull(), _strip(F.col(c))).alias(f"_{c}_text") for c in columns],
    )
    helpers = {f"_{c}{suffix}" for c in columns for suffix in ("", "_text", "_number")}
    frame = frame.select(
        *[c for c in frame.columns if c not in helpers],
        *[
            F.coalesce(
                f"_{c}",
                F.when(
                    F.col(f"_{c}_text").rlike(INTEGER),
                    F.regexp_replace(f"_{c}_text", r"\.0*$", "").try_cast("long"),
                ),
            ).alias(f"_{c}")
            for c in columns
        ],
        *[
            F.when(
                F.col(f"_{c}_text").rlike(DECIMAL), F.col(f"_{c}_text").try_cast("double")
            ).alias(f"_{c}_number")
            for c in columns
        ],
    )
    number = {c: F.col(f"_{c}_number") for c in columns}
    return frame.select(
        *[c for c in frame.columns if c not in helpers],
        *[
            F.coalesce(
                f"_{c}",
                # NaN and infinities fail the bound too.
                F.when(
                    (F.abs(number[c]) <= 2.0**53) & (F.floor(number[c]) == number[c]),
                    number[c].cast("long"),
                ),
            ).alias(f"_{c}")
            for c in columns
        ],
    )


def validate_behavior_logs(raw: SparkRawEvents, params: dict):
    """Spark's `validate_behavior_logs`: (interactions as a Spark DataFrame with each row's
    raw `line`, the quarantine as a pandas frame, the report)."""
    from pyspark import StorageLevel
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    from attention_ctr.pipelines.ingestion.nodes import (
        QUARANTINE_COLUMNS,
        REASONS,
        _timestamp_bounds,
        announce,
    )

    # Typed values first, in their own step, so each is parsed once.
    typed_columns = (*raw.numeric_ids, "timestamp")
    frame = _with_integers(raw.frame, typed_columns)
    frame = frame.select(
        "*", *[F.col(c).alias(f"_{c}") for c in LOG_COLUMNS if c not in typed_columns]
    )
    missing = F.lit(False)
    for column in LOG_COLUMNS:
        missing = missing | _blank(F.col(column))
    bad_type = F.lit(False)
    for column in typed_columns:
        bad_type = bad_type | (F.col(column).isNotNull() & F.col(f"_{column}").isNull())
    negative = F.lit(False)
    for column in raw.numeric_ids:
        negative = negative | F.coalesce(F.col(f"_{column}") < 0, F.lit(False))
    allowed = [str(b) for b in params["behaviors"]]
    low, high = _timestamp_bounds(params)
    timestamp = F.col("_timestamp")
    out_of_range = F.coalesce((timestamp < low) | (timestamp > high), F.lit(False))
    # The first reason that holds, in REASONS order (the reader's own verdict first).
    reason = (
        F.when(F.col("verdict").isNotNull(), F.col("verdict"))
        .when(missing, F.lit("missing_value"))
        .when(bad_type, F.lit("bad_type"))
        .when(negative, F.lit("negative_id"))
        .when(~F.col("behavior").isin(allowed), F.lit("unknown_behavior"))
        .when(out_of_range, F.lit("timestamp_out_of_range"))
    )
    # Valid rows keep only their typed values: half the bytes to shuffle and cache. (A duplicate
    # is quarantined with its typed values as text.)
    judged = frame.select("*", reason.alias("reason")).select(
        "line",
        "reason",
        *[F.when(F.col("reason").isNotNull(), F.col(c)).alias(c) for c in LOG_COLUMNS],
        "raw_text",
        *[f"_{c}" for c in LOG_COLUMNS],
    )
    keys = ["_user_id", "_item_id", "_behavior", "_timestamp"]
    # Duplicates are counted among valid rows: rows already quarantined sort last.
    first = F.row_number().over(
        Window.partitionBy(*keys).orderBy(F.col("reason").isNotNull(), "line")
    )
    judged = judged.withColumn(
        "reason",
        F.when(F.col("reason").isNull() & (first > 1), F.lit("duplicate")).otherwise(
            F.col("reason")
        ),
    ).persist(StorageLevel.MEMORY_AND_DISK)

    interactions = judged.filter(F.col("reason").isNull()).select(
        *[F.col(f"_{c}").alias(c) for c in LOG_COLUMNS], "line"
    )
    quarantine = (
        judged.filter(F.col("reason").isNotNull())
        .select(
            "line",
            "reason",
            *[
                F.when(F.col("reason") == "duplicate", F.col(f"_{c}").cast("string"))
                .otherwise(F.col(c))
                .alias(c)
                for c in LOG_COLUMNS
            ],
            "raw_text",
        )
        .toPandas()
    )
    quarantine = quarantine.astype({c: "str" for c in QUARANTINE_COLUMNS[1:]})[
        QUARANTINE_COLUMNS
    ].sort_values("line", kind="stable", ignore_index=True)
    kept = interactions.agg(
        F.count("*").alias("rows"),
        F.countDistinct("user_id").alias("users"),
        F.countDistinct("item_id").alias("items"),
        F.countDistinct("category_id").alias("categories"),
        F.min("timestamp").alias("first"),
        F.max("timestamp").alias("last"),
    ).first()
    counts = quarantine["reason"].value_counts()
    report = {
        "source": raw.source,
        "rows_in": int(kept["rows"]) + len(quarantine),
        "rows_kept": int(kept["rows"]),
        "rows_quarantined": len(quarantine),
        "quarantined_by_reason": {r: int(counts.get(r, 0)) for r in REASONS},
        "users": int(kept["users"]),
        "items": int(kept["items"]),
        "categories": int(kept["categories"]),
        "first_timestamp": None if kept["first"] is None else int(kept["first"]),
        "last_timestamp": None if kept["last"] is None else int(kept["last"]),
    }
    announce(report, raw.hint, " on Spark")
    return interactions, quarantine, report
