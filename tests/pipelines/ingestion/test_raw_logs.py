"""Format readers: what each raw format turns into, and how unreadable files are reported."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from attention_ctr.pipelines.ingestion.nodes import validate_behavior_logs
from attention_ctr.raw_logs import (
    RawLogError,
    read_amazon,
    read_movielens,
    read_taobao,
    write_taobao,
)
from attention_ctr.synthetic import SyntheticLogConfig, generate_behavior_logs

VALIDATION = {"behaviors": ["pv", "cart", "fav", "buy"], "min_timestamp": "1990-01-01"}


def write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return path


def validate(raw, **params):
    return validate_behavior_logs(raw, {**VALIDATION, **params})


def test_synthetic_log_round_trips_through_the_taobao_format(tmp_path):
    config = SyntheticLogConfig(users=40, items=200, categories=6, events=900)
    events = generate_behavior_logs(config)
    path = tmp_path / "UserBehavior.csv"
    write_taobao(events, path)
    assert path.read_text().splitlines()[0].count(",") == 4  # headerless, 5 fields

    raw = read_taobao(path)
    assert raw.rows_in == len(events)
    assert raw.frame["line"].tolist() == list(range(1, len(events) + 1))
    interactions, quarantine, report = validate(raw)
    assert report["rows_in"] == report["rows_kept"] + report["rows_quarantined"]
    kept = events.drop_duplicates(["user_id", "item_id", "behavior", "timestamp"])
    pd.testing.assert_frame_equal(
        interactions.astype({"behavior": str}),
        kept.reset_index(drop=True).astype({"behavior": str}),
    )


def test_taobao_header_row_and_crlf_are_tolerated(tmp_path):
    path = write(
        tmp_path / "ub.csv",
        "user,item,category,behavior,timestamp\r\n1,2,3,pv,1511544070\r\n4,5,6,buy,1511544071\r\n",
    )
    raw = read_taobao(path)
    assert raw.rows_in == 2
    assert raw.frame["line"].tolist() == [2, 3]
    interactions, _, _ = validate(raw)
    assert interactions["user_id"].tolist() == [1, 4]
    assert interactions["behavior"].astype(str).tolist() == ["pv", "buy"]


def test_line_numbers_count_leading_and_inner_empty_lines(tmp_path):
    path = write(tmp_path / "ub.csv", "\n\n1,2,3,pv,1511544070\n\n1,x,3,pv,1511544071\n1,2\n")
    raw = read_taobao(path)
    _, quarantine, report = validate(raw)
    assert report["rows_kept"] == 1
    assert dict(zip(quarantine["line"], quarantine["reason"], strict=True)) == {
        4: "missing_value",
        5: "bad_type",
        6: "malformed_row",
    }


def test_ids_beyond_float_precision_stay_exact(tmp_path):
    big = 2**53 + 1  # float64 would round it onto 2**53
    path = write(
        tmp_path / "ub.csv",
        f"{big},1,1,pv,1511544070\n{big - 1},1,1,pv,1511544070\n{big + 2},,1,pv,1511544071\n",
    )
    interactions, quarantine, _ = validate(read_taobao(path))
    assert interactions["user_id"].tolist() == [big, big - 1], "no duplicate by rounding"
    assert quarantine["reason"].tolist() == ["missing_value"]
    # Same when a bad value sends the whole file through the string parser.
    with path.open("a") as fh:
        fh.write("oops,1,1,pv,1511544072\n")
    interactions, quarantine, _ = validate(read_taobao(path))
    assert interactions["user_id"].tolist() == [big, big - 1]
    assert quarantine["reason"].tolist() == ["missing_value", "bad_type"]


def test_movielens_one_rating_without_movie_does_not_hide_the_others(tmp_path):
    write(
        tmp_path / "ml" / "ratings.csv",
        (
            "userId,movieId,rating,timestamp\n"
            "1,1,4.0,964982703\n"
            "1,,4.0,964982704\n"
            "2,2,3.5,964982705\n"
            "2,99,1.0,964982706\n"  # a movie movies.csv does not know: no category
        ),
    )
    write(
        tmp_path / "ml" / "movies.csv",
        (
            "movieId,title,genres\n"
            '1,"American President, The (1995)",Comedy|Drama|Romance\n'
            "2,Heat (1995),Action|Crime|Thriller\n"
        ),
    )
    raw = read_movielens(tmp_path / "ml")
    interactions, quarantine, _ = validate(raw)
    assert interactions["item_id"].tolist() == [1, 2]
    assert interactions["category_id"].tolist() == ["Comedy", "Action"]
    assert interactions["behavior"].astype(str).tolist() == ["fav", "pv"]
    assert dict(zip(quarantine["line"], quarantine["reason"], strict=True)) == {
        3: "missing_value",
        5: "missing_value",
    }


def test_movielens_fav_threshold_is_a_read_argument(tmp_path):
    write(tmp_path / "ml" / "ratings.csv", "userId,movieId,rating,timestamp\n1,1,3.5,964982703\n")
    write(tmp_path / "ml" / "movies.csv", "movieId,title,genres\n1,Heat (1995),Action\n")
    assert read_movielens(tmp_path / "ml").frame["behavior"].tolist() == ["pv"]
    assert read_movielens(tmp_path / "ml", fav_rating=3.0).frame["behavior"].tolist() == ["fav"]


def test_amazon_header_with_byte_order_mark_is_recognised(tmp_path):
    bom = b"\xef\xbb\xbf"
    path = write(tmp_path / "r.csv", bom + b"user,item,time,category\nA1,0001,1400000000,Books\n")
    raw = read_amazon(path)
    assert raw.frame["user_id"].tolist() == ["A1"]
    assert raw.frame["item_id"].tolist() == ["0001"]


@pytest.mark.parametrize(
    ("reader", "name", "content", "expected"),
    [
        (read_amazon, "r.csv", "user,item,category\nA,B,C\n", "user,item,time,category"),
        (read_amazon, "r.csv", "", "user,item,time,category"),
        (read_taobao, "ub.csv", "1;2;3;pv;1511544070\n", "user,item,category,behavior,timestamp"),
        (read_taobao, "ub.csv", b"\xff\xfe1\x002\x00", "user,item,category,behavior,timestamp"),
    ],
    ids=["amazon-missing-time", "amazon-empty", "taobao-semicolons", "taobao-utf16"],
)
def test_unreadable_files_raise_naming_file_and_columns(tmp_path, reader, name, content, expected):
    path = write(tmp_path / name, content)
    with pytest.raises(RawLogError) as caught:
        reader(path)
    assert str(path) in str(caught.value)
    assert expected in str(caught.value)


@pytest.mark.parametrize(
    "bad_byte", [b"\xe9", b"\x00", b"\xff\xfe"], ids=["latin-1", "nul", "ff-fe"]
)
@pytest.mark.parametrize("good_rows_before", [2, 5000], ids=["near-start", "past-64KiB"])
def test_one_bad_byte_quarantines_only_its_row_wherever_it_is(tmp_path, bad_byte, good_rows_before):
    rows = [f"{u},2,3,pv,{1511544070 + u}".encode() for u in range(1, good_rows_before + 1)]
    rows.append(b"99,2,3,p" + bad_byte + b"v,1511544070")
    rows.append(b"100,2,3,pv,1511544071")
    path = write(tmp_path / "ub.csv", b"\n".join(rows) + b"\n")
    interactions, quarantine, report = validate(read_taobao(path))
    assert report["rows_in"] == len(rows)
    assert report["rows_kept"] == len(rows) - 1
    assert quarantine["reason"].tolist() == ["bad_encoding"]
    assert quarantine["line"].tolist() == [good_rows_before + 1]
    assert "\ufffd" in quarantine["raw_text"].iloc[0]  # what was there stays visible


def test_bad_byte_in_an_amazon_multi_line_review_is_quarantined_at_its_line(tmp_path):
    path = write(
        tmp_path / "r.csv",
        b"user,item,time,category,review\n"
        b'A1,I1,1400000000,Books,"great\nbook"\n'
        b'A2,I2,1400000001,B\xe9ooks,"meh\n\nreally"\n'
        b"A3,I3,1400000002,Books,ok\n"
        b"A4,I4,1400000003\n",
    )
    interactions, quarantine, report = validate(read_amazon(path))
    assert interactions["user_id"].tolist() == ["A1", "A3"]
    assert dict(zip(quarantine["line"], quarantine["reason"], strict=True)) == {
        4: "bad_encoding",
        8: "malformed_row",
    }
    assert report["rows_in"] == report["rows_kept"] + report["rows_quarantined"] == 4


def test_quarantine_lines_are_physical_lines_after_multi_line_quoted_values(tmp_path):
    path = write(
        tmp_path / "r.csv",
        "user,item,time,category,review\n"
        'A1,I1,1400000000,Books,"line one\nline two\r\nline ""three"""\n'
        "A2,I2,yesterday,Books,short\n"
        '"A3",I3,1400000002,Toys,"a\n\nb"\n'
        "A3,I3,1400000002,Toys,dup\n"
        "A4,I4\n",
    )
    raw = read_amazon(path)
    assert raw.frame["line"].tolist() == [2, 5, 6, 9]
    _, quarantine, report = validate(raw)
    assert dict(zip(quarantine["line"], quarantine["reason"], strict=True)) == {
        5: "bad_type",
        9: "duplicate",
        10: "malformed_row",
    }
    assert report["rows_in"] == report["rows_kept"] + report["rows_quarantined"] == 5


def test_quote_inside_an_unquoted_value_does_not_shift_lines(tmp_path):
    path = write(
        tmp_path / "r.csv",
        "user,item,time,category,review\n"
        'A1,I1,1400000000,Books,12" vinyl\n'
        'A2,I2,1400000001,Books,"two\nlines"\n'
        "A3,I3,later,Books,x\n",
    )
    _, quarantine, _ = validate(read_amazon(path))
    assert quarantine["line"].tolist() == [5]


def test_snowflake_ids_survive_a_bad_row_elsewhere_in_the_file(tmp_path):
    base = 1_234_567_890_123_456_789  # 19 digits, below 2**63
    rows = [f"{base + i},{base - i},7,pv,{1511544070 + i}" for i in range(120)]
    clean = write(tmp_path / "clean.csv", "\n".join(rows) + "\n")
    kept_clean, _, _ = validate(read_taobao(clean))
    assert len(kept_clean) == 120
    dirty = write(tmp_path / "dirty.csv", "\n".join(rows) + "\n1,2,3\n")
    interactions, quarantine, report = validate(read_taobao(dirty))
    assert report["rows_kept"] == 120
    assert quarantine["reason"].tolist() == ["malformed_row"]
    pd.testing.assert_frame_equal(interactions, kept_clean)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (str(2**63 - 1), 2**63 - 1),
        ("+" + str(2**63 - 1), 2**63 - 1),
        ("0000" + str(2**63 - 1), 2**63 - 1),
        (str(2**63 - 1) + ".000", 2**63 - 1),
        ("+5", 5),
        (str(2**63), None),
        ("99999999999999999999", None),
        ("--5", None),
        ("+-5", None),
    ],
)
def test_integer_text_over_the_whole_int64_range(tmp_path, value, expected):
    path = write(
        tmp_path / "ub.csv",
        f"{value},2,3,pv,1511544070\nx,2,3,pv,1511544071\n7,2,3,pv,1511544072\n",
    )
    interactions, quarantine, _ = validate(read_taobao(path))
    if expected is None:
        assert quarantine["line"].tolist() == [1, 2]
        assert set(quarantine["reason"]) == {"bad_type"}
    else:
        assert interactions["user_id"].tolist() == [expected, 7]


@pytest.mark.parametrize(
    ("rating", "reason"),
    [
        ("6.0", "rating_out_of_range"),
        ("10", "rating_out_of_range"),
        ("inf", "rating_out_of_range"),
        ("-1", "rating_out_of_range"),
        ("0", "rating_out_of_range"),
        ("-inf", "rating_out_of_range"),
        ("good", "bad_type"),
        ("", "missing_value"),
        ("nan", "missing_value"),  # a CSV null marker, like "NA" or "NULL"
    ],
)
def test_movielens_ratings_outside_the_scale_are_quarantined(tmp_path, rating, reason):
    write(
        tmp_path / "ml" / "ratings.csv",
        f"userId,movieId,rating,timestamp\n1,1,0.5,964982703\n1,2,5.0,964982704\n"
        f"1,1,{rating},964982705\n",
    )
    write(tmp_path / "ml" / "movies.csv", "movieId,title,genres\n1,A,Drama\n2,B,Comedy\n")
    interactions, quarantine, report = validate(read_movielens(tmp_path / "ml"))
    assert interactions["behavior"].astype(str).tolist() == ["pv", "fav"]
    assert dict(zip(quarantine["line"], quarantine["reason"], strict=True)) == {4: reason}
    assert report["rows_in"] == report["rows_kept"] + report["rows_quarantined"]


def test_integer_text_forms(tmp_path):
    path = write(
        tmp_path / "ub.csv",
        "1,2,3,pv,1511544070\n"
        " 7 ,2,3,pv,1511544071\n"  # padded: still an integer
        "8,2.0,3,pv,1511544072\n"  # integral decimal: accepted
        "9,2.5,3,pv,1511544073\n"
        "10,1e400,3,pv,1511544074\n"
        "11,0x1F,3,pv,1511544075\n"
        "12,inf,3,pv,1511544076\n",
    )
    interactions, quarantine, _ = validate(read_taobao(path))
    assert interactions["user_id"].tolist() == [1, 7, 8]
    assert interactions["item_id"].dtype == np.int64
    assert quarantine["line"].tolist() == [4, 5, 6, 7]
    assert set(quarantine["reason"]) == {"bad_type"}
