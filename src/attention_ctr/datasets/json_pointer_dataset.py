"""A small JSON file that is read by serving while retraining rewrites it: atomic, never torn."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import PurePosixPath
from typing import Any

from filelock import FileLock
from kedro.io.core import DatasetError, get_filepath_str

from attention_ctr.datasets.versioned_file import VersionedFileDataset

logger = logging.getLogger(__name__)


class PointerUpdate(dict):
    """A new pointer computed from `base` (the pointer as a run read it), and how to compute
    it again from whatever the file holds when the run saves (`rebase(current) -> new`).

    Saving one to a `JsonPointerDataset` re-reads the file under its lock: when another run
    moved the pointer in between, `rebase` decides again on the current content, so no run's
    promotion is silently overwritten.
    """

    def __init__(self, pointer: dict, base: dict, rebase: Callable[[dict], dict]) -> None:
        super().__init__(pointer)
        self.base = base
        self.rebase = rebase


class JsonPointerDataset(VersionedFileDataset[dict, dict]):
    """An unversioned JSON object, e.g. which model version serves (`promoted_models`).

    Loading a file that does not exist yet returns `{}` (nothing promoted so far); a file that
    exists but is not a JSON object is an error naming it. Saving replaces the file atomically
    (see `VersionedFileDataset`), so a reader sees the old or the new pointer, never half of one;
    on a local disk the read-modify-write of a `PointerUpdate` holds a lock (`<file>.lock`), so
    two runs saving at once take turns.

    Example catalog entry::

        promoted_models:
          type: attention_ctr.datasets.JsonPointerDataset
          filepath: data/06_models/promoted_models.json
    """

    def __init__(self, *, filepath: str, fs_args: dict[str, Any] | None = None) -> None:
        super().__init__(filepath=filepath, version=None, fs_args=fs_args)

    def _lock(self):
        if self._protocol != "file":  # no portable lock on object stores: atomic rename only
            return nullcontext()
        path = get_filepath_str(self._filepath, self._protocol)
        self._fs.makedirs(str(PurePosixPath(path).parent), exist_ok=True)
        return FileLock(f"{path}.lock", timeout=600)

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
        if not isinstance(data, PointerUpdate):  # a whole new pointer: the rename is enough
            self._write_bytes(json.dumps(data, indent=2).encode())
            return
        with self._lock():
            current = self.load()
            if current != data.base:
                logger.warning(
                    "%s was moved by another run since this run read it: deciding again "
                    "on its current content",
                    self._filepath,
                )
                data = data.rebase(current)
            self._write_bytes(json.dumps(dict(data), indent=2).encode())
