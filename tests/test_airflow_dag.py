"""The Airflow DAG of the retraining pipeline, kept in dags/ and generated with kedro-airflow."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import EXPORT_RUN, PROJECT_ROOT, require_module, run_kedro
from kedro.framework.project import pipelines
from kedro.framework.session import KedroSession
from kedro.framework.startup import bootstrap_project
from kedro.io import MemoryDataset
from sandbox import make_project_copy, nested

from attention_ctr.models import MODELS

pytestmark = pytest.mark.airflow

DAGS = PROJECT_ROOT / "dags"
DAG_FILE = DAGS / "attention_ctr_retraining_dag.py"
# The command docs/retraining_and_airflow.md gives; the test runs it with another --target-dir.
GENERATE = [
    "airflow",
    "create",
    "--pipelines",
    "retraining",
    "--group-by",
    "namespace",
    "--jinja-file",
    str(DAGS / "dag_template.j2"),
]


def _slug(name: str) -> str:
    return name.replace("_", "-")


def _dag_tasks(source: str) -> tuple[dict[str, list[str]], set[tuple[str, str]]]:
    """({task id: the namespaces it runs}, {(upstream, downstream)}) read from a DAG file."""
    tree = ast.parse(source)
    namespaces, edges = {}, set()
    for function in ast.walk(tree):
        if not isinstance(function, ast.FunctionDef):
            continue
        for decorator in function.decorator_list:
            if isinstance(decorator, ast.Call) and getattr(decorator.func, "id", "") == "task":
                (task_id,) = [k.value.value for k in decorator.keywords if k.arg == "task_id"]
                (call,) = [n for n in ast.walk(function.body[0]) if isinstance(n, ast.Call)]
                (argument,) = [k.value for k in call.keywords if k.arg == "namespaces"]
                namespaces[task_id] = [element.value for element in argument.elts]
    for node in ast.walk(tree):
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.RShift):
            edges.add((node.left.slice.value, node.right.slice.value))
    return namespaces, edges


@pytest.fixture(scope="module")
def retraining():
    """(retraining pipeline, catalog) of this project."""
    bootstrap_project(PROJECT_ROOT)
    with KedroSession.create(project_path=PROJECT_ROOT) as session:
        catalog = session.load_context().catalog
        return pipelines["retraining"], catalog


def test_the_committed_dag_is_what_kedro_airflow_generates_from_the_pipeline_now(tmp_path):
    require_module("kedro_airflow")
    project = make_project_copy(tmp_path / "project", source=PROJECT_ROOT)
    target = tmp_path / "generated"
    run_kedro(project, *GENERATE, "--target-dir", str(target))
    generated = (target / DAG_FILE.name).read_text()
    assert generated == DAG_FILE.read_text(), (
        f"{DAG_FILE.relative_to(PROJECT_ROOT)} is stale: regenerate it with "
        f"`kedro {' '.join(GENERATE[:-2])} --jinja-file dags/dag_template.j2 --target-dir dags/`"
    )


def test_one_task_per_namespace_runs_every_node_once_in_the_pipelines_order(retraining):
    pipeline, _ = retraining
    namespaces, edges = _dag_tasks(DAG_FILE.read_text())
    groups = pipeline.group_nodes_by("namespace")
    assert namespaces == {_slug(group.name): [group.name] for group in groups}
    expected_edges = {(_slug(dep), _slug(g.name)) for g in groups for dep in g.dependencies}
    assert edges == expected_edges
    # Namespaces partition the nodes: each runs in exactly one task.
    ran = [
        node.name
        for task_namespaces in namespaces.values()
        for node in pipeline.only_nodes_with_namespaces(task_namespaces).nodes
    ]
    assert sorted(ran) == sorted(node.name for node in pipeline.nodes)
    expected = {"ingestion", "feature-engineering", "pooling", "din", "dien", "bst"}
    assert expected <= set(namespaces) and {"evaluation", "promotion"} <= set(namespaces)


def test_every_dataset_passed_between_tasks_is_persisted(retraining):
    """Each task is its own Kedro session: a MemoryDataset would not reach the next task."""
    pipeline, catalog = retraining
    task_of = {
        node: group.name for group in pipeline.group_nodes_by("namespace") for node in group.nodes
    }
    producers = {output: node for node in pipeline.nodes for output in node.outputs}
    crossing = {
        dataset
        for node in pipeline.nodes
        for dataset in node.inputs
        if dataset in producers and task_of[producers[dataset].name] != task_of[node.name]
    }
    assert crossing, "the DAG's tasks should hand datasets to each other"
    in_memory = [
        d for d in crossing if d not in catalog or isinstance(catalog.get(d), MemoryDataset)
    ]
    assert in_memory == []


# ---------------------------------------------------------------- with Airflow itself
def _airflow_env(home: Path, dags: Path) -> dict[str, str]:
    return {
        **os.environ,
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(dags),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
    }


def test_airflow_imports_the_committed_dag_with_the_pipelines_tasks(retraining, tmp_path):
    require_module("airflow")
    pipeline, _ = retraining
    script = (
        "import json; from airflow.dag_processing.dagbag import DagBag\n"
        f"bag = DagBag(dag_folder={str(DAGS)!r})\n"
        "dag = bag.dags.get('attention-ctr-retraining')\n"
        "print(json.dumps({'errors': {k: str(v) for k, v in bag.import_errors.items()},\n"
        "  'tasks': {t.task_id: sorted(t.upstream_task_ids) for t in dag.tasks} if dag else None,\n"
        "  'max_active_runs': dag.max_active_runs if dag else None}))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        env=_airflow_env(tmp_path / "airflow", DAGS),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert loaded["errors"] == {}
    groups = pipeline.group_nodes_by("namespace")
    assert loaded["tasks"] == {
        _slug(group.name): sorted(_slug(dependency) for dependency in group.dependencies)
        for group in groups
    }
    assert loaded["max_active_runs"] == 1  # two retrainings would race on the pointer


@pytest.mark.slow
def test_airflow_runs_the_retraining_dag_end_to_end_and_promotes(tmp_path):
    """`airflow dags test` on a DAG generated like the committed one, for a small-data env."""
    require_module("airflow")
    require_module("kedro_airflow")
    project = make_project_copy(tmp_path / "project", source=PROJECT_ROOT)
    (project / "conf" / "small").mkdir()
    (project / "conf" / "small" / "parameters.yml").write_text(yaml.safe_dump(nested(EXPORT_RUN)))
    run_kedro(project, *GENERATE, "--env", "small", "--target-dir", "dags")

    env = _airflow_env(tmp_path / "airflow", project / "dags")
    airflow = [sys.executable, "-m", "airflow"]
    for step in (["db", "migrate"], ["dags", "test", "attention-ctr-retraining"]):
        result = subprocess.run(
            airflow + step, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
        )
        assert result.returncode == 0, (step, (result.stdout + result.stderr)[-5000:])
    assert "state=success" in result.stdout + result.stderr

    # Each task ran in its own Kedro session; the pointer still names complete bundles.
    pointer = json.loads((project / "data" / "06_models" / "promoted_models.json").read_text())
    assert sorted(pointer) == sorted(MODELS)
    for name, entry in pointer.items():
        bundle = project / "data" / "06_models" / name / "serving"
        metadata = json.loads(
            (bundle / "metadata.json" / entry["version"] / "metadata.json").read_text()
        )
        assert metadata["request_onnx_sha256"] == entry["request_onnx_sha256"]
