"""The ingestion pipeline end to end: real Kedro sessions on synthetic, real and broken logs."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import SMALL_SYNTHETIC
from sandbox import run_pipeline

LOG_COLUMNS = ["user_id", "item_id", "category_id", "behavior", "timestamp"]
VERSION = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}\.\d{2}\.\d{2}\.\d{3}Z$")
REPORTING = Path("data/08_reporting/ingestion")


def ingest(project: Path, env: str | None = None, **params):
    """Run `ingestion` (generator kept small even when unused) and return the catalog."""
    return run_pipeline(project, "ingestion", {**SMALL_SYNTHETIC, **params}, env=env)


def assert_accounting(report: dict) -> None:
    assert report["rows_in"] == report["rows_kept"] + report["rows_quarantined"]
    assert sum(report["quarantined_by_reason"].values()) == report["rows_quarantined"]


def versions(project: Path, dataset: str) -> list[Path]:
    """Version folders of a versioned dataset, each checked to hold its file."""
    folders = sorted((project / REPORTING / dataset).iterdir())
    for folder in folders:
        assert VERSION.match(folder.name), folder.name
        assert (folder / dataset).is_file()
    return folders


def reasons_by_line(quarantine: pd.DataFrame) -> dict[int, str]:
    """{file line: reason}; each quarantined line appears once."""
    assert quarantine["line"].is_unique
    return dict(quarantine.set_index("line")["reason"].astype(str))


def messages(exc: BaseException) -> str:
    """Text of an exception and of everything it was raised from (Kedro may wrap errors)."""
    parts, seen = [], set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        parts.append(str(exc))
        exc = exc.__cause__ or exc.__context__
    return "\n".join(parts)


def put_raw(project: Path, relative: str, content: bytes | str) -> Path:
    path = project / "data" / "01_raw" / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, str):
        content = content.encode()
    path.write_bytes(content)
    return path


# ------------------------------------------------------------------------- synthetic default


def test_synthetic_ingestion_produces_typed_interactions_and_versioned_reports(project):
    catalog = ingest(project)
    interactions = catalog.load("interactions")
    report = catalog.load("ingestion_report")

    assert list(interactions.columns) == LOG_COLUMNS
    for column in ("user_id", "item_id", "category_id", "timestamp"):
        assert interactions[column].dtype == np.int64, column
    assert set(interactions["behavior"].astype(str)) <= {"pv", "cart", "fav", "buy"}
    assert (interactions[["user_id", "item_id", "category_id"]] > 0).all().all()

    assert report["rows_in"] == SMALL_SYNTHETIC["ingestion.synthetic.events"]
    assert_accounting(report)
    assert report["rows_kept"] == len(interactions)
    # The generator's output is valid by construction except for chance exact duplicates.
    assert report["rows_quarantined"] == report["quarantined_by_reason"]["duplicate"]
    assert report["users"] == SMALL_SYNTHETIC["ingestion.synthetic.users"]
    assert report["categories"] <= SMALL_SYNTHETIC["ingestion.synthetic.categories"]

    # Quarantine and report are versioned: <filepath>/<timestamp>/<basename>, one per run.
    (report_version,) = versions(project, "ingestion_report.json")
    (quarantine_version,) = versions(project, "quarantined_rows.parquet")
    assert json.loads((report_version / "ingestion_report.json").read_text()) == report
    assert (
        len(pd.read_parquet(quarantine_version / "quarantined_rows.parquet"))
        == report["rows_quarantined"]
    )

    # Same seed, same data: a second run writes new versions of identical content.
    again = ingest(project)
    pd.testing.assert_frame_equal(again.load("interactions"), interactions)
    assert len(versions(project, "ingestion_report.json")) == 2
    assert len(versions(project, "quarantined_rows.parquet")) == 2


# ------------------------------------------------------------------------------ real formats


def test_taobao_sample_ingests_every_row(project, shared_data):
    source = shared_data / "taobao-userbehavior-sample" / "UserBehavior.csv"
    put_raw(project, "taobao/UserBehavior.csv", source.read_bytes())
    catalog = ingest(project, env="taobao")
    report = catalog.load("ingestion_report")
    interactions = catalog.load("interactions")

    expected = pd.read_csv(source, header=None, names=LOG_COLUMNS)
    assert report["source"].endswith("data/01_raw/taobao/UserBehavior.csv")
    assert report["rows_in"] == len(expected)
    assert_accounting(report)
    assert report["rows_kept"] == len(interactions) > 0.99 * len(expected)
    assert report["users"] == expected["user_id"].nunique()
    assert 1 < report["users"] < report["items"] <= len(expected)
    assert 1 < report["categories"] <= report["items"]
    kept = interactions.astype({"behavior": str}).merge(expected, how="left", indicator=True)
    assert (kept["_merge"] == "both").all(), "every kept row is a row of the file"


def test_movielens_ratings_become_behaviours_with_first_genre(project, shared_data):
    source = shared_data / "movielens-latest-small"
    for name in ("ratings.csv", "movies.csv"):
        put_raw(project, f"movielens/{name}", (source / name).read_bytes())
    catalog = ingest(project, env="movielens")
    report = catalog.load("ingestion_report")
    interactions = catalog.load("interactions")

    ratings = pd.read_csv(source / "ratings.csv")
    movies = pd.read_csv(source / "movies.csv")
    assert report["rows_in"] == len(ratings)
    assert_accounting(report)
    assert report["rows_kept"] == len(interactions) > 0.99 * len(ratings)
    assert report["users"] == ratings["userId"].nunique()
    assert report["items"] == ratings["movieId"].nunique()
    assert interactions["user_id"].dtype == interactions["item_id"].dtype == np.int64

    first_genre = movies.set_index("movieId")["genres"].str.split("|").str[0]
    joined = interactions.merge(
        ratings.rename(columns={"userId": "user_id", "movieId": "item_id"}),
        on=["user_id", "item_id", "timestamp"],
    )
    assert len(joined) == len(interactions)
    assert (joined["category_id"] == joined["item_id"].map(first_genre)).all()
    assert {"Comedy", "Drama", "Action"} <= set(interactions["category_id"])
    assert "Comedy|Drama" not in set(interactions["category_id"])
    favs = joined["behavior"].astype(str) == "fav"
    assert (favs == (joined["rating"] >= 4.0)).all()
    assert set(joined["behavior"].astype(str)) == {"fav", "pv"}


def test_amazon_style_reviews_keep_string_ids(project):
    put_raw(
        project,
        "amazon/reviews.csv",
        # Columns in their own order, plus one the format does not use.
        "rating,item,user,category,time\n"
        "5,0001,A1,Books,1400000000\n"
        "4,0002,A1,Books,1400000100\n"
        "3,B00X,A2,Toys,1400000200\n"
        "3,B00X,A2,Toys,1400000200\n"  # exact duplicate of line 4
        "1,0003,A3,Books,yesterday\n"  # time is not a number
        "2,0004,,Books,1400000300\n",  # no user
    )
    catalog = ingest(project, env="amazon")
    report = catalog.load("ingestion_report")
    interactions = catalog.load("interactions")
    quarantine = catalog.load("quarantined_rows")

    assert report["rows_in"] == 6
    assert_accounting(report)
    assert interactions["user_id"].tolist() == ["A1", "A1", "A2"]
    assert interactions["item_id"].tolist() == ["0001", "0002", "B00X"], "leading zeros kept"
    assert interactions["category_id"].tolist() == ["Books", "Books", "Toys"]
    assert set(interactions["behavior"].astype(str)) == {"buy"}
    assert interactions["timestamp"].dtype == np.int64
    assert reasons_by_line(quarantine) == {
        5: "duplicate",
        6: "bad_type",
        7: "missing_value",
    }


# ----------------------------------------------------------------------------- quarantine

GOOD = "100,200,300,pv,1511544070"
# (line text, expected reason or None for a good row); line numbers are positions + 1.
CORPUS = [
    (GOOD, None),
    ("abc,200,300,pv,1511544071", "bad_type"),
    ("101,1.5,300,pv,1511544072", "bad_type"),
    ("102,201,300,click,1511544073", "unknown_behavior"),
    ("103,201,300,pv,-5", "timestamp_out_of_range"),
    ("104,201,300,pv,99999999999", "timestamp_out_of_range"),  # year 5138
    ("105,-7,300,pv,1511544074", "negative_id"),
    ("106,201,300,buy,1511544075", None),
    (GOOD, "duplicate"),
    ("107,,300,pv,1511544076", "missing_value"),
    ("108,201,300,,1511544077", "missing_value"),
    ("109,201,300", "malformed_row"),
    ("110,201,300,pv,1511544078,extra", "malformed_row"),
    ("", "missing_value"),  # an empty line is a row with nothing in it
    ("111,202,301,cart,1511544079", None),
    ("112,202,301,fav,1511544080", None),
]


def test_every_bad_row_is_quarantined_with_its_reason_and_line(project):
    put_raw(project, "taobao/UserBehavior.csv", "\n".join(t for t, _ in CORPUS) + "\n")
    catalog = ingest(project, env="taobao")
    report = catalog.load("ingestion_report")
    interactions = catalog.load("interactions")
    quarantine = catalog.load("quarantined_rows")

    expected_bad = {line: reason for line, (_, reason) in enumerate(CORPUS, 1) if reason}
    assert reasons_by_line(quarantine) == expected_bad
    assert report["rows_in"] == len(CORPUS)
    assert report["rows_kept"] == len(CORPUS) - len(expected_bad)
    assert_accounting(report)
    for reason in set(expected_bad.values()):
        assert report["quarantined_by_reason"][reason] == sum(
            r == reason for r in expected_bad.values()
        )

    good = [t for t, r in CORPUS if r is None]
    assert interactions["user_id"].tolist() == [int(t.split(",")[0]) for t in good]
    assert interactions["timestamp"].tolist() == [int(t.split(",")[4]) for t in good]
    # What was read stays visible: parsed fields for bad values, the raw text for bad lines.
    by_line = quarantine.set_index("line")
    assert by_line.loc[2, "user_id"] == "abc"
    assert by_line.loc[3, "item_id"] == "1.5"
    assert by_line.loc[12, "raw_text"] == "109,201,300"
    assert by_line.loc[13, "raw_text"] == "110,201,300,pv,1511544078,extra"


def test_bad_rows_in_an_otherwise_typed_file_keep_line_numbers(project):
    """A file whose values all parse as numbers takes the fast path: lines must still be exact."""
    lines = [GOOD, "", "101,201,300,pv,1511544071", "102,-1,300,pv,1511544072", "", GOOD]
    put_raw(project, "taobao/UserBehavior.csv", "\n".join(lines) + "\n")
    catalog = ingest(project, env="taobao")
    quarantine = catalog.load("quarantined_rows")
    assert reasons_by_line(quarantine) == {
        2: "missing_value",
        4: "negative_id",
        5: "missing_value",
        6: "duplicate",
    }
    assert_accounting(catalog.load("ingestion_report"))


# ------------------------------------------------------------------------- unreadable files


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"", "empty"),
        (b"\n\n", "empty"),
        (b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03\xff\xfe\xfd" * 8, "UTF-8"),
        (b"\x00\x01\x02\x03" * 32, "binary"),
        ("1,caf\xe9,3,pv,1511544070\n".encode("latin-1"), "UTF-8"),
        (b"1,2,3\n4,5,6\n", "3 column(s)"),
        (b"user,item,category,behavior,timestamp\n", "no data rows"),
    ],
    ids=["empty", "blank-lines", "gzip-bytes", "nul-bytes", "latin-1", "3-columns", "header-only"],
)
def test_unreadable_taobao_file_fails_naming_file_and_columns(project, content, problem):
    put_raw(project, "taobao/UserBehavior.csv", content)
    with pytest.raises(Exception) as caught:
        ingest(project, env="taobao")
    text = messages(caught.value)
    assert "data/01_raw/taobao/UserBehavior.csv" in text
    assert "user,item,category,behavior,timestamp" in text
    assert problem in text


def test_movielens_ratings_without_a_column_fails_naming_it(project, shared_data):
    source = shared_data / "movielens-latest-small"
    put_raw(project, "movielens/movies.csv", (source / "movies.csv").read_bytes())
    put_raw(
        project,
        "movielens/ratings.csv",
        "userId,movieId,timestamp\n1,1,964982703\n1,3,964981247\n",
    )
    with pytest.raises(Exception) as caught:
        ingest(project, env="movielens")
    text = messages(caught.value)
    assert "data/01_raw/movielens/ratings.csv" in text
    assert "userId,movieId,rating,timestamp" in text
    assert "'rating'" in text  # the missing column, named


def test_movielens_directory_without_movies_fails_naming_the_file(project):
    ratings = "userId,movieId,rating,timestamp\n1,1,4.0,964982703\n"
    put_raw(project, "movielens/ratings.csv", ratings)
    with pytest.raises(Exception) as caught:
        ingest(project, env="movielens")
    text = messages(caught.value)
    assert "data/01_raw/movielens/movies.csv" in text
    assert "movieId,title,genres" in text


def test_file_of_only_bad_rows_fails_with_counts(project):
    rows = ["1,2,3,click,1511544070", "1,2,3,pv,-1", "x,2,3,pv,1511544070", "1,2,3"]
    put_raw(project, "taobao/UserBehavior.csv", "\n".join(rows) + "\n")
    with pytest.raises(Exception) as caught:
        ingest(project, env="taobao")
    text = messages(caught.value)
    assert "UserBehavior.csv" in text
    assert "all 4" in text
    for reason in ("unknown_behavior", "timestamp_out_of_range", "bad_type", "malformed_row"):
        assert f"'{reason}': 1" in text


def test_missing_raw_file_fails_naming_it(project):
    with pytest.raises(Exception) as caught:
        ingest(project, env="amazon")
    text = messages(caught.value)
    assert "data/01_raw/amazon/reviews.csv" in text
    assert "user,item,time,category" in text


def test_real_taobao_sample_survives_a_copy_with_noise(project, shared_data):
    """Real rows plus a few broken ones: the real rows are all kept, the broken ones counted."""
    source = shared_data / "taobao-userbehavior-sample" / "UserBehavior.csv"
    text = source.read_text()
    noisy = text + "1,2,3,pv\n1,2,3,pv,notatime\n" + text.splitlines()[0] + "\n"
    put_raw(project, "taobao/UserBehavior.csv", noisy)
    catalog = ingest(project, env="taobao")
    report = catalog.load("ingestion_report")
    real_rows = len(text.splitlines())
    assert report["rows_in"] == real_rows + 3
    assert report["rows_kept"] == real_rows
    assert report["quarantined_by_reason"]["malformed_row"] == 1
    assert report["quarantined_by_reason"]["bad_type"] == 1
    assert report["quarantined_by_reason"]["duplicate"] == 1
    quarantine = catalog.load("quarantined_rows")
    assert quarantine["line"].tolist() == [real_rows + 1, real_rows + 2, real_rows + 3]
