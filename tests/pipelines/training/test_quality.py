"""On the seeded synthetic log every attention model beats the pooling baseline."""

from __future__ import annotations

import pytest
from conftest import PROJECT_ROOT
from sandbox import make_project_copy, run_pipeline

# Large enough for validation AUC to be stable (1,200 users -> 2,400 validation samples),
# small enough to train all four models in about a minute on 2 cores.
QUALITY_RUN = {
    "ingestion.synthetic.users": 1200,
    "ingestion.synthetic.items": 2400,
    "ingestion.synthetic.categories": 24,
    "ingestion.synthetic.events": 48000,
    "feature_engineering.max_history": 30,
    "training.epochs": 2,
    "training.progress_bar": False,
}
# BST's lead is the narrowest and moves with the draw of negatives: +0.011 with the
# counter-based draw (2 epochs; +0.014 at 3), above 0.015 with the generator before it.
MARGIN = 0.01


@pytest.mark.slow
def test_every_attention_model_beats_pooling_on_validation_auc(tmp_path):
    project = make_project_copy(tmp_path / "project", source=PROJECT_ROOT)
    catalog = run_pipeline(
        project, params=QUALITY_RUN, pipelines=["ingestion", "feature_engineering", "training"]
    )
    best = {
        name: catalog.load(f"{name}.training_history")["validation_auc"].max()
        for name in ("pooling", "din", "dien", "bst")
    }
    for name in ("din", "dien", "bst"):
        assert best[name] > best["pooling"] + MARGIN, best
