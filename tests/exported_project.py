"""One small ingestion -> feature engineering -> training -> export run, shared by the export
and serving tests (a module import cache, so both test modules reuse the same run)."""

from __future__ import annotations

from pathlib import Path

import torch
from conftest import PROJECT_ROOT, SMALL_SYNTHETIC

from attention_ctr.models import MODELS
from attention_ctr.sandbox import make_project_copy, run_pipeline

EXPORT_RUN = {
    **SMALL_SYNTHETIC,
    "feature_engineering.max_history": 12,
    "training.epochs": 1,
    "training.batch_size": 1024,
    "training.progress_bar": False,
    # tiny models: the tests are about export and serving, not quality
    **{f"{name}.model.options.embedding_dim": 8 for name in MODELS},
    **{f"{name}.model.options.mlp_hidden": [16, 8] for name in MODELS},
    "din.model.options.attention_hidden": [16, 8],
    "bst.model.options.n_heads": 2,
    "export.parity.batch_sizes": [1, 7, 64],
    "export.latency.samples": 200,
    "export.latency.repeats": 1,
    "export.threads": 1,
}
_RUNS: dict[str, tuple] = {}


def exported_project(tmp_path_factory) -> tuple[Path, object]:
    """(project path, catalog) of the shared run; runs the pipelines on the first call."""
    if "run" not in _RUNS:
        project = make_project_copy(
            tmp_path_factory.mktemp("export") / "project", source=PROJECT_ROOT
        )
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # tiny models: a second thread costs more than it gives
        try:
            catalog = run_pipeline(
                project,
                params=EXPORT_RUN,
                pipelines=["ingestion", "feature_engineering", "training", "export"],
            )
        finally:
            torch.set_num_threads(threads)
        _RUNS["run"] = (project, catalog)
    return _RUNS["run"]
