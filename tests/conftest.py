"""Shared fixtures: real Kedro runs in a temporary copy of this project."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from kedro.framework.session import KedroSession
from kedro.framework.startup import bootstrap_project

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = PROJECT_ROOT.parent / "shared" / "data"

# Small enough for seconds, big enough for every user to have train, validation and test rows.
SMALL_SYNTHETIC = {
    "ingestion.synthetic.users": 150,
    "ingestion.synthetic.items": 600,
    "ingestion.synthetic.categories": 12,
    "ingestion.synthetic.events": 6000,
}


def make_project_copy(destination: Path) -> Path:
    """Copy what a Kedro run needs (pyproject, conf, empty data folders) into `destination`."""
    destination.mkdir(parents=True, exist_ok=True)
    shutil.copy2(PROJECT_ROOT / "pyproject.toml", destination / "pyproject.toml")
    shutil.copy2(PROJECT_ROOT / ".telemetry", destination / ".telemetry")
    shutil.copytree(
        PROJECT_ROOT / "conf", destination / "conf", ignore=shutil.ignore_patterns("local")
    )
    (destination / "conf" / "local").mkdir(exist_ok=True)
    shutil.copytree(
        PROJECT_ROOT / "src",
        destination / "src",
        ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"),
    )
    for layer in (PROJECT_ROOT / "data").iterdir():
        if layer.is_dir():
            (destination / "data" / layer.name).mkdir(parents=True, exist_ok=True)
    return destination


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A fresh copy of the project in a temporary directory."""
    return make_project_copy(tmp_path / "project")


def nested(dotted: dict) -> dict:
    """{"a.b": 1} -> {"a": {"b": 1}}, the shape `kedro run --params a.b=1` produces."""
    tree: dict = {}
    for key, value in dotted.items():
        *parents, leaf = key.split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def run_pipeline(
    project_path: Path,
    pipeline: str | None = None,
    params: dict | None = None,
    env: str | None = None,
):
    """Run a pipeline through a real KedroSession; return the project's data catalog."""
    bootstrap_project(project_path)
    with KedroSession.create(
        project_path=project_path, env=env, runtime_params=nested(params or {})
    ) as session:
        session.run(pipeline_names=[pipeline] if pipeline else None)
        return session.load_context().catalog


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        message = f"real-format fixtures not found at {SHARED_DATA}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return SHARED_DATA
