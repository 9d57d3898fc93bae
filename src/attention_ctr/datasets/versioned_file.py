"""What the project's file datasets share: an fsspec file, versioned by Kedro, read as bytes."""

from __future__ import annotations

import hashlib
import json
import uuid
from pathlib import PurePosixPath
from typing import Any, TypeVar

import fsspec
from kedro.io.core import (
    AbstractVersionedDataset,
    DatasetError,
    Version,
    get_filepath_str,
    get_protocol_and_path,
)

_DI = TypeVar("_DI")
_DO = TypeVar("_DO")


class VersionedFileDataset(AbstractVersionedDataset[_DI, _DO]):
    """A versioned file on any fsspec filesystem; subclasses turn its bytes into objects.

    After a save, the dataset object loads the version it just wrote, not "the newest on disk":
    a run that saves a model and reads it back gets its own, even while another run writes a
    newer version beside it.
    """

    def __init__(
        self,
        *,
        filepath: str,
        version: Version | None = None,
        fs_args: dict[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        protocol, path = get_protocol_and_path(filepath, version)
        self._protocol = protocol
        self._fs = fsspec.filesystem(protocol, **(fs_args or {}))
        self.metadata = metadata
        super().__init__(
            filepath=PurePosixPath(path),
            version=version,
            exists_function=self._fs.exists,
            glob_function=self._fs.glob,
        )

    def _read_bytes(self) -> tuple[bytes, str]:
        """(the file's bytes, its path) for the version to load."""
        path = get_filepath_str(self._get_load_path(), self._protocol)
        with self._fs.open(path, "rb") as handle:
            return handle.read(), path

    def file_sha256(self) -> str:
        """sha256 of the stored bytes of the version to load, read in 1 MiB chunks and not
        parsed (how `attention_ctr.serving` checks a batch graph it does not load)."""
        path = get_filepath_str(self._get_load_path(), self._protocol)
        digest = hashlib.sha256()
        with self._fs.open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
        return digest.hexdigest()

    def _read_json(self) -> object:
        """The JSON value of the version to load; invalid JSON is an error naming the file."""
        text, path = self._read_bytes()
        try:
            return json.loads(text)
        except ValueError as error:
            raise DatasetError(f"{path} is not valid JSON: {error}") from error

    def _write_bytes(self, data: bytes) -> None:
        """Write through a temporary file renamed over the target: a reader (a server loading
        the newest model, a pointer being moved) sees the old file or the new one, never half."""
        save_path = self._get_save_path()
        path = get_filepath_str(save_path, self._protocol)
        self._fs.makedirs(str(PurePosixPath(path).parent), exist_ok=True)
        temporary = f"{path}.{uuid.uuid4().hex}.tmp"
        with self._fs.open(temporary, "wb") as handle:
            handle.write(data)
        self._fs.mv(temporary, path)
        if self._version is not None:  # read back this save, whatever else appears on disk
            self._version = Version(save_path.parent.name, self._version.save)
        self._clear_version_cache()

    def _exists(self) -> bool:
        try:
            path = self._get_load_path()
        except DatasetError:
            return False
        return self._fs.exists(get_filepath_str(path, self._protocol))

    def _describe(self) -> dict[str, Any]:
        return {
            "filepath": str(self._filepath),
            "protocol": self._protocol,
            "version": self._version,
        }
