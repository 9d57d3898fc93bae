"""Readers (adapters) that turn raw behaviour logs of each supported format into one raw table.

A reader only parses: it maps the format's columns onto `user_id, item_id, category_id,
behavior, timestamp` and keeps every row it could split into fields, typed where the whole file
parses cleanly and as strings where it does not. Judging rows (types, ranges, duplicates) is the
ingestion pipeline's job, so every row is either kept or quarantined there with a reason.

A file that cannot be read at all, or whose columns are not the format's, raises `RawLogError`
naming the file and the columns expected.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv

from attention_ctr.synthetic import LOG_COLUMNS

TAOBAO_COLUMNS = ["user", "item", "category", "behavior", "timestamp"]
MOVIELENS_RATINGS = ["userId", "movieId", "rating", "timestamp"]
MOVIELENS_MOVIES = ["movieId", "title", "genres"]
AMAZON_COLUMNS = ["user", "item", "time", "category"]
FORMATS = ("taobao", "movielens", "amazon")


class RawLogError(ValueError):
    """A raw log file that cannot be ingested at all (unreadable, empty, wrong columns)."""


@dataclass
class RawEvents:
    """Parsed rows of one raw log, before validation.

    `frame` has a `line` column (the row's line number in `source`) and LOG_COLUMNS; a column is
    typed when every value parsed, else it holds the raw strings. `malformed` lists the lines
    that did not split into the expected number of fields (`line`, `text`).
    `numeric_ids` names the id columns that must be non-negative integers in this format.
    """

    frame: pd.DataFrame
    source: str
    numeric_ids: tuple[str, ...]
    malformed: pd.DataFrame = field(
        default_factory=lambda: pd.DataFrame({"line": pd.Series(dtype="int64"), "text": []})
    )

    @property
    def rows_in(self) -> int:
        return len(self.frame) + len(self.malformed)


def _hint(expected: list[str]) -> str:
    return f"expected CSV rows with columns {','.join(expected)}"


def _first_line(path: Path, expected: list[str]) -> tuple[str, int]:
    """(The file's first non-empty line, the number of empty lines before it).

    RawLogError when the file is missing, binary or empty.
    """
    hint = _hint(expected)
    try:
        with path.open("rb") as fh:
            head = fh.read(64 * 1024)
    except OSError as exc:
        raise RawLogError(f"Cannot read raw log {path}: {exc.strerror or exc}; {hint}") from None
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start < len(head) - 4:  # not just a multi-byte char cut at the buffer's end
            raise RawLogError(f"Raw log {path} is not UTF-8 text; {hint}") from None
        text = head[: exc.start].decode("utf-8")
    text = text.removeprefix("\ufeff")  # a byte-order mark, which the CSV parser skips too
    if "\x00" in text:
        raise RawLogError(f"Raw log {path} is binary, not CSV text; {hint}")
    for number, line in enumerate(io.StringIO(text)):
        line = line.rstrip("\r\n")
        if line:  # the CSV parser skips only truly empty lines, not whitespace
            return line, number
    raise RawLogError(f"Raw log {path} is empty; {hint}")


def _split(line: str) -> list[str]:
    return next(csv.reader([line]))


def read_csv_rows(
    path: Path,
    columns: list[str],
    has_header: bool,
    types: dict[str, pa.DataType],
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Read `columns` of a CSV into (rows with a `line` column, malformed lines).

    Clean files take a typed, multi-threaded pass. A file with bad values or lines is read
    again as strings on one thread, which is what gives exact line numbers for the quarantine.
    """
    first, leading_empty = _first_line(path, columns)
    fields = _split(first)
    header_lines = leading_empty  # lines before the first data row
    if has_header:
        missing = [c for c in columns if c not in fields]
        if missing:
            raise RawLogError(
                f"Raw log {path} lacks column(s) {missing}: its header is {fields}, "
                f"expected columns {','.join(columns)}"
            )
        header_lines += 1
        column_names = None
    else:
        if [f.strip().lower() for f in fields] == [c.lower() for c in columns]:
            header_lines += 1  # a header row the format does not need: not a data row
        elif len(fields) != len(columns):
            raise RawLogError(
                f"Raw log {path} has {len(fields)} column(s) in its first row ({first[:80]!r}), "
                f"expected {len(columns)}: {','.join(columns)}"
            )
        column_names = columns

    def read(typed: bool, threaded: bool, malformed: list) -> pa.Table:
        def on_bad_row(row) -> str:
            malformed.append((row.number, row.text))
            return "skip"

        column_types = types if typed else {c: pa.string() for c in columns}
        return pacsv.read_csv(
            path,
            read_options=pacsv.ReadOptions(
                column_names=column_names,
                skip_rows=header_lines if column_names else leading_empty,
                use_threads=threaded,
                block_size=16 << 20,
            ),
            # Empty lines stay rows (of missing values): row numbers are then file line numbers.
            parse_options=pacsv.ParseOptions(
                invalid_row_handler=on_bad_row, ignore_empty_lines=False
            ),
            convert_options=pacsv.ConvertOptions(
                include_columns=columns,
                column_types=column_types,
                strings_can_be_null=True,
                quoted_strings_can_be_null=True,
            ),
        )

    bad: list = []
    try:
        table = read(typed=True, threaded=True, malformed=bad)
        clean = not bad
    except pa.ArrowInvalid:
        clean = False
    except (OSError, pa.ArrowException) as exc:
        raise RawLogError(f"Cannot parse raw log {path} as CSV ({exc}); {_hint(columns)}") from None
    if not clean:
        bad = []
        try:
            table = read(typed=False, threaded=False, malformed=bad)
        except (OSError, pa.ArrowException) as exc:
            raise RawLogError(
                f"Cannot parse raw log {path} as CSV ({exc}); {_hint(columns)}"
            ) from None

    if table.num_rows + len(bad) == 0:
        raise RawLogError(f"Raw log {path} has no data rows; {_hint(columns)}")
    # Nullable Int64 keeps integer columns with missing values exact (float64 rounds past 2**53).
    nulls = any(column.null_count for column in table.columns)
    frame = table.to_pandas(types_mapper={pa.int64(): pd.Int64Dtype()}.get if nulls else None)
    first_line = header_lines + 1
    if bad:
        bad_lines = np.array([n for n, _ in bad], dtype=np.int64)
        all_lines = np.arange(first_line, first_line + len(frame) + len(bad), dtype=np.int64)
        lines = np.setdiff1d(all_lines, bad_lines, assume_unique=True)[: len(frame)]
    else:
        lines = np.arange(first_line, first_line + len(frame), dtype=np.int64)
    frame.insert(0, "line", lines)
    malformed = pd.DataFrame(
        {
            "line": pd.Series([n for n, _ in bad], dtype="int64"),
            "text": pd.Series([t for _, t in bad], dtype="str"),
        }
    )
    return frame, malformed


_TAOBAO_TYPES = {
    "user": pa.int64(),
    "item": pa.int64(),
    "category": pa.int64(),
    "behavior": pa.dictionary(pa.int32(), pa.string()),
    "timestamp": pa.int64(),
}


def read_taobao(path: str | Path) -> RawEvents:
    """Taobao UserBehavior CSV: no header, `user,item,category,behavior,timestamp`."""
    path = Path(path)
    frame, malformed = read_csv_rows(path, TAOBAO_COLUMNS, False, _TAOBAO_TYPES)
    frame.columns = ["line", *LOG_COLUMNS]
    return RawEvents(frame, str(path), ("user_id", "item_id", "category_id"), malformed)


def write_taobao(events: pd.DataFrame, path: str | Path) -> None:
    """Write LOG_COLUMNS as a headerless Taobao UserBehavior CSV."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pandas(events[LOG_COLUMNS], preserve_index=False)
    table = table.set_column(3, "behavior", table.column("behavior").cast(pa.string()))
    pacsv.write_csv(table, path, write_options=pacsv.WriteOptions(include_header=False))


def read_movielens(directory: str | Path, fav_rating: float = 4.0) -> RawEvents:
    """MovieLens `ratings.csv` + `movies.csv`: a rating is a behaviour, first genre its category.

    Ratings of at least `fav_rating` stars become `fav`, lower ones `pv`; a rating that is not a
    number leaves the behaviour missing, so the row is quarantined.
    """
    directory = Path(directory)
    ratings_path, movies_path = directory / "ratings.csv", directory / "movies.csv"
    ratings, malformed = read_csv_rows(
        ratings_path,
        MOVIELENS_RATINGS,
        True,
        {
            "userId": pa.int64(),
            "movieId": pa.int64(),
            "rating": pa.float64(),
            "timestamp": pa.int64(),
        },
    )
    movies, bad_movies = read_csv_rows(
        movies_path, MOVIELENS_MOVIES, True, {c: pa.string() for c in MOVIELENS_MOVIES}
    )
    if len(bad_movies):
        raise RawLogError(
            f"Raw log {movies_path} has {len(bad_movies)} malformed line(s), first at line "
            f"{int(bad_movies.line.iloc[0])}: expected columns {','.join(MOVIELENS_MOVIES)}"
        )
    first_genre = movies["genres"].astype("str").str.split("|", n=1).str[0]
    genre_of_movie = pd.Series(first_genre.to_numpy(), index=movies["movieId"].astype("str"))
    genre_of_movie = genre_of_movie[~genre_of_movie.index.duplicated()]
    category = ratings["movieId"].astype("str").map(genre_of_movie)
    rating = pd.to_numeric(ratings["rating"], errors="coerce")
    behavior = pd.Series(np.where(rating >= fav_rating, "fav", "pv"), dtype="str")
    behavior[rating.isna().to_numpy()] = None
    frame = pd.DataFrame(
        {
            "line": ratings["line"],
            "user_id": ratings["userId"],
            "item_id": ratings["movieId"],
            "category_id": category.astype("str").where(category.notna(), None),
            "behavior": behavior,
            "timestamp": ratings["timestamp"],
        }
    )
    return RawEvents(frame, str(ratings_path), ("user_id", "item_id"), malformed)


def read_amazon(path: str | Path) -> RawEvents:
    """Amazon-style reviews CSV with a header naming `user,item,time,category` (more allowed).

    A review stands for a purchase (`buy`). Ids are kept as strings (reviewer ids, ASINs).
    """
    path = Path(path)
    frame, malformed = read_csv_rows(
        path,
        AMAZON_COLUMNS,
        True,
        {"user": pa.string(), "item": pa.string(), "time": pa.int64(), "category": pa.string()},
    )
    frame = pd.DataFrame(
        {
            "line": frame["line"],
            "user_id": frame["user"],
            "item_id": frame["item"],
            "category_id": frame["category"],
            "behavior": pd.Series("buy", index=frame.index, dtype="str"),
            "timestamp": frame["time"],
        }
    )
    return RawEvents(frame, str(path), (), malformed)


READERS = {"taobao": read_taobao, "movielens": read_movielens, "amazon": read_amazon}
