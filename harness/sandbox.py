"""Run the project's pipelines in a throw-away copy of the project (tests, benchmarks).

Not part of the installed package: the tests put this folder on `sys.path` through pytest's
`pythonpath` setting (pyproject.toml), the benchmarks through `benchmarks/_common.py`.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from kedro.framework.session import KedroSession
from kedro.framework.startup import bootstrap_project

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def make_project_copy(destination: Path, source: Path = PROJECT_ROOT) -> Path:
    """Copy what a Kedro run needs (pyproject, conf, src, empty data layers) to `destination`."""
    destination.mkdir(parents=True, exist_ok=True)
    for name in ("pyproject.toml", ".telemetry"):
        shutil.copy2(source / name, destination / name)
    shutil.copytree(source / "conf", destination / "conf", ignore=shutil.ignore_patterns("local"))
    (destination / "conf" / "local").mkdir(exist_ok=True)
    shutil.copytree(
        source / "src",
        destination / "src",
        ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"),
    )
    for layer in (source / "data").iterdir():
        if layer.is_dir():
            (destination / "data" / layer.name).mkdir(parents=True, exist_ok=True)
    return destination


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
    pipelines: list[str] | None = None,
    **run_args,
):
    """Run pipeline(s) through a real KedroSession; return the project's data catalog.

    `pipeline` names one pipeline, `pipelines` several; neither runs `__default__`.
    `run_args` go to `KedroSession.run` (e.g. `namespaces=["din"]`).
    """
    bootstrap_project(project_path)
    names = pipelines or ([pipeline] if pipeline else None)
    with KedroSession.create(
        project_path=project_path, env=env, runtime_params=nested(params or {})
    ) as session:
        session.run(pipeline_names=names, **run_args)
        return session.load_context().catalog
