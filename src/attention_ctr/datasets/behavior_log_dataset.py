"""A raw behaviour log in one of the supported formats, read lazily."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import pandas as pd
from kedro.io.core import AbstractDataset, DatasetError

from attention_ctr.raw_logs import FORMATS, READERS, RawEvents, write_taobao

# pandas: parsed in this process; spark: read by Spark (Taobao format) or handed to it.
ENGINES = ("pandas", "spark")


@dataclass(frozen=True)
class BehaviorLogSource:
    """Where a raw log lives and how to parse it; `read()` does the parsing."""

    filepath: str
    format: str
    read_args: dict = field(default_factory=dict)
    engine: str = "pandas"

    def read(self) -> RawEvents:
        if self.engine == "spark":
            from attention_ctr import spark_raw_logs

            if self.format == "taobao":
                return spark_raw_logs.read_taobao(self.filepath)
            raw = READERS[self.format](self.filepath, **self.read_args)
            return spark_raw_logs.from_raw_events(raw)
        return READERS[self.format](self.filepath, **self.read_args)


class BehaviorLogDataset(AbstractDataset[pd.DataFrame, BehaviorLogSource]):
    """Raw behaviour logs: Taobao UserBehavior CSV, a MovieLens directory or an Amazon-style CSV.

    Loading returns a `BehaviorLogSource` rather than the rows, so a pipeline can list several
    sources and parse only the one its parameters select. Saving writes the Taobao format (what
    the synthetic generator produces); the other formats are read-only.

    Example catalog entry::

        raw_behavior_logs:
          type: attention_ctr.datasets.BehaviorLogDataset
          format: movielens            # taobao | movielens | amazon
          filepath: data/01_raw/ml-latest-small   # directory with ratings.csv and movies.csv
    """

    def __init__(
        self,
        *,
        filepath: str,
        format: str = "taobao",  # noqa: A002 - the catalog key users write
        read_args: dict[str, Any] | None = None,
        engine: str = "pandas",
        metadata: dict[str, Any] | None = None,
    ) -> None:
        if engine not in ENGINES:
            raise DatasetError(
                f"Unknown engine {engine!r} for raw log {filepath}; expected one of {ENGINES}"
            )
        self._engine = engine
        if format not in FORMATS:
            raise DatasetError(
                f"Unknown raw log format {format!r} for {filepath}; expected one of {FORMATS}"
            )
        self._filepath = PurePosixPath(filepath)
        self._format = format
        self._read_args = dict(read_args or {})
        self.metadata = metadata

    def load(self) -> BehaviorLogSource:
        return BehaviorLogSource(str(self._filepath), self._format, self._read_args, self._engine)

    def save(self, data: pd.DataFrame) -> None:
        if self._format != "taobao":
            raise DatasetError(
                f"Raw logs in {self._format} format at {self._filepath} are read-only"
            )
        write_taobao(data, Path(self._filepath))

    def _exists(self) -> bool:
        return Path(self._filepath).exists()

    def _describe(self) -> dict[str, Any]:
        return {"filepath": str(self._filepath), "format": self._format, "engine": self._engine}
