"""A small JSON file that is read by serving while retraining rewrites it: atomic, never torn."""

from __future__ import annotations

import json
import uuid
from pathlib import PurePosixPath
from typing import Any

import fsspec
from kedro.io.core import AbstractDataset, DatasetError, get_filepath_str, get_protocol_and_path


class JsonPointerDataset(AbstractDataset[dict, dict]):
    """An unversioned JSON object, e.g. which model version serves (`promoted_models`).

    Loading a file that does not exist yet returns `{}` (nothing promoted so far); a file that
    exists but is not a JSON object is an error naming it. Saving writes a temporary file
    beside it and renames it over the old one, so a reader sees the old or the new pointer,
    never half of one.

    Example catalog entry::

        promoted_models:
          type: attention_ctr.datasets.JsonPointerDataset
          filepath: data/06_models/promoted_models.json
    """

    def __init__(self, *, filepath: str, fs_args: dict[str, Any] | None = None) -> None:
        protocol, path = get_protocol_and_path(filepath)
        self._protocol = protocol
        self._fs = fsspec.filesystem(protocol, **(fs_args or {}))
        self._filepath = PurePosixPath(path)

    def load(self) -> dict:
        path = get_filepath_str(self._filepath, self._protocol)
        if not self._fs.exists(path):
            return {}
        with self._fs.open(path, "rb") as handle:
            text = handle.read()
        try:
            pointer = json.loads(text)
        except ValueError as error:
            raise DatasetError(f"{path} is not valid JSON: {error}") from error
        if not isinstance(pointer, dict):
            raise DatasetError(f"{path} must hold a JSON object, not {type(pointer).__name__}")
        return pointer

    def save(self, data: dict) -> None:
        if not isinstance(data, dict):
            raise DatasetError(
                f"Cannot save {type(data).__name__} to {self._filepath}: expected a dict"
            )
        path = get_filepath_str(self._filepath, self._protocol)
        self._fs.makedirs(str(self._filepath.parent), exist_ok=True)
        temporary = f"{path}.{uuid.uuid4().hex}.tmp"
        with self._fs.open(temporary, "wb") as handle:
            handle.write(json.dumps(data, indent=2).encode())
        self._fs.mv(temporary, path)

    def _exists(self) -> bool:
        return self._fs.exists(get_filepath_str(self._filepath, self._protocol))

    def _describe(self) -> dict[str, Any]:
        return {"filepath": str(self._filepath), "protocol": self._protocol}
