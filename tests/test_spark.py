"""`kedro run --env spark` writes the tables `kedro run` writes: the golden tests.

Both engines run ingestion and feature engineering on the same log (the synthetic default and
the real MovieLens sample); every table, report and quarantine must be identical, negatives
included (both draw them with the same counter-based generator). Spark runs with several
partitions and small file splits, so partition boundaries are crossed everywhere.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import PROJECT_ROOT, SMALL_SYNTHETIC, make_project_copy, require, require_module
from sandbox import run_pipeline

from attention_ctr.datasets.parquet_table_dataset import ParquetTable, parquet_parts

pytestmark = pytest.mark.slow

LARGE_TABLES = ("events", "train_samples", "validation_samples", "test_samples")
SMALL_TABLES = (
    "user_ids",
    "item_ids",
    "category_ids",
    "behavior_ids",
    "item_frequency",
    "cold_start_items",
    "cold_start_weights",
)
REPORTS = ("ingestion/ingestion_report.json", "feature_engineering/feature_report.json")
# Many partitions and file splits for small logs: every boundary is crossed.
SPARK_TEST_SETTINGS = {
    "spark.sql.shuffle.partitions": 5,
    "spark.sql.adaptive.coalescePartitions.enabled": False,
    "spark.sql.files.maxPartitionBytes": 65536,
    "spark.sql.files.openCostInBytes": 0,
    "spark.driver.memory": "2g",
}


def _java() -> bool:
    try:
        return subprocess.run(["java", "-version"], capture_output=True).returncode == 0
    except OSError:
        return False


@pytest.fixture(autouse=True)
def spark_available():
    require_module("pyspark")
    require(_java(), "Java is not installed (apt-get install openjdk-17-jre-headless)")


def _spark_env(
    project: Path, name: str, base_env: str | None = None, settings: dict = SPARK_TEST_SETTINGS
) -> str:
    """An environment `name`: `base_env`'s files (if any) plus conf/spark's catalog and
    session (with `settings` over spark.yml's), its raw log read by Spark; what docs/spark.md
    tells users to do for their own."""
    conf = project / "conf"
    target = conf / name
    if base_env:
        shutil.copytree(conf / base_env, target)
    else:
        target.mkdir()
    spark_catalog = yaml.safe_load((conf / "spark" / "catalog.yml").read_text())
    catalog = yaml.safe_load((target / "catalog.yml").read_text()) if base_env else {}
    if base_env:  # this environment's own raw log, read for Spark
        spark_catalog.pop("raw_behavior_logs")
        catalog["raw_behavior_logs"]["engine"] = "spark"
    catalog.update(spark_catalog)
    (target / "catalog.yml").write_text(yaml.safe_dump(catalog))
    shipped = yaml.safe_load((conf / "spark" / "spark.yml").read_text())
    (target / "spark.yml").write_text(yaml.safe_dump({**shipped, **settings}))
    return name


def _outputs(project: Path) -> dict:
    data = project / "data"
    tables = {
        name: ParquetTable(data / "05_model_input" / f"{name}.parquet").read()
        for name in LARGE_TABLES
    }
    tables.update(
        {name: pd.read_parquet(data / "04_feature" / f"{name}.parquet") for name in SMALL_TABLES}
    )
    quarantine = sorted((data / "08_reporting/ingestion/quarantined_rows.parquet").iterdir())[-1]
    tables["quarantined_rows"] = pd.read_parquet(quarantine / "quarantined_rows.parquet")
    for report in REPORTS:
        path = sorted((data / "08_reporting" / report).iterdir())[-1]
        tables[report] = json.loads((path / Path(report).name).read_text())
    return tables


def _run_both(project: Path, params: dict, pandas_env: str | None, spark_env: str) -> tuple:
    pipelines = ["ingestion", "feature_engineering"]
    run_pipeline(project, params=params, env=pandas_env, pipelines=pipelines)
    expected = _outputs(project)
    for layer in ("02_intermediate", "04_feature", "05_model_input"):
        shutil.rmtree(project / "data" / layer)
        (project / "data" / layer).mkdir()
    run_pipeline(project, params=params, env=spark_env, pipelines=pipelines)
    return expected, _outputs(project)


def _assert_identical(expected: dict, actual: dict) -> None:
    for name, table in expected.items():
        if isinstance(table, pd.DataFrame):
            pd.testing.assert_frame_equal(actual[name], table, check_exact=True, obj=name)
        else:
            assert actual[name] == table, name


def test_spark_writes_the_pandas_tables_for_the_synthetic_log(tmp_path):
    project = make_project_copy(tmp_path / "project", source=PROJECT_ROOT)
    env = _spark_env(project, "spark_test")
    expected, actual = _run_both(project, SMALL_SYNTHETIC, None, env)
    _assert_identical(expected, actual)
    # Spark wrote directories of several part files, read back in order.
    for name in LARGE_TABLES:
        assert len(parquet_parts(project / "data" / "05_model_input" / f"{name}.parquet")) > 1


def test_spark_writes_the_pandas_tables_for_movielens(tmp_path, shared_data):
    project = make_project_copy(tmp_path / "project", source=PROJECT_ROOT)
    folder = project / "data" / "01_raw" / "movielens"
    folder.mkdir(parents=True)
    for name in ("ratings.csv", "movies.csv"):
        shutil.copy(shared_data / "movielens-latest-small" / name, folder / name)
    # The shipped settings: adaptive execution merges the ranges as it would for users.
    env = _spark_env(
        project, "movielens_spark", base_env="movielens", settings={"spark.driver.memory": "2g"}
    )
    expected, actual = _run_both(project, {}, "movielens", env)
    assert expected["feature_engineering/feature_report.json"]["events"] > 90_000
    _assert_identical(expected, actual)


# One line per reason, and the cases the parsers must agree on (quotes, spaces, fractions).
BAD_LOG = b"""user,item,category,behavior,timestamp
1,10,100,pv,1511661584
1,10,100,pv,1511661584
2,11,100,"pv",1511661585

3,12,100,pv
4,13,,pv,1511661586
5,x14,100,pv,1511661587
-6,15,100,pv,1511661588
7,16,100,click,1511661589
8,17,100,pv,99
9,18,100,pv,1511661590.000
10,1e3,100,pv,1511661591
11,19,100,buy,1511661592,extra
 12 ,20,100,pv,1511661593
13,21,-x,pv,1511661594
13,21,100,pv,1511661594
14,22,100,\xff\xfe,1511661595
15,23,100,cart,99999999999999999999
16,24,100,fav,1511661596
17,25,100,pv,12d
18,\t,100,pv,1511661597
19,26\xc2\xa0,100,pv,1511661598
20,27,100,NA,1511661599
21,NULL,100,"pv",1511661600
22,28,100,pv,1511661601\xe2\x80\xa8
23,29\xc2\x85,100,pv,1511661602
"""


def test_spark_judges_bad_rows_as_pandas_does(tmp_path):
    from pyspark.sql import SparkSession

    from attention_ctr import spark_raw_logs
    from attention_ctr.pipelines.ingestion import nodes, spark_nodes
    from attention_ctr.raw_logs import read_taobao

    path = tmp_path / "UserBehavior.csv"
    path.write_bytes(b"\xef\xbb\xbf" + BAD_LOG * 40)  # a byte-order mark; several file splits
    params = {"behaviors": ["pv", "cart", "fav", "buy"], "min_timestamp": "1990-01-01"}
    params["max_timestamp"] = None
    builder = SparkSession.builder.master("local[2]")
    for key, value in {**SPARK_TEST_SETTINGS, "spark.sql.files.maxPartitionBytes": 2048}.items():
        builder = builder.config(key, str(value))
    builder.getOrCreate()

    expected, expected_quarantine, expected_report = nodes.validate_behavior_logs(
        read_taobao(path), params
    )
    raw = spark_raw_logs.read_taobao(str(path))
    assert raw.frame.rdd.getNumPartitions() > 1
    interactions, quarantine, report = spark_nodes.validate_behavior_logs(raw, params)

    assert report == expected_report
    assert expected_report["rows_quarantined"] > 12 * 40  # every reason, every copy
    pd.testing.assert_frame_equal(
        quarantine[["line", "reason"]], expected_quarantine[["line", "reason"]]
    )
    kept = interactions.toPandas().sort_values("line", ignore_index=True).drop(columns="line")
    pd.testing.assert_frame_equal(
        kept.astype(str), expected.astype(str), check_dtype=False, check_categorical=False
    )
