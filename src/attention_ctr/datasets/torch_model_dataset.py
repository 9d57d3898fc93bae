"""A trained model as a versioned catalog entry: its config and state_dict, never a pickle."""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Any

import fsspec
import torch
from kedro.io.core import (
    AbstractVersionedDataset,
    DatasetError,
    Version,
    get_filepath_str,
    get_protocol_and_path,
)
from torch import nn


class TorchModelDataset(AbstractVersionedDataset[nn.Module, nn.Module]):
    """Saves `{"model": name, "config": kwargs, "state_dict": ...}` with `torch.save`.

    Loading reads it with `torch.load(weights_only=True)` (tensors and plain containers only,
    so loading runs no code from the file) and rebuilds the module with
    `attention_ctr.models.build_model(name, **config)`. The model must carry `name` and
    `config` attributes, as every model built by `build_model` does.

    Example catalog entry::

        din.model:
          type: attention_ctr.datasets.TorchModelDataset
          filepath: data/06_models/din/model.pt
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

    def load(self) -> nn.Module:
        from attention_ctr.models import build_model

        path = get_filepath_str(self._get_load_path(), self._protocol)
        with self._fs.open(path, "rb") as handle:
            artifact = torch.load(handle, map_location="cpu", weights_only=True)
        model = build_model(artifact["model"], **artifact["config"])
        model.load_state_dict(artifact["state_dict"])
        return model.eval()

    def save(self, data: nn.Module) -> None:
        if not hasattr(data, "name") or not hasattr(data, "config"):
            raise DatasetError(
                f"Cannot save {type(data).__name__} to {self._filepath}: a model needs `name` "
                "and `config` attributes (build it with attention_ctr.models.build_model)"
            )
        path = get_filepath_str(self._get_save_path(), self._protocol)
        self._fs.makedirs(str(PurePosixPath(path).parent), exist_ok=True)
        state_dict = {key: value.detach().cpu() for key, value in data.state_dict().items()}
        with self._fs.open(path, "wb") as handle:
            torch.save(
                {"model": data.name, "config": dict(data.config), "state_dict": state_dict},
                handle,
            )
        self._clear_version_cache()  # the next load finds the version just written

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
