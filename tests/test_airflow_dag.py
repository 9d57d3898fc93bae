"""The Airflow DAG of the retraining pipeline, kept in dags/ and generated with kedro-airflow."""

from __future__ import annotations

import ast
import subprocess
import sys

import pytest
from conftest import PROJECT_ROOT
from kedro.framework.project import pipelines
from kedro.framework.session import KedroSession
from kedro.framework.startup import bootstrap_project
from kedro.io import MemoryDataset

from attention_ctr.sandbox import make_project_copy

DAGS = PROJECT_ROOT / "dags"
DAG_FILE = DAGS / "attention_ctr_retraining_dag.py"
# The README's command; the test runs it with another --target-dir.
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
    pytest.importorskip("kedro_airflow", reason="kedro-airflow is in the dev and airflow extras")
    project = make_project_copy(tmp_path / "project", source=PROJECT_ROOT)
    target = tmp_path / "generated"
    command = [sys.executable, "-m", "kedro", *GENERATE, "--target-dir", str(target)]
    result = subprocess.run(command, cwd=project, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
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
