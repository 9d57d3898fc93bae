"""An exported ONNX graph as a versioned catalog entry: the serialised bytes, checked on load."""

from __future__ import annotations

import onnx
from kedro.io.core import DatasetError

from attention_ctr.datasets.versioned_file import VersionedFileDataset


class OnnxModelDataset(VersionedFileDataset[bytes, bytes]):
    """Saves a serialised ONNX model (`bytes`, e.g. from `attention_ctr.onnx_export.export_onnx`).

    Loading returns the bytes after parsing them with `onnx` and running `onnx.checker`, so a
    truncated or corrupt file fails here, naming the file, rather than inside onnxruntime.
    Saving refuses bytes that do not parse as an ONNX model. After a save, the dataset loads
    the version it just wrote (see `VersionedFileDataset`).

    Example catalog entry::

        "{model}.onnx_model":
          type: attention_ctr.datasets.OnnxModelDataset
          filepath: data/06_models/{model}/serving/model.onnx
          versioned: true
    """

    def load(self) -> bytes:
        graph, path = self._read_bytes()
        _check(graph, path)
        return graph

    def save(self, data: bytes) -> None:
        if not isinstance(data, bytes | bytearray):
            raise DatasetError(
                f"Cannot save {type(data).__name__} to {self._filepath}: expected the serialised "
                "ONNX model as bytes (attention_ctr.onnx_export.export_onnx returns them)"
            )
        _check(bytes(data), str(self._filepath))
        self._write_bytes(bytes(data))


def _check(graph: bytes, path: str) -> None:
    try:
        onnx.checker.check_model(onnx.load_from_string(graph))
    except Exception as error:  # onnx raises DecodeError, ValidationError, ...
        raise DatasetError(f"{path} is not a valid ONNX model: {error}") from error
