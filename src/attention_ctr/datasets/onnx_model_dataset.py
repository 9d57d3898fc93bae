"""An exported ONNX graph as a versioned catalog entry: the serialised bytes, checked on load."""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Any

import fsspec
import onnx
from kedro.io.core import (
    AbstractVersionedDataset,
    DatasetError,
    Version,
    get_filepath_str,
    get_protocol_and_path,
)


class OnnxModelDataset(AbstractVersionedDataset[bytes, bytes]):
    """Saves a serialised ONNX model (`bytes`, e.g. from `attention_ctr.onnx_export.export_onnx`).

    Loading returns the bytes after parsing them with `onnx` and running `onnx.checker`, so a
    truncated or corrupt file fails here, naming the file, rather than inside onnxruntime.
    Saving refuses bytes that do not parse as an ONNX model. After a save, this dataset object
    loads the version it just wrote (not "the newest on disk"): a pipeline that exports and
    then checks the file reads its own export even while another run writes a newer version.

    Example catalog entry::

        "{model}.onnx_model":
          type: attention_ctr.datasets.OnnxModelDataset
          filepath: data/06_models/{model}/serving/model.onnx
          versioned: true
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

    def load(self) -> bytes:
        path = get_filepath_str(self._get_load_path(), self._protocol)
        with self._fs.open(path, "rb") as handle:
            graph = handle.read()
        _check(graph, path)
        return graph

    def save(self, data: bytes) -> None:
        if not isinstance(data, bytes | bytearray):
            raise DatasetError(
                f"Cannot save {type(data).__name__} to {self._filepath}: expected the serialised "
                "ONNX model as bytes (attention_ctr.onnx_export.export_onnx returns them)"
            )
        _check(bytes(data), str(self._filepath))
        save_path = self._get_save_path()
        path = get_filepath_str(save_path, self._protocol)
        self._fs.makedirs(str(PurePosixPath(path).parent), exist_ok=True)
        with self._fs.open(path, "wb") as handle:
            handle.write(data)
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


def _check(graph: bytes, path: str) -> None:
    try:
        onnx.checker.check_model(onnx.load_from_string(graph))
    except Exception as error:  # onnx raises DecodeError, ValidationError, ...
        raise DatasetError(f"{path} is not a valid ONNX model: {error}") from error
