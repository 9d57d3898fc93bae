"""The committed bad-input corpus (tests/data/bad_logs), run through the pipeline's own nodes."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import yaml

from attention_ctr.datasets import BehaviorLogDataset
from attention_ctr.pipelines.ingestion.nodes import read_behavior_logs, validate_behavior_logs
from attention_ctr.raw_logs import RawLogError

CORPUS = Path(__file__).resolve().parents[2] / "data" / "bad_logs"
EXPECTED = yaml.safe_load((CORPUS / "expected.yml").read_text())
VALIDATION = {"behaviors": ["pv", "cart", "fav", "buy"], "min_timestamp": "1990-01-01"}


def test_every_corpus_file_has_an_expectation():
    files = {
        str(
            path.relative_to(CORPUS).parent
            if path.parent.parent.name == "movielens"
            else path.relative_to(CORPUS)
        )
        for path in CORPUS.rglob("*.csv")
    }
    assert files == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_bad_log(name):
    expected = EXPECTED[name]
    source = BehaviorLogDataset(filepath=str(CORPUS / name), format=name.split("/")[0]).load()
    if "error" in expected:
        with pytest.raises(RawLogError) as caught:
            validate_behavior_logs(read_behavior_logs(source, source, "raw"), VALIDATION)
        first_line = str(caught.value).splitlines()[0]
        assert expected["error"] in first_line
        assert str(CORPUS / name) in first_line
        return
    interactions, quarantine, report = validate_behavior_logs(
        read_behavior_logs(source, source, "raw"), VALIDATION
    )
    assert report["rows_in"] == report["rows_kept"] + report["rows_quarantined"]
    assert report["rows_in"] == expected["rows_in"]
    assert report["rows_kept"] == expected["rows_kept"] == len(interactions)
    assert (
        dict(zip(quarantine["line"], quarantine["reason"], strict=True)) == expected["quarantine"]
    )
    counts = {r: c for r, c in report["quarantined_by_reason"].items() if c}
    assert counts == dict(Counter(expected["quarantine"].values()))
