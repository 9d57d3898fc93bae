"""Raw behaviour logs read for Spark (`BehaviorLogDataset(engine="spark")`).

A Taobao-format log (the synthetic one, UserBehavior: the formats that reach 100 M rows) is
read by Spark itself, a line a row. The other formats are parsed by the pandas readers of
`attention_ctr.raw_logs`, then handed to Spark, so that one validation judges them all.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.csv

from attention_ctr.raw_logs import TAOBAO_COLUMNS, RawEvents, RawLogError, _first_line, _hint
from attention_ctr.synthetic import LOG_COLUMNS


@dataclass
class SparkRawEvents:
    """Parsed rows of one raw log as a Spark DataFrame: `line`, LOG_COLUMNS as text, the
    reader's own `verdict` (a reason, or null) and the row's `raw_text` (for the quarantine)."""

    frame: object  # pyspark.sql.DataFrame
    source: str
    numeric_ids: tuple[str, ...]
    hint: str = ""


# A plain row: three ids and a timestamp of at most 18 digits (a long, whatever they are), a
# behaviour of word characters (maybe quoted). Its fields are the same from a split on commas
# as from the CSV parser. (\z: Java's $ also matches before a final line separator.)
PLAIN_ROW = r'^[0-9]{1,18},[0-9]{1,18},[0-9]{1,18},("?)[A-Za-z0-9_]+\1,[0-9]{1,18}\z'
# Values the pandas reader reads as missing, quoted or not (pyarrow's CSV defaults).
NULL_TEXTS = list(pyarrow.csv.ConvertOptions().null_values)


def _spark():
    from pyspark.sql import SparkSession

    return SparkSession.builder.getOrCreate()


def _line_numbers(lines):
    """`lines` (spark.read.text of one file) with the 1-based physical `line` of each row.

    A single file's splits are read in file order, so a row's line is the rows before its
    partition plus its place in it (monotonically_increasing_id counts within a partition).
    """
    from pyspark.sql import functions as F

    numbered = lines.withColumn("_id", F.monotonically_increasing_id()).withColumn(
        "_partition", F.spark_partition_id()
    )
    counts = numbered.groupBy("_partition").count().toPandas().sort_values("_partition")
    before = np.concatenate([[0], np.cumsum(counts["count"].to_numpy())[:-1]])
    starts = dict(zip(counts["_partition"].tolist(), before.tolist(), strict=True))
    start_of = F.create_map(*[F.lit(x) for pair in starts.items() for x in pair])
    local = F.col("_id") - F.shiftleft(F.col("_partition").cast("long"), 33)
    return numbered.select(
        (start_of[F.col("_partition")] + local + 1).alias("line"), F.col("value")
    )


def read_taobao(path: str) -> SparkRawEvents:
    """A Taobao UserBehavior CSV read by Spark: `user,item,category,behavior,timestamp`."""
    from pyspark.sql import functions as F

    first, leading_empty = _first_line(Path(path), TAOBAO_COLUMNS)
    fields = first.split(",")
    skip_header = [f.strip().lower() for f in fields] == TAOBAO_COLUMNS
    if not skip_header and len(fields) != len(TAOBAO_COLUMNS):
        raise RawLogError(
            f"Raw log {path} has {len(fields)} column(s) in its first row ({first[:80]!r}), "
            f"expected {len(TAOBAO_COLUMNS)}: {','.join(TAOBAO_COLUMNS)}"
        )
    lines = _line_numbers(_spark().read.text(path))
    # Empty lines before the first row are skipped; later ones are rows (missing values), as
    # the pandas reader has them.
    lines = lines.filter(F.col("line") > leading_empty + int(skip_header))
    # One step per select: a column used several times is computed once (Spark does not
    # inline an expensive expression its next step uses more than once).
    value = F.when(F.col("line") == 1, F.regexp_replace("value", "^\ufeff", "")).otherwise(
        F.col("value")
    )  # a byte-order mark, which the pandas reader skips too
    # Nearly every row of a real log is plain: it skips the CSV parser below (the costly part).
    text = lines.select("line", value.alias("text")).select(
        "line", "text", F.col("text").rlike(PLAIN_ROW).alias("plain")
    )
    text = text.select(
        "line",
        F.when(F.col("plain"), F.col("text"))
        .otherwise(F.regexp_replace("text", "\u0000", "\ufffd"))
        .alias("text"),
        "plain",
    )
    # Fields are counted with quoted values (which may hold commas) taken as one.
    fields = F.size(F.split(F.regexp_replace("text", '"([^"]|"")*"', "q"), ","))
    judged = text.select(
        "line",
        "text",
        "plain",
        F.when(F.col("plain"), F.lit(None).cast("string"))
        .when(F.col("text").contains("\ufffd"), F.lit("bad_encoding"))
        .when((F.col("text") != "") & (fields != len(TAOBAO_COLUMNS)), F.lit("malformed_row"))
        .alias("verdict"),
    )
    parsed = judged.select(
        "line",
        "text",
        "verdict",
        F.when(F.col("plain"), F.split("text", ",")).alias("plain_fields"),
        F.when(
            ~F.col("plain") & F.col("verdict").isNull(),
            F.from_csv("text", ", ".join(f"{c} string" for c in LOG_COLUMNS)),
        ).alias("fields"),
    )
    plain = F.col("plain_fields")
    values = [
        F.coalesce(
            F.translate(plain[i], '"', "") if column == "behavior" else plain[i],
            F.col("fields")[column],
        )
        for i, column in enumerate(LOG_COLUMNS)
    ]
    frame = parsed.select(
        "line",
        *[
            F.when(~value.isin(NULL_TEXTS), value).alias(column)
            for value, column in zip(values, LOG_COLUMNS, strict=True)
        ],
        "verdict",
        F.when(F.col("verdict").isNotNull(), F.col("text")).alias("raw_text"),
    )
    return SparkRawEvents(frame, path, ("user_id", "item_id", "category_id"), _hint(TAOBAO_COLUMNS))


def from_raw_events(raw: RawEvents) -> SparkRawEvents:
    """A pandas reader's rows (any format) as a SparkRawEvents."""
    frame = raw.frame
    verdict = np.full(len(frame), None, dtype=object)
    for name, mask in raw.rejected.items():
        verdict[np.asarray(mask, dtype=bool) & (verdict == None)] = name  # noqa: E711
    rows = pd.DataFrame(
        {
            "line": frame["line"].to_numpy(np.int64),
            **{
                c: frame[c]
                .astype(object)
                .where(frame[c].notna(), None)
                .map(lambda v: v if v is None else str(v))
                for c in LOG_COLUMNS
            },
            "verdict": verdict,
            "raw_text": raw.notes if raw.notes is not None else None,
        }
    )
    unreadable = [
        pd.DataFrame({"line": lines["line"], "verdict": name, "raw_text": lines["text"]})
        for name, lines in (("malformed_row", raw.malformed), ("bad_encoding", raw.bad_encoding))
        if len(lines)
    ]
    rows = pd.concat([rows, *unreadable], ignore_index=True).astype(
        {c: object for c in [*LOG_COLUMNS, "verdict", "raw_text"]}
    )
    rows = rows.where(rows.notna(), None)
    schema = "line long, " + ", ".join(f"{c} string" for c in [*LOG_COLUMNS, "verdict", "raw_text"])
    return SparkRawEvents(
        _spark().createDataFrame(rows, schema), raw.source, raw.numeric_ids, raw.hint
    )
