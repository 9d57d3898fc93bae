"""A small JSON file that is read by serving while retraining rewrites it: atomic, never torn."""

from __future__ import annotations

import json
from typing import Any

from kedro.io.core import DatasetError

from attention_ctr.datasets.versioned_file import VersionedFileDataset


class JsonPointerDataset(VersionedFileDataset[dict, dict]):
    """An unversioned JSON object, e.g. which model version serves (`promoted_models`).

    Loading a file that does not exist yet returns `{}` (nothing promoted so far); a file that
    exists but is not a JSON object is an error naming it. Saving replaces the file atomically
    (see `VersionedFileDataset`), so a reader sees the old or the new pointer, never half of one.

    Example catalog entry::

        promoted_models:
          type: attention_ctr.datasets.JsonPointerDataset
          filepath: data/06_models/promoted_models.json
    """

    def __init__(self, *, filepath: str, fs_args: dict[str, Any] | None = None) -> None:
        super().__init__(filepath=filepath, version=None, fs_args=fs_args)

    def load(self) -> dict:
        if not self._exists():
            return {}
        pointer = self._read_json()
        if not isinstance(pointer, dict):
            raise DatasetError(
                f"{self._filepath} must hold a JSON object, not {type(pointer).__name__}"
            )
        return pointer

    def save(self, data: dict) -> None:
        if not isinstance(data, dict):
            raise DatasetError(
                f"Cannot save {type(data).__name__} to {self._filepath}: expected a dict"
            )
        self._write_bytes(json.dumps(data, indent=2).encode())
