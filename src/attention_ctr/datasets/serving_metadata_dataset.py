"""A serving bundle's metadata as a versioned catalog entry that says which version it is."""

from __future__ import annotations

import json

from kedro.io.core import DatasetError

from attention_ctr.datasets.versioned_file import VersionedFileDataset


class ServingMetadataDataset(VersionedFileDataset[dict, dict]):
    """The JSON metadata that seals an export run's serving bundle.

    Loading returns the saved dict plus `"version"`: the catalog version it was read from, which
    is the version of every file of that bundle (one export run saves them all at once). The
    promotion gate records it, so the promoted pointer names the bundle that serves. `"version"`
    is not written back on save. After a save, the dataset loads the version it just wrote
    (see `VersionedFileDataset`).

    Example catalog entry::

        "{model}.serving_metadata":
          type: attention_ctr.datasets.ServingMetadataDataset
          filepath: data/06_models/{model}/serving/metadata.json
          versioned: true
    """

    def load(self) -> dict:
        metadata = self._read_json()
        version = self.resolve_load_version() if self._version is not None else None
        return {**metadata, "version": version}

    def save(self, data: dict) -> None:
        if not isinstance(data, dict):
            raise DatasetError(
                f"Cannot save {type(data).__name__} to {self._filepath}: expected a dict"
            )
        metadata = {key: value for key, value in data.items() if key != "version"}
        self._write_bytes(json.dumps(metadata, indent=2).encode())
