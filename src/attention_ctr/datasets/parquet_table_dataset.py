"""A parquet table opened, not read: what training streams when a split outgrows memory."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from kedro.io import AbstractDataset
from kedro.io.core import DatasetError


def parquet_parts(path: str | Path) -> list[Path]:
    """The files of a parquet table in row order: the file itself, or a directory's part files
    (as Spark writes them: partition i in `part-<i>-...`) in name order."""
    path = Path(path)
    if path.is_file():
        return [path]
    return sorted(part for part in path.glob("*.parquet") if not part.name.startswith(("_", ".")))


class ParquetTable:
    """A parquet table's row count and size, and reads of its columns or of a range of rows
    (only the row groups that hold them are decoded). The table is a file or a directory of
    part files (`parquet_parts`)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._files = [pq.ParquetFile(part) for part in parquet_parts(self.path)]
        # Every row group of every file, in row order: (file, group within the file).
        self._groups = [
            (file, group) for file in self._files for group in range(file.metadata.num_row_groups)
        ]
        sizes = [file.metadata.row_group(group).num_rows for file, group in self._groups]
        self._group_starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.num_rows = int(self._group_starts[-1])

    def __len__(self) -> int:
        return self.num_rows

    def read(self, columns: list[str] | None = None) -> pd.DataFrame:
        return pa.concat_tables(file.read(columns=columns) for file in self._files).to_pandas()

    def read_rows(self, start: int, stop: int, columns: list[str] | None = None) -> pd.DataFrame:
        """Rows [start, stop) (clipped to the table), as a DataFrame with a fresh index."""
        start, stop = max(0, start), min(stop, self.num_rows)
        if stop <= start:
            schema = self._files[0].schema_arrow
            if columns is not None:
                schema = pa.schema([schema.field(name) for name in columns])
            return schema.empty_table().to_pandas()
        first = int(np.searchsorted(self._group_starts, start, side="right")) - 1
        last = int(np.searchsorted(self._group_starts, stop, side="left"))
        table = pa.concat_tables(
            file.read_row_group(group, columns=columns) for file, group in self._groups[first:last]
        )
        offset = start - int(self._group_starts[first])
        return table.slice(offset, stop - start).to_pandas()


class ParquetTableDataset(AbstractDataset[None, ParquetTable]):
    """Loads a `ParquetTable` handle on a file another catalog entry writes: the transcoded
    `name@parquet` beside a `name@pandas` (`pandas.ParquetDataset`) on the same path.

    Example catalog entry::

        train_samples@parquet:
          type: attention_ctr.datasets.ParquetTableDataset
          filepath: data/05_model_input/train_samples.parquet
    """

    def __init__(self, filepath: str, metadata: dict | None = None) -> None:
        self._filepath = Path(filepath)
        self.metadata = metadata

    def load(self) -> ParquetTable:
        if not parquet_parts(self._filepath):
            raise DatasetError(f"{self._filepath} does not exist: run feature_engineering first")
        return ParquetTable(self._filepath)

    def save(self, data: None) -> None:
        raise DatasetError(
            f"{self._filepath} is read-only here: its pandas entry (name@pandas) writes it"
        )

    def _exists(self) -> bool:
        return bool(parquet_parts(self._filepath))

    def _describe(self) -> dict:
        return {"filepath": str(self._filepath)}
