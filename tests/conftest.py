"""Shared fixtures: real Kedro runs in a temporary copy of this project."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from attention_ctr.sandbox import make_project_copy, run_pipeline  # noqa: F401

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


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        message = f"real-format fixtures not found at {SHARED_DATA}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return SHARED_DATA
