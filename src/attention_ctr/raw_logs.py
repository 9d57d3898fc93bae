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
import mmap
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from attention_ctr.errors import InputError
from attention_ctr.synthetic import LOG_COLUMNS

TAOBAO_COLUMNS = ["user", "item", "category", "behavior", "timestamp"]
MOVIELENS_RATINGS = ["userId", "movieId", "rating", "timestamp"]
MOVIELENS_MOVIES = ["movieId", "title", "genres"]
AMAZON_COLUMNS = ["user", "item", "time", "category"]
FORMATS = ("taobao", "movielens", "amazon")


class RawLogError(InputError):
    """A raw log file that cannot be ingested at all (unreadable, empty, wrong columns)."""


@dataclass
class RawEvents:
    """Parsed rows of one raw log, before validation.

    `frame` has a `line` column (the physical line in `source` where the row starts) and
    LOG_COLUMNS; a column is typed when every value parsed, else it holds the raw strings.
    `malformed` lists the rows that did not split into the expected number of fields and
    `bad_encoding` those whose fields are not UTF-8 text or hold a NUL byte (`line`, `text`).
    `rejected` maps a reason to a mask of `frame` rows the reader itself judged bad (e.g. a
    rating out of range), with `notes` (aligned with `frame`) saying what it saw.
    `numeric_ids` names the id columns that must be non-negative integers in this format.
    """

    frame: pd.DataFrame
    source: str
    numeric_ids: tuple[str, ...]
    malformed: pd.DataFrame = field(default_factory=lambda: _lines_table([]))
    bad_encoding: pd.DataFrame = field(default_factory=lambda: _lines_table([]))
    rejected: dict[str, np.ndarray] = field(default_factory=dict)
    notes: np.ndarray | None = None
    hint: str = ""

    @property
    def rows_in(self) -> int:
        return len(self.frame) + len(self.malformed) + len(self.bad_encoding)


def _lines_table(rows: list[tuple[int, str]]) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "line": pd.Series([n for n, _ in rows], dtype="int64"),
            "text": pd.Series([t for _, t in rows], dtype="str"),
        }
    )


def _hint(expected: list[str]) -> str:
    return f"expected CSV rows with columns {','.join(expected)}"


def _not_text(path: Path, what: str, expected: list[str]) -> RawLogError:
    return RawLogError(f"Raw log {path} is binary or not UTF-8 text ({what}); {_hint(expected)}")


def _first_line(path: Path, expected: list[str]) -> tuple[str, int]:
    """(The file's first non-empty line, the number of empty lines before it).

    Bytes that are not UTF-8 come back as U+FFFD: whether that row is data (quarantined) or
    the whole file is not text is the caller's call. RawLogError when missing or empty.
    """
    hint = _hint(expected)
    try:
        with path.open("rb") as fh:
            head = fh.read(64 * 1024)
    except OSError as exc:
        raise RawLogError(f"Cannot read raw log {path}: {exc.strerror or exc}; {hint}") from None
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise RawLogError(f"Raw log {path} is UTF-16 text, not UTF-8; {hint}")
    text = head.decode("utf-8", errors="replace").replace("\x00", "\ufffd")
    text = text.removeprefix("\ufeff")  # a byte-order mark, which the CSV parser skips too
    for number, line in enumerate(io.StringIO(text)):
        line = line.rstrip("\r\n")
        if line:  # the CSV parser skips only truly empty lines, not whitespace
            return line, number
    raise RawLogError(f"Raw log {path} is empty; {hint}")


def _split(line: str) -> list[str]:
    return next(csv.reader([line]))


def _decodes(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return b"\x00" not in data


def _scan_encoding(path: Path) -> dict[int, str]:
    """{physical line: text, bad bytes as U+FFFD} of the lines with non-UTF-8 or NUL bytes.

    Blocks end at a newline, so no character is cut; only blocks that fail to decode are
    looked at line by line (linear either way).
    """
    bad: dict[int, str] = {}
    line, carry = 1, b""
    with path.open("rb") as fh:
        while True:
            block = fh.read(16 << 20)
            chunk = carry + block
            if block:
                cut = chunk.rfind(b"\n") + 1
                if cut == 0:
                    carry = chunk
                    continue
                chunk, carry = chunk[:cut], chunk[cut:]
            if chunk and not _decodes(chunk):
                for offset, raw in enumerate(chunk.split(b"\n")):
                    if not _decodes(raw):
                        text = raw.decode("utf-8", "replace").replace("\x00", "\ufffd")
                        bad[line + offset] = text.rstrip("\r")
            line += chunk.count(b"\n")
            if not block:
                break
    return bad


def _sanitized(path: Path) -> pa.BufferReader:
    """The file with its non-UTF-8 and NUL bytes as U+FFFD (same lines, same fields)."""
    text = path.read_bytes().decode("utf-8", "replace").replace("\x00", "\ufffd")
    return pa.BufferReader(text.encode())


def _record_starts(path: Path, records: int) -> np.ndarray | None:
    """Physical line where each CSV record starts, or None when that is its record number.

    Records differ from lines only through quoted values holding newlines: a newline ends a
    record when an even number of quotes precede it (`""` escapes keep the parity).
    """
    with path.open("rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as data:
        if data.find(b'"') < 0:
            return None
        buf = np.frombuffer(data, dtype=np.uint8)
        quotes = np.flatnonzero(buf == ord('"'))
        newlines = np.flatnonzero(buf == ord("\n"))
        del buf  # the mmap cannot close while a view of it lives
    inside = np.searchsorted(quotes, newlines) % 2 == 1
    starts = np.concatenate([[1], np.flatnonzero(~inside) + 2]).astype(np.int64)
    if len(quotes) % 2 == 0 and len(starts) >= records:
        return starts
    # A quote inside an unquoted value breaks the parity: count as the csv module parses.
    starts_list, previous = [], 0
    with path.open(encoding="utf-8", errors="replace", newline="") as fh:
        reader = csv.reader(fh)
        for _ in reader:
            starts_list.append(previous + 1)
            previous = reader.line_num
    return np.asarray(starts_list + [previous + 1], dtype=np.int64)


def _line_count(path: Path) -> int:
    """Lines as the CSV parser counts records: newlines, plus an unterminated last line."""
    with path.open("rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as data:
        buf = np.frombuffer(data, dtype=np.uint8)
        count = int(np.count_nonzero(buf == ord("\n"))) + int(buf[-1] != ord("\n"))
        del buf  # the mmap cannot close while a view of it lives
    return count


def _has_nul(table: pa.Table) -> bool:
    for column in table.columns:
        for chunk in column.chunks:
            values = chunk.dictionary if pa.types.is_dictionary(chunk.type) else chunk
            if (
                pa.types.is_string(values.type)
                and pc.any(pc.match_substring(values, "\x00")).as_py()
            ):
                return True
    return False


def read_csv_rows(
    path: Path,
    columns: list[str],
    has_header: bool,
    types: dict[str, pa.DataType],
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Read `columns` of a CSV into (rows with a `line` column, malformed rows, rows with
    bytes that are not UTF-8 text).

    Clean files take a typed, multi-threaded pass. A file with bad values, lines or bytes is
    read again as strings on one thread, which is what gives exact line numbers for the
    quarantine. Line numbers are physical lines, also after quoted values holding newlines.
    """
    first, leading_empty = _first_line(path, columns)
    binary = "\ufffd" in first
    fields = _split(first)
    header_lines = leading_empty  # records before the first data row
    if has_header:
        if binary:
            raise _not_text(path, f"its header row is {first[:80]!r}", columns)
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
            if binary:
                raise _not_text(path, f"its first row is {first[:80]!r}", columns)
            raise RawLogError(
                f"Raw log {path} has {len(fields)} column(s) in its first row ({first[:80]!r}), "
                f"expected {len(columns)}: {','.join(columns)}"
            )
        column_names = columns
    quoted = _contains(path, b'"')
    lines = _line_count(path) if quoted else 0

    def read(
        source, typed: bool, threaded: bool, malformed: list, multiline: bool = quoted
    ) -> pa.Table:
        def on_bad_row(row) -> str:
            malformed.append((row.number, row.text))
            return "skip"

        column_types = types if typed else {c: pa.string() for c in columns}
        return pacsv.read_csv(
            source,
            read_options=pacsv.ReadOptions(
                column_names=column_names,
                skip_rows=header_lines if column_names else leading_empty,
                use_threads=threaded,
                block_size=16 << 20,
            ),
            # Empty lines stay rows (of missing values): row numbers are then record numbers.
            parse_options=pacsv.ParseOptions(
                invalid_row_handler=on_bad_row,
                ignore_empty_lines=False,
                newlines_in_values=multiline,  # else a block may be cut inside a value
            ),
            convert_options=pacsv.ConvertOptions(
                include_columns=columns,
                column_types=column_types,
                strings_can_be_null=True,
                quoted_strings_can_be_null=True,
            ),
        )

    bad: list = []
    encoding: dict[int, str] = {}
    try:
        # Quoted values rarely hold newlines (then records == lines): read as if none did,
        # and again allowing them only when the counts say otherwise.
        table = read(path, typed=True, threaded=True, malformed=bad, multiline=False)
        if quoted and header_lines + table.num_rows + len(bad) != lines:
            bad = []
            table = read(path, typed=True, threaded=True, malformed=bad)
        clean = not bad and not _has_nul(table)
    except pa.ArrowInvalid:
        clean = False
    except (OSError, pa.ArrowException) as exc:
        raise RawLogError(f"Cannot parse raw log {path} as CSV ({exc}); {_hint(columns)}") from None
    if not clean:
        bad = []
        encoding = _scan_encoding(path)
        source = _sanitized(path) if encoding else path
        try:
            table = read(source, typed=False, threaded=False, malformed=bad)
        except (OSError, pa.ArrowException) as exc:
            raise RawLogError(
                f"Cannot parse raw log {path} as CSV ({exc}); {_hint(columns)}"
            ) from None

    if table.num_rows + len(bad) == 0:
        raise RawLogError(f"Raw log {path} has no data rows; {_hint(columns)}")
    # Nullable Int64 keeps integer columns with missing values exact (float64 rounds past 2**53).
    nulls = any(column.null_count for column in table.columns)
    frame = table.to_pandas(types_mapper={pa.int64(): pd.Int64Dtype()}.get if nulls else None)

    # Record numbers (what the CSV parser counts, header included) -> physical lines.
    first_record = header_lines + 1
    bad_records = np.array([n for n, _ in bad], dtype=np.int64)
    records = np.arange(first_record, first_record + len(frame) + len(bad), dtype=np.int64)
    if len(bad):
        records = np.setdiff1d(records, bad_records, assume_unique=True)[: len(frame)]
    n_records = first_record - 1 + len(frame) + len(bad)
    starts = _record_starts(path, n_records) if quoted and n_records != lines else None

    def physical(record_numbers: np.ndarray) -> np.ndarray:
        return record_numbers if starts is None else starts[record_numbers - 1]

    encoded_badly = np.zeros(len(frame), dtype=bool)
    bad_text = np.full(len(frame), None, dtype=object)
    if encoding:  # rows on those lines whose fields read hold a replaced byte
        lines = np.fromiter(encoding, dtype=np.int64, count=len(encoding))
        record_of = lines if starts is None else np.searchsorted(starts, lines, side="right")
        position = np.searchsorted(records, record_of)
        found = position < len(records)
        found[found] = records[position[found]] == record_of[found]
        replaced = np.zeros(len(frame), dtype=bool)
        for column in columns:
            replaced |= frame[column].str.contains("\ufffd", regex=False, na=False).to_numpy()
        for line, row in zip(lines[found], position[found], strict=True):
            if replaced[row]:
                encoded_badly[row] = True
                bad_text[row] = encoding[int(line)] if bad_text[row] is None else bad_text[row]
    frame.insert(0, "line", physical(records))
    bad_encoding = pd.DataFrame(
        {
            "line": frame["line"].to_numpy()[encoded_badly],
            "text": pd.Series(bad_text[encoded_badly], dtype="str"),
        }
    )
    frame = frame.loc[~encoded_badly].reset_index(drop=True)
    malformed = _lines_table(
        list(zip(physical(bad_records).tolist(), [t for _, t in bad], strict=True))
    )
    return frame, malformed, bad_encoding


def _contains(path: Path, needle: bytes) -> bool:
    with path.open("rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as data:
        return data.find(needle) >= 0


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
    frame, malformed, bad_encoding = read_csv_rows(path, TAOBAO_COLUMNS, False, _TAOBAO_TYPES)
    frame.columns = ["line", *LOG_COLUMNS]
    return RawEvents(
        frame,
        str(path),
        ("user_id", "item_id", "category_id"),
        malformed,
        bad_encoding,
        hint=_hint(TAOBAO_COLUMNS),
    )


def write_taobao(events: pd.DataFrame, path: str | Path) -> None:
    """Write LOG_COLUMNS as a headerless Taobao UserBehavior CSV."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pandas(events[LOG_COLUMNS], preserve_index=False)
    table = table.set_column(3, "behavior", table.column("behavior").cast(pa.string()))
    pacsv.write_csv(table, path, write_options=pacsv.WriteOptions(include_header=False))


def read_movielens(
    directory: str | Path,
    fav_rating: float = 4.0,
    rating_range: tuple[float, float] = (0.5, 5.0),
) -> RawEvents:
    """MovieLens `ratings.csv` + `movies.csv`: a rating is a behaviour, first genre its category.

    Ratings of at least `fav_rating` stars become `fav`, lower ones `pv`. A rating that is not
    a number is rejected as `bad_type`, one outside `rating_range` (MovieLens: 0.5 to 5 stars)
    as `rating_out_of_range`: either would otherwise become a silently wrong behaviour.
    """
    directory = Path(directory)
    ratings_path, movies_path = directory / "ratings.csv", directory / "movies.csv"
    ratings, malformed, bad_encoding = read_csv_rows(
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
    movies, bad_movies, movies_bad_encoding = read_csv_rows(
        movies_path, MOVIELENS_MOVIES, True, {c: pa.string() for c in MOVIELENS_MOVIES}
    )
    if len(bad_movies) or len(movies_bad_encoding):
        first = min(bad_movies.line.tolist() + movies_bad_encoding.line.tolist())
        raise RawLogError(
            f"Raw log {movies_path} has {len(bad_movies) + len(movies_bad_encoding)} "
            f"malformed or non-UTF-8 line(s), first at line {first}: expected UTF-8 CSV rows "
            f"with columns {','.join(MOVIELENS_MOVIES)}"
        )
    first_genre = movies["genres"].astype("str").str.split("|", n=1).str[0]
    genre_of_movie = pd.Series(first_genre.to_numpy(), index=movies["movieId"].astype("str"))
    genre_of_movie = genre_of_movie[~genre_of_movie.index.duplicated()]
    category = ratings["movieId"].astype("str").map(genre_of_movie)

    text = ratings["rating"]
    present = text.notna().to_numpy().copy()
    if not pd.api.types.is_float_dtype(text.dtype):  # strings: some row did not parse
        present &= (text.astype("str").str.strip() != "").to_numpy()
    rating = pd.to_numeric(text, errors="coerce").to_numpy("float64", na_value=np.nan)
    low, high = (float(v) for v in rating_range)
    not_number = present & np.isnan(rating)  # "nan" too: not a rating
    out_of_range = present & ~np.isnan(rating) & ~((rating >= low) & (rating <= high))
    behavior = pd.Series(np.where(rating >= fav_rating, "fav", "pv"), dtype="str")
    behavior[(~present | not_number | out_of_range)] = None
    notes = np.full(len(ratings), None, dtype=object)
    judged = not_number | out_of_range
    notes[judged] = ("rating=" + text.astype("str")[judged]).to_numpy(dtype=object)
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
    return RawEvents(
        frame,
        str(ratings_path),
        ("user_id", "item_id"),
        malformed,
        bad_encoding,
        rejected={"bad_type": not_number, "rating_out_of_range": out_of_range},
        notes=notes,
        hint=_hint(MOVIELENS_RATINGS),
    )


def read_amazon(path: str | Path) -> RawEvents:
    """Amazon-style reviews CSV with a header naming `user,item,time,category` (more allowed).

    A review stands for a purchase (`buy`). Ids are kept as strings (reviewer ids, ASINs).
    """
    path = Path(path)
    frame, malformed, bad_encoding = read_csv_rows(
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
    return RawEvents(frame, str(path), (), malformed, bad_encoding, hint=_hint(AMAZON_COLUMNS))


READERS = {"taobao": read_taobao, "movielens": read_movielens, "amazon": read_amazon}
