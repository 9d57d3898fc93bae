from __future__ import annotations

import os
from datetime import datetime, timedelta
from pathlib import Path

from airflow.sdk import dag, task

from kedro.framework.session import KedroSession
from kedro.framework.project import configure_project

# Kedro settings required to run your pipeline
env = "local"
pipeline_name = "retraining"
# The project to run: $KEDRO_PROJECT_PATH, else the project this file was generated into (its
# parent folder), not the worker's current directory.
project_path = Path(os.environ.get("KEDRO_PROJECT_PATH", Path(__file__).resolve().parents[1]))
package_name = "attention_ctr"
conf_source = "" or project_path / "conf"


def _run_kedro_node(node_names=None, namespaces=None):
    """Run a Kedro pipeline slice. Pass node_names for regular node groups or namespaces for namespace groups."""
    configure_project(package_name)
    with KedroSession.create(project_path=project_path, env=env, conf_source=conf_source) as session:
        if namespaces is not None:
            session.run(pipeline_names=[pipeline_name], namespaces=namespaces)
        else:
            session.run(pipeline_names=[pipeline_name], node_names=node_names)


@dag(
    dag_id="attention-ctr-retraining",
    start_date=datetime(2026,1,1),
    max_active_runs=1,
    schedule="@daily",
    catchup=False,
    default_args=dict(
        owner="attention_ctr",
        depends_on_past=False,
        email_on_failure=False,
        email_on_retry=False,
        retries=1,
        retry_delay=timedelta(minutes=5)
    ),
)
def attention_ctr():

    @task(task_id="ingestion")
    def ingestion():
        _run_kedro_node(namespaces=["ingestion"])

    @task(task_id="feature-engineering")
    def feature_engineering():
        _run_kedro_node(namespaces=["feature_engineering"])

    @task(task_id="bst")
    def bst():
        _run_kedro_node(namespaces=["bst"])

    @task(task_id="dien")
    def dien():
        _run_kedro_node(namespaces=["dien"])

    @task(task_id="din")
    def din():
        _run_kedro_node(namespaces=["din"])

    @task(task_id="pooling")
    def pooling():
        _run_kedro_node(namespaces=["pooling"])

    @task(task_id="evaluation")
    def evaluation():
        _run_kedro_node(namespaces=["evaluation"])

    @task(task_id="promotion")
    def promotion():
        _run_kedro_node(namespaces=["promotion"])

    tasks = {
        "ingestion": ingestion(),
        "feature-engineering": feature_engineering(),
        "bst": bst(),
        "dien": dien(),
        "din": din(),
        "pooling": pooling(),
        "evaluation": evaluation(),
        "promotion": promotion(),
    }
    tasks["ingestion"] >> tasks["feature-engineering"]
    tasks["feature-engineering"] >> tasks["bst"]
    tasks["feature-engineering"] >> tasks["dien"]
    tasks["feature-engineering"] >> tasks["din"]
    tasks["feature-engineering"] >> tasks["pooling"]
    tasks["bst"] >> tasks["evaluation"]
    tasks["dien"] >> tasks["evaluation"]
    tasks["din"] >> tasks["evaluation"]
    tasks["pooling"] >> tasks["evaluation"]
    tasks["bst"] >> tasks["promotion"]
    tasks["dien"] >> tasks["promotion"]
    tasks["din"] >> tasks["promotion"]
    tasks["pooling"] >> tasks["promotion"]


attention_ctr()