"""Feature engineering through real Kedro runs on small synthetic logs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import SMALL_SYNTHETIC
from sandbox import run_pipeline

from attention_ctr.pipelines.feature_engineering.nodes import _sampler
from attention_ctr.sequences import SampleTensors

SPLITS = ("train_samples", "validation_samples", "test_samples")


@pytest.fixture(scope="module")
def features(tmp_path_factory) -> dict:
    from conftest import PROJECT_ROOT, make_project_copy

    project = make_project_copy(tmp_path_factory.mktemp("fe") / "project", source=PROJECT_ROOT)
    catalog = run_pipeline(
        project, None, SMALL_SYNTHETIC, pipelines=["ingestion", "feature_engineering"]
    )
    names = [
        "interactions",
        "events@pandas",
        "train_samples@pandas",
        "validation_samples@pandas",
        "test_samples@pandas",
        "user_ids",
        "item_ids",
        "category_ids",
        "item_frequency",
        "cold_start_items",
        "cold_start_weights",
        "feature_spec",
        "feature_report",
    ]
    loaded = {name.partition("@")[0]: catalog.load(name) for name in names}
    loaded["project"] = project
    return loaded


def _histories(features: dict, samples: pd.DataFrame) -> dict[str, np.ndarray]:
    """The gathered histories of `samples`, plus the user of every history position."""
    events = features["events"].assign(owner=features["events"]["user"])
    tensors = SampleTensors(samples, events, features["feature_spec"])
    tensors.events["owner"] = torch.as_tensor(events["owner"].to_numpy(np.int64))
    batch = tensors.batch(torch.arange(len(samples)))
    mask = batch["mask"]
    length = mask.shape[1]
    start = tensors.hist_end - tensors.hist_len
    index = torch.where(mask, start[:, None] + torch.arange(length)[None, :], 0)
    batch["user"] = torch.where(mask, tensors.events["owner"][index], -1)
    return {key: value.numpy() for key, value in batch.items()}


@pytest.mark.parametrize("split", SPLITS)
def test_no_history_behaviour_at_or_after_its_sample(features, split):
    samples = features[split]
    batch = _histories(features, samples)
    mask = batch["mask"]
    sample_time = np.broadcast_to(samples["timestamp"].to_numpy()[:, None], mask.shape)
    sample_user = np.broadcast_to(samples["user"].to_numpy()[:, None], mask.shape)
    assert mask.any(axis=1).all(), "every sample has at least one history behaviour"
    assert (batch["hist_timestamp"][mask] < sample_time[mask]).all()
    assert (batch["user"][mask] == sample_user[mask]).all()
    assert (mask.sum(axis=1) <= features["feature_spec"]["max_history"]).all()
    # Time gaps are positive, so every real position has a non-padding bucket.
    assert (batch["time_gap"][mask] >= 1).all() and (batch["time_gap"][~mask] == 0).all()


def test_splits_are_last_behaviour_for_test_and_the_one_before_for_validation(features):
    events = features["events"]
    positives = {s: features[s][features[s]["label"] == 1] for s in SPLITS}
    last = events.groupby("user").tail(1)
    second_last = events.groupby("user").nth(-2)
    test = positives["test_samples"].set_index("user")
    validation = positives["validation_samples"].set_index("user")
    assert len(test) == events["user"].nunique() == len(validation)
    assert (test.loc[last["user"], "item"].to_numpy() == last["item"].to_numpy()).all()
    assert (
        validation.loc[second_last["user"], "item"].to_numpy() == second_last["item"].to_numpy()
    ).all()
    train = positives["train_samples"]
    latest_train = train.groupby("user")["timestamp"].max()
    assert (latest_train <= validation.loc[latest_train.index, "timestamp"]).all()


def test_history_keeps_the_most_recent_behaviours(features):
    test = features["test_samples"]
    batch = _histories(features, test)
    events = features["events"]
    for row in range(0, len(test), max(1, len(test) // 25)):
        user, when = test["user"].iat[row], test["timestamp"].iat[row]
        earlier = events[(events["user"] == user) & (events["timestamp"] < when)]
        expected = earlier["item"].to_numpy()[-features["feature_spec"]["max_history"] :]
        assert batch["hist_item"][row][batch["mask"][row]].tolist() == expected.tolist()


def test_negatives_never_come_from_the_users_own_history(features):
    events = features["events"]
    seen = set(zip(events["user"], events["item"]))
    for split in SPLITS:
        negatives = features[split][features[split]["label"] == 0]
        assert len(negatives) == (features[split]["label"] == 1).sum()  # ratio 1
        assert not any(pair in seen for pair in zip(negatives["user"], negatives["item"]))
    negative_history = set(zip(events["user"], events["neg_item"]))
    assert not negative_history & seen
    assert (events["neg_item"] > 0).all()
    category_of = features["item_ids"].set_index("item")["category"]
    assert (category_of.loc[events["neg_item"]].to_numpy() == events["neg_category"]).all()


@pytest.mark.parametrize("share", [0.0, 0.5, 1.0])
def test_mixed_negatives_draw_their_share_by_popularity(share):
    # items 1..100, only item 1 was ever trained on: every popularity draw is item 1
    frequency = pd.DataFrame(
        {"item": np.arange(1, 101), "category": 1, "train_count": np.r_[1, np.zeros(99, int)]}
    )
    pick = _sampler(frequency, {"distribution": "mixed", "popularity_share": share})
    rng = np.random.default_rng(0)
    choices = rng.random(20_000)
    drawn = pick(rng.random(20_000), lambda: choices)
    uniform_ones = (1 - share) / 100
    assert np.mean(drawn == 1) == pytest.approx(share + uniform_ones, abs=0.01)
    with pytest.raises(ValueError, match="popularity_share"):
        _sampler(frequency, {"distribution": "mixed", "popularity_share": 1.5})
    with pytest.raises(ValueError, match="'uniform', 'popularity' or 'mixed'"):
        _sampler(frequency, {"distribution": "zipf"})


def test_ids_are_contiguous_from_one_and_map_back_to_raw_ids(features):
    interactions = features["interactions"]
    for name, column in (("user_ids", "user"), ("item_ids", "item"), ("category_ids", "category")):
        table = features[name]
        assert table[column].tolist() == list(range(1, len(table) + 1))
        assert table["raw_id"].is_unique
    raw_items = set(interactions["item_id"])
    assert set(features["item_ids"]["raw_id"]) == raw_items
    decode = features["item_ids"].set_index("item")["raw_id"]
    assert set(decode.loc[features["events"]["item"]]) == raw_items


def test_cold_start_table_and_category_weights(features):
    frequency = features["item_frequency"]
    cold = features["cold_start_items"]
    # cold: in no training sample at all (neither a behaviour nor a sampled negative)
    in_training = set(features["train_samples"]["item"]) | set(
        frequency.loc[frequency["train_count"] > 0, "item"]
    )
    assert set(cold["item"]) == set(frequency["item"]) - in_training
    assert (cold["train_count"] == 0).all()
    weights = features["cold_start_weights"]
    sums = weights.groupby("category")["weight"].sum()
    np.testing.assert_allclose(sums.to_numpy(), 1.0)
    merged = weights.merge(frequency, on=["item", "category"])
    assert set(merged["item"]) == set(frequency.loc[frequency["train_count"] > 0, "item"])
    # Frequency-weighted: within a category, weight is proportional to training count.
    ratio = merged["weight"] / merged["train_count"]
    assert (ratio.groupby(merged["category"]).std().fillna(0) < 1e-12).all()
    # Training counts exclude validation and test behaviours.
    events = features["events"]
    held_out = pd.concat([events.groupby("user").tail(2)])
    total = events["item"].value_counts().sub(held_out["item"].value_counts(), fill_value=0)
    counted = frequency.set_index("item")["train_count"]
    assert (total.reindex(counted.index, fill_value=0).to_numpy() == counted.to_numpy()).all()


def test_report_accounts_for_every_behaviour(features):
    report = features["feature_report"]
    positives = sum(report["samples"][s]["positives"] for s in report["samples"])
    assert (
        positives + report["behaviours_without_history"] + report["events_of_dropped_users"]
        == report["events"]
        == len(features["events"])
    )


def test_same_seed_gives_byte_identical_features(features, tmp_path: Path):
    from conftest import PROJECT_ROOT, make_project_copy

    again = make_project_copy(tmp_path / "again", source=PROJECT_ROOT)
    run_pipeline(again, None, SMALL_SYNTHETIC, pipelines=["ingestion", "feature_engineering"])
    produced = sorted((features["project"] / "data" / "05_model_input").glob("*"))
    assert produced
    for path in [*produced, *sorted((features["project"] / "data" / "04_feature").glob("*"))]:
        if path.is_file() and path.name != ".gitkeep":
            twin = again / path.relative_to(features["project"])
            assert path.read_bytes() == twin.read_bytes(), path.name


def test_short_users_are_dropped_and_counted(project):
    params = {**SMALL_SYNTHETIC, "feature_engineering.min_user_events": 40}
    catalog = run_pipeline(project, None, params, pipelines=["ingestion", "feature_engineering"])
    report = catalog.load("feature_report")
    interactions = catalog.load("interactions")
    short = (interactions.groupby("user_id").size() < 40).sum()
    assert report["users_dropped_too_few_events"] == short > 0
    kept_users = set(catalog.load("test_samples@pandas")["user"])
    assert len(kept_users) == report["users"] - short


@pytest.mark.parametrize("distribution", ["popularity", "uniform"])
def test_every_user_too_short_fails_at_once_naming_min_user_events(project, distribution):
    params = {
        **SMALL_SYNTHETIC,
        "feature_engineering.min_user_events": 10_000,
        "feature_engineering.negative_sampling.distribution": distribution,
    }
    with pytest.raises(Exception) as caught:
        run_pipeline(project, None, params, pipelines=["ingestion", "feature_engineering"])
    text = str(caught.value)
    assert "min_user_events is 10000" in text
    assert f"{SMALL_SYNTHETIC['ingestion.synthetic.users']} users" in text
    assert "popularity" not in text
    # Nothing downstream was written: no empty samples for training to trip on later.
    assert not any((project / "data" / "05_model_input").glob("*samples*"))
