"""`kedro run --env movielens` on real MovieLens ratings writes the ranking evaluation."""

from __future__ import annotations

import pandas as pd
import pytest
from conftest import EXPORT_RUN
from sandbox import run_pipeline

from attention_ctr.models import MODELS

SMALL_MODELS = {
    key: value
    for key, value in EXPORT_RUN.items()
    if key.split(".")[0] in {*MODELS, "training"} or key.startswith("export.")
}


@pytest.mark.slow
def test_the_movielens_environment_ranks_every_model_through_the_served_graph(project, shared_data):
    source = shared_data / "movielens-latest-small"
    ratings = pd.read_csv(source / "ratings.csv")
    folder = project / "data" / "01_raw" / "movielens"
    folder.mkdir(parents=True)
    ratings[ratings["userId"] <= 40].to_csv(folder / "ratings.csv", index=False)
    (folder / "movies.csv").write_bytes((source / "movies.csv").read_bytes())

    params = {**SMALL_MODELS, "evaluation.ranking.candidates": 30}
    catalog = run_pipeline(
        project,
        params=params,
        env="movielens",
        pipelines=["ingestion", "feature_engineering", "training", "evaluation"],
    )
    # the environment's own real-log defaults are the ones in force
    spec = catalog.load("feature_spec")
    assert spec["max_history"] == catalog.load("params:feature_engineering")["max_history"] == 50
    users = ratings.loc[ratings["userId"] <= 40, "userId"].nunique()
    comparison = catalog.load("model_comparison")
    assert [row["model"] for row in comparison["rows"]] == list(MODELS)
    for name in MODELS:
        ranking = catalog.load(f"{name}.ranking_metrics")
        for distribution in ("uniform", "popularity"):
            quality = ranking[distribution]
            assert quality["users"] == users
            assert quality["candidates_per_user"] == 31
            for key in ("auc", "gauc", "hr@1", "hr@5", "hr@10", "ndcg@5", "ndcg@10", "mrr"):
                assert 0 <= quality[key] <= 1, (name, distribution, key)
            assert 0 <= quality["history_shuffled_auc"] <= 1
        blend = catalog.load(f"{name}.cold_start_blend")
        assert blend["validation_auc"] >= blend["validation_auc_without_blend"]
