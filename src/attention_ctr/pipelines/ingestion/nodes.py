"""Ingestion: generate or read raw behaviour logs, validate them, quarantine the bad rows."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from attention_ctr.datasets import BehaviorLogSource
from attention_ctr.errors import InputError
from attention_ctr.pipelines.ingestion import spark_nodes
from attention_ctr.raw_logs import RawEvents, RawLogError
from attention_ctr.spark_raw_logs import SparkRawEvents
from attention_ctr.synthetic import LOG_COLUMNS, SyntheticLogConfig, generate_behavior_logs

logger = logging.getLogger(__name__)

SOURCES = ("synthetic", "raw")
# Checked in this order (after what the reader itself rejected, e.g. a rating out of range);
# a row is quarantined with the first reason it fails.
REASONS = (
    "malformed_row",
    "bad_encoding",
    "missing_value",
    "bad_type",
    "negative_id",
    "rating_out_of_range",
    "unknown_behavior",
    "timestamp_out_of_range",
    "duplicate",
)
QUARANTINE_COLUMNS = ["line", "reason", *LOG_COLUMNS, "raw_text"]


def generate_synthetic_logs(params: dict) -> pd.DataFrame:
    """Generate the seeded synthetic behaviour log (Taobao UserBehavior shape)."""
    return generate_behavior_logs(SyntheticLogConfig.from_params(params))


def read_behavior_logs(
    synthetic_logs: BehaviorLogSource, raw_logs: BehaviorLogSource, source: str
) -> RawEvents:
    """Parse the log that `ingestion.source` selects: the synthetic one or the catalog's raw one."""
    if source not in SOURCES:
        raise InputError(f"Parameter ingestion.source is {source!r}; expected one of {SOURCES}")
    chosen = synthetic_logs if source == "synthetic" else raw_logs
    logger.info("Reading %s behaviour log %s (%s format)", source, chosen.filepath, chosen.format)
    return chosen.read()


INT64_MAX = str(2**63 - 1)


def _integers(column: pd.Series) -> tuple[pd.Series, np.ndarray]:
    """(values as nullable Int64, NA where not an integer; mask of present-but-not-integer).

    Integer text is parsed exactly over the whole int64 range (float64 would merge ids beyond
    2**53, e.g. 19-digit Snowflake ids); "7.000" counts as 7. Other numbers count only when
    integral and exactly representable as a float ("1e3").
    """
    if pd.api.types.is_integer_dtype(column.dtype):  # int64, or Int64 when values are missing
        return column, np.zeros(len(column), dtype=bool)
    text = pc.utf8_trim_whitespace(pa.array(column.astype("str"), type=pa.string()))
    text = pc.replace_substring_regex(text, r"^([+-]?\d+)\.0*$", r"\1")
    negative = pc.fill_null(pc.starts_with(text, "-"), False)
    digits = pc.utf8_ltrim(pc.utf8_ltrim(text, "+-"), "0")
    digits = pc.if_else(pc.equal(digits, ""), "0", digits)
    # At most one sign, then at most 19 significant digits, within int64 for 19 of them
    # (same-length digit strings compare as numbers).
    shape = pc.match_substring_regex(text, r"^[+-]?\d+$")
    long = pc.equal(pc.utf8_length(digits), 19)
    limit = pc.if_else(negative, str(2**63), INT64_MAX)
    exact = pc.and_(
        pc.and_(shape, pc.less_equal(pc.utf8_length(digits), 19)),
        pc.or_(pc.invert(long), pc.less_equal(digits, limit)),
    )
    exact = pc.fill_null(exact, False)
    signed = pc.if_else(negative, pc.binary_join_element_wise("-", digits, ""), digits)
    parsed = pc.cast(pc.if_else(exact, signed, None), pa.int64())
    numbers = pd.Series(parsed.to_pandas(types_mapper={pa.int64(): pd.Int64Dtype()}.get))
    present = column.notna().to_numpy()
    rest = np.flatnonzero(present & ~exact.to_numpy(zero_copy_only=False))
    if len(rest):  # usually only the few bad values: the slow parser sees only them
        floats = pd.to_numeric(pd.Series(text.take(rest)), errors="coerce").to_numpy("float64")
        integral = (np.floor(floats) == floats) & (np.abs(floats) <= 2.0**53)
        numbers.iloc[rest[integral]] = floats[integral].astype(np.int64)
    numbers.index = column.index
    return numbers, present & numbers.isna().to_numpy()


def _timestamp_bounds(params: dict) -> tuple[int, int]:
    low = pd.Timestamp(params["min_timestamp"], tz="UTC")
    high = params.get("max_timestamp")
    high = (
        pd.Timestamp.now(tz="UTC") + pd.Timedelta(days=1)
        if high is None
        else pd.Timestamp(high, tz="UTC")
    )
    return int(low.timestamp()), int(high.timestamp())


def validate_behavior_logs(raw: RawEvents, params: dict) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """Split parsed rows into valid interactions and a quarantine with reasons and counts."""
    if isinstance(raw, SparkRawEvents):
        return spark_nodes.validate_behavior_logs(raw, params)
    frame = raw.frame
    n = len(frame)
    reason = np.zeros(n, dtype=np.int8)  # 0 = valid, else 1 + index into REASONS

    def flag(name: str, failed: np.ndarray) -> None:
        reason[(reason == 0) & failed] = REASONS.index(name) + 1

    for name in REASONS:  # what the reader rejected comes first: it saw the raw value
        if name in raw.rejected:
            flag(name, np.asarray(raw.rejected[name], dtype=bool))
    missing = np.zeros(n, dtype=bool)
    for column in LOG_COLUMNS:
        values = frame[column]
        missing |= values.isna().to_numpy()
        if values.dtype == object or pd.api.types.is_string_dtype(values.dtype):
            missing |= (
                values.astype("str").str.strip() == ""
            ).to_numpy() & values.notna().to_numpy()
    flag("missing_value", missing)

    typed = {}
    for column in (*raw.numeric_ids, "timestamp"):
        typed[column], bad_type = _integers(frame[column])
        flag("bad_type", bad_type)
    negative = np.zeros(n, dtype=bool)
    for column in raw.numeric_ids:
        negative |= (typed[column] < 0).to_numpy(dtype=bool, na_value=False)
    flag("negative_id", negative)

    behavior = frame["behavior"]
    if not isinstance(behavior.dtype, pd.CategoricalDtype):
        behavior = behavior.astype("category")  # few distinct values: compare codes, not strings
    allowed = list(params["behaviors"])
    flag("unknown_behavior", ~behavior.isin(allowed).to_numpy())

    low, high = _timestamp_bounds(params)
    ts = typed["timestamp"]
    flag("timestamp_out_of_range", ((ts < low) | (ts > high)).to_numpy(dtype=bool, na_value=False))

    valid = reason == 0
    clean = pd.DataFrame(
        {
            c: typed[c].to_numpy(dtype=np.int64, na_value=0)[valid]
            if c in typed
            else frame[c].to_numpy()[valid]
            for c in LOG_COLUMNS
            if c != "behavior"
        }
    )
    for column in set(("user_id", "item_id", "category_id")) - set(raw.numeric_ids):
        clean[column] = clean[column].astype("str")
    clean["behavior"] = behavior[valid].cat.set_categories(allowed).array
    duplicate = clean.duplicated(["user_id", "item_id", "behavior", "timestamp"]).to_numpy()
    reason[np.flatnonzero(valid)[duplicate]] = REASONS.index("duplicate") + 1
    interactions = clean.loc[~duplicate, LOG_COLUMNS].reset_index(drop=True)

    bad = reason > 0
    notes = raw.notes[bad] if raw.notes is not None else None
    quarantine = pd.concat(
        [
            pd.DataFrame(
                {
                    "line": frame["line"].to_numpy()[bad],
                    "reason": np.asarray(REASONS, dtype=object)[reason[bad] - 1],
                    **{c: frame.loc[bad, c].astype("str").to_numpy() for c in LOG_COLUMNS},
                    "raw_text": notes,
                }
            ),
            *(
                pd.DataFrame(
                    {
                        "line": lines["line"].to_numpy(),
                        "reason": name,
                        "raw_text": lines["text"].to_numpy(),
                    }
                )
                for name, lines in (
                    ("malformed_row", raw.malformed),
                    ("bad_encoding", raw.bad_encoding),
                )
                if len(lines)
            ),
        ],
        ignore_index=True,
    )[QUARANTINE_COLUMNS]
    quarantine = quarantine.astype({c: "str" for c in QUARANTINE_COLUMNS[1:]}).sort_values(
        "line", kind="stable", ignore_index=True
    )
    counts = quarantine["reason"].value_counts()
    report = {
        "source": raw.source,
        "rows_in": raw.rows_in,
        "rows_kept": len(interactions),
        "rows_quarantined": len(quarantine),
        "quarantined_by_reason": {r: int(counts.get(r, 0)) for r in REASONS},
        "users": int(interactions["user_id"].nunique()),
        "items": int(interactions["item_id"].nunique()),
        "categories": int(interactions["category_id"].nunique()),
        "first_timestamp": int(interactions["timestamp"].min()) if len(interactions) else None,
        "last_timestamp": int(interactions["timestamp"].max()) if len(interactions) else None,
    }
    assert report["rows_in"] == report["rows_kept"] + report["rows_quarantined"]
    announce(report, raw.hint)
    return interactions, quarantine, report


def announce(report: dict, hint: str, engine: str = "") -> None:
    """Log what ingestion kept and quarantined; fail, naming the log, when it kept nothing."""
    found = {r: c for r, c in report["quarantined_by_reason"].items() if c}
    logger.info(
        "Ingested %s%s: %d rows in, %d kept, %d quarantined %s",
        report["source"],
        engine,
        report["rows_in"],
        report["rows_kept"],
        report["rows_quarantined"],
        found,
    )
    if not report["rows_kept"]:
        utf8 = " UTF-8 text" if found.get("bad_encoding") else ""
        raise RawLogError(
            f"No valid rows in raw log {report['source']}: all {report['rows_in']} were "
            f"quarantined {found}; {hint or 'expected rows of the log format'}{utf8}"
        )
