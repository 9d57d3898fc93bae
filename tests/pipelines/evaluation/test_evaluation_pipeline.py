"""The evaluation pipeline through real Kedro runs on a tiny synthetic log (1 epoch)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import PROJECT_ROOT
from sandbox import make_project_copy, run_pipeline
from sklearn.metrics import log_loss, roc_auc_score

from attention_ctr.evaluation import ATTENTION_TYPES
from attention_ctr.evaluation.comparison import COMPARISON_COLUMNS
from attention_ctr.evaluation.metrics import group_auc, ranking_metrics
from attention_ctr.models import MODELS
from attention_ctr.pipelines.evaluation.nodes import draw_ranking_candidates
from attention_ctr.ranking import ranking_quality
from attention_ctr.sequences import SampleTensors
from attention_ctr.training import blend_toward_category, predict

TINY_RUN = {
    "ingestion.synthetic.users": 80,
    "ingestion.synthetic.items": 300,
    "ingestion.synthetic.categories": 8,
    "ingestion.synthetic.events": 2400,
    "feature_engineering.max_history": 10,
    "training.epochs": 1,
    "training.batch_size": 512,
    "training.progress_bar": False,
    "evaluation.latency.samples": 64,
    "evaluation.latency.batch_size": 32,
    "evaluation.latency.repeats": 1,
    "evaluation.attention.samples": 64,
    "evaluation.attention.heatmap_users": 3,
    "evaluation.explanations.users": 2,
    "evaluation.explanations.candidates": 5,
    "evaluation.ranking.candidates": 20,
}
PLOTS = (
    "roc_curves",
    "training_curves",
    "attention_heatmap",
    "attention_distribution",
    "ranking_metrics",
)


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """One trained project, evaluated twice (two versions of every evaluation output)."""
    project = make_project_copy(tmp_path_factory.mktemp("eval") / "project", source=PROJECT_ROOT)
    run_pipeline(
        project, params=TINY_RUN, pipelines=["ingestion", "feature_engineering", "training"]
    )
    run_pipeline(project, "evaluation", TINY_RUN)
    catalog = run_pipeline(project, "evaluation", TINY_RUN)
    return project, catalog


def test_gauc_matches_a_hand_computation_and_skips_one_class_users():
    table = pd.DataFrame(
        [
            ("a", 1, 0.9), ("a", 0, 0.5), ("a", 0, 0.95),  # AUC 1/2
            ("b", 1, 0.8), ("b", 1, 0.3), ("b", 0, 0.4), ("b", 0, 0.1),  # AUC 3/4
            ("c", 1, 0.5), ("c", 0, 0.5),  # a tie counts one half
            ("d", 1, 0.7), ("d", 1, 0.2),  # positives only: not counted
            ("e", 0, 0.6),  # negatives only: not counted
        ],
        columns=["user", "label", "score"],
    )  # fmt: skip
    gauc, users = group_auc(table["user"], table["label"], table["score"])
    assert users == 3
    assert gauc == pytest.approx((3 * 0.5 + 4 * 0.75 + 2 * 0.5) / 9)

    one_class = ranking_metrics(np.array([1, 2]), np.array([1, 1]), np.array([0.2, 0.9]))
    assert one_class["auc"] is None and one_class["gauc"] is None and one_class["gauc_users"] == 0


def test_stored_metrics_agree_with_sklearn_on_the_same_predictions(evaluated):
    _, catalog = evaluated
    test = catalog.load("test_samples@pandas")
    tensors = SampleTensors(test, catalog.load("events@pandas"), catalog.load("feature_spec"))
    labels = test["label"].to_numpy()
    frequency = catalog.load("item_frequency")
    cold, weights = catalog.load("cold_start_items"), catalog.load("cold_start_weights")
    counts = frequency.set_index("item")["train_count"].reindex(test["item"]).to_numpy()
    rare = (counts >= 1) & (counts <= 4)
    assert len(np.unique(labels[rare])) == 2, "the tiny log should have rare test items"
    for name in MODELS:
        metrics = catalog.load(f"{name}.test_metrics")
        unblended = blend_toward_category(
            catalog.load(f"{name}.trained_model"), frequency, cold, weights, 0.0
        )
        for key, model in (
            ("with_blend", catalog.load(f"{name}.model")),
            ("without_blend", unblended),
        ):
            probabilities = predict(model, tensors, 1024)
            if key == "with_blend":
                assert metrics["test"]["auc"] == pytest.approx(
                    roc_auc_score(labels, probabilities), abs=1e-6
                )
                assert metrics["test"]["logloss"] == pytest.approx(
                    log_loss(labels, probabilities), abs=1e-5
                )
            sliced = metrics["by_item_frequency"]["1-4"][key]
            assert sliced["samples"] == int(rare.sum())
            expected = roc_auc_score(labels[rare], probabilities[rare])
            assert sliced["auc"] == pytest.approx(expected, abs=1e-6)


def test_model_differs_from_trained_model_only_in_its_item_table(evaluated):
    _, catalog = evaluated
    for name in MODELS:
        before = catalog.load(f"{name}.trained_model").state_dict()
        after = catalog.load(f"{name}.model").state_dict()
        key = next(k for k in after if k.endswith("item_embedding.weight"))
        assert all(torch.equal(before[k], after[k]) for k in after if k != key)


def test_ranking_is_what_eager_torch_ranks_and_identical_across_runs(evaluated):
    project, catalog = evaluated
    params = catalog.load("params:evaluation.ranking")
    test, events = catalog.load("test_samples@pandas"), catalog.load("events@pandas")
    frequency = catalog.load("item_frequency")
    candidates = draw_ranking_candidates(test, events, frequency, params)
    seen = set(zip(events["user"], events["item"]))
    for _, rows in candidates.groupby("distribution"):
        negatives = rows[rows["label"] == 0]
        assert not any(pair in seen for pair in zip(negatives["user"], negatives["item"]))
        assert not rows.duplicated(["user", "item"]).any()
        assert (rows.groupby("user")["label"].sum() == 1).all()
    tensors = SampleTensors(candidates, events, catalog.load("feature_spec"))
    folder = project / "data" / "08_reporting" / "evaluation"
    for name in MODELS:
        stored = catalog.load(f"{name}.ranking_metrics")
        versions = sorted((folder / name / "ranking_metrics.json").iterdir())
        assert len(versions) == 2
        first, second = ((version / "ranking_metrics.json").read_text() for version in versions)
        assert first == second, "the ranking protocol must be seeded"
        probabilities = predict(catalog.load(f"{name}.model"), tensors, 1024)
        for distribution in params["distributions"]:
            mine = (candidates["distribution"] == distribution).to_numpy()
            eager = ranking_quality(
                candidates["user"][mine], candidates["label"][mine], probabilities[mine]
            )
            for key in ("auc", "gauc", "mrr", "hr@10", "ndcg@10"):
                assert stored[distribution][key] == pytest.approx(eager[key], abs=2e-3), key
            assert stored[distribution]["candidates_per_user"] == params["candidates"] + 1
            assert 0 <= stored[distribution]["history_shuffled_auc"] <= 1


def test_comparison_table_has_every_model_and_column(evaluated):
    _, catalog = evaluated
    table = catalog.load("model_comparison")
    assert [row["model"] for row in table["rows"]] == list(MODELS)
    for row in table["rows"]:
        assert set(COMPARISON_COLUMNS) <= set(row)
        assert row["attention"] == ATTENTION_TYPES[row["model"]]
        for column in ("test_auc", "test_gauc", "test_logloss", "training_seconds"):
            assert math.isfinite(row[column]), (row["model"], column)
        assert row["parameters"] > 0
        assert row["torch_ms_per_1000"] > 0 and row["onnxruntime_ms_per_1000"] > 0
        assert row["onnx_max_abs_diff"] < 1e-4

    markdown = catalog.load("model_comparison_table").splitlines()
    header = next(line for line in markdown if line.startswith("| model"))
    assert all(title in header for title, _ in COMPARISON_COLUMNS.values())
    for name in MODELS:
        assert any(line.startswith(f"| {name} | {ATTENTION_TYPES[name]} |") for line in markdown)


def test_plots_are_saved_as_versioned_png_files(evaluated):
    project, _ = evaluated
    for plot in PLOTS:
        folder = project / "data" / "08_reporting" / "evaluation" / f"{plot}.png"
        files = sorted(folder.glob(f"*/{plot}.png"))
        assert len(files) == 2, files
        assert all(f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for f in files)


def test_attention_report_shows_pooling_as_uniform(evaluated):
    _, catalog = evaluated
    report = catalog.load("attention_distribution_report")
    assert list(report) == list(MODELS)
    pooling = report["pooling"]
    assert not pooling["has_attention"]
    recency = [value for value in pooling["recency_relative_weight"] if value is not None]
    np.testing.assert_allclose(recency, 1.0, rtol=1e-5)


def test_explanations_name_behaviours_from_that_users_history(evaluated):
    _, catalog = evaluated
    events = catalog.load("events@pandas")
    item_raw = catalog.load("item_ids").set_index("item")["raw_id"]
    user_code = catalog.load("user_ids").set_index("raw_id")["user"]
    test = catalog.load("test_samples@pandas")
    explanations = catalog.load("recommendation_explanations")
    report = catalog.load("recommendation_explanations_report")
    assert list(explanations) == list(MODELS)
    for name, explained in explanations.items():
        assert explained["users"], name
        for user in explained["users"]:
            code = user_code[user["user"]]
            moment = test.loc[(test["user"] == code) & (test["label"] == 1), "timestamp"].iloc[0]
            past = events[(events["user"] == code) & (events["timestamp"] < moment)]
            history = set(item_raw[past["item"]])
            assert user["recommendations"]
            for recommendation in user["recommendations"]:
                assert recommendation["explanation"] in report
                if not explained["has_attention"]:
                    assert "no attention" in recommendation["explanation"]
                    continue
                assert recommendation["because"], (name, recommendation)
                for reason in recommendation["because"]:
                    assert reason["item"] in history
                    assert f"item {reason['item']} " in recommendation["explanation"]
                    assert reason["seconds_before"] > 0


def test_two_evaluations_leave_two_versions_of_every_output(evaluated):
    project, _ = evaluated
    root = project / "data" / "08_reporting" / "evaluation"
    outputs = [p for p in root.rglob("*") if p.is_dir() and p.suffix in {".json", ".md", ".png"}]
    # per model: test metrics, ranking metrics, evaluation summary, attention profile,
    # explanations; then the cross-model reports
    assert len(outputs) == len(MODELS) * 5 + 10
    for output in outputs:
        assert len([v for v in output.iterdir() if v.is_dir()]) == 2, output
