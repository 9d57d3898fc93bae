"""Shared fixtures: real Kedro runs in a temporary copy of this project."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from sandbox import make_project_copy, run_pipeline

from attention_ctr.models import MODELS

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = PROJECT_ROOT.parent / "shared" / "data"

# Small enough for seconds, big enough for every user to have train, validation and test rows.
SMALL_SYNTHETIC = {
    "ingestion.synthetic.users": 150,
    "ingestion.synthetic.items": 600,
    "ingestion.synthetic.categories": 12,
    "ingestion.synthetic.events": 6000,
}


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A fresh copy of the project in a temporary directory."""
    return make_project_copy(tmp_path / "project", source=PROJECT_ROOT)


def require(available: bool, message: str) -> None:
    """Skip a test whose tool is missing here; in CI, which installs everything the README
    says, fail instead."""
    if available:
        return
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def require_module(module: str) -> None:
    """`require` an importable module that the dev extra installs."""
    found = importlib.util.find_spec(module) is not None
    require(found, f"{module} is not installed (dev extra: `pip install -e '.[dev]'`)")


def run_kedro(project: Path, *arguments: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """`kedro ARGUMENTS` in `project`, as a user runs it; fails the test if it fails."""
    # stdin closed: a telemetry consent prompt would fail the command instead of hanging it
    result = subprocess.run(
        [sys.executable, "-m", "kedro", *arguments],
        cwd=project,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result


@pytest.fixture
def shared_data() -> Path:
    require(SHARED_DATA.is_dir(), f"real-format fixtures not found at {SHARED_DATA}")
    return SHARED_DATA


# One small run of every pipeline (tiny models: these tests are about export, serving and the
# notebook, not quality), shared by the export, serving and notebook tests.
EXPORT_RUN = {
    **SMALL_SYNTHETIC,
    "feature_engineering.max_history": 12,
    "training.epochs": 1,
    "training.batch_size": 1024,
    "training.progress_bar": False,
    **{f"{name}.model.options.embedding_dim": 8 for name in MODELS},
    **{f"{name}.model.options.mlp_hidden": [16, 8] for name in MODELS},
    "din.model.options.attention_hidden": [16, 8],
    "bst.model.options.n_heads": 2,
    "export.parity.batch_sizes": [1, 7, 64],
    "export.latency.samples": 200,
    "export.latency.repeats": 1,
    "export.threads": 1,
}


@pytest.fixture(scope="session")
def exported_run(tmp_path_factory) -> tuple[Path, object]:
    """(project path, catalog) of the shared run of every pipeline."""
    project = make_project_copy(tmp_path_factory.mktemp("export") / "project", source=PROJECT_ROOT)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: a second thread costs more than it gives
    try:
        catalog = run_pipeline(
            project,
            params=EXPORT_RUN,
            pipeline="retraining",
        )
    finally:
        torch.set_num_threads(threads)
    return project, catalog
