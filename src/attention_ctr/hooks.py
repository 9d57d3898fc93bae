"""Project hooks: a Spark session for the environments that configure one (conf/spark)."""

from __future__ import annotations

import logging
import os
import sys
import warnings

from kedro.config import MissingConfigException
from kedro.framework.hooks import hook_impl

logger = logging.getLogger(__name__)

PANDAS_WARNING = "PySpark does not yet fully support pandas"


class SparkHooks:
    """Starts the Spark session an environment's `spark.yml` describes, before any dataset
    loads; environments without one (the default) never import pyspark."""

    @hook_impl
    def after_context_created(self, context) -> None:
        try:
            settings = context.config_loader["spark"]
        except MissingConfigException:
            return
        if not settings:
            return
        try:
            from pyspark import SparkConf
            from pyspark.sql import SparkSession
        except ImportError as error:
            raise ImportError(
                f'Environment {context.env!r} runs on Spark: pip install -e ".[spark]" '
                "(and Java 17: apt-get install openjdk-17-jre-headless)"
            ) from error
        # Python workers run this interpreter, whose environment has the project installed.
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
        # PySpark warns on every Arrow conversion that pandas 3 is new to it; the golden
        # tests (tests/test_spark.py) check the tables it makes, so the driver and the workers
        # (which inherit this environment) say it no more.
        warnings.filterwarnings("ignore", PANDAS_WARNING, FutureWarning)
        warnings.filterwarnings("ignore", "The copy keyword is deprecated", module="pyspark")
        quiet = f"ignore:{PANDAS_WARNING}:FutureWarning"
        if quiet not in os.environ.get("PYTHONWARNINGS", ""):
            os.environ["PYTHONWARNINGS"] = ",".join(
                filter(None, [os.environ.get("PYTHONWARNINGS"), quiet])
            )
        settings = dict(settings)
        builder = SparkSession.builder.appName(context.project_path.name)
        master = settings.pop("spark.master", "local[*]")
        session = builder.master(master).config(conf=SparkConf().setAll(settings.items()))
        self._spark = session.getOrCreate()
        self._spark.sparkContext.setLogLevel("WARN")
        logger.info("Spark %s session on %s", self._spark.version, master)

    @hook_impl
    def after_pipeline_run(self) -> None:
        """Feature engineering caches its large tables; training does not need them."""
        if getattr(self, "_spark", None) is not None:
            self._spark.catalog.clearCache()
