"""A trained model as a versioned catalog entry: its config and state_dict, never a pickle."""

from __future__ import annotations

import io

import torch
from kedro.io.core import DatasetError
from torch import nn

from attention_ctr.datasets.versioned_file import VersionedFileDataset


class TorchModelDataset(VersionedFileDataset[nn.Module, nn.Module]):
    """Saves `{"model": name, "config": kwargs, "state_dict": ...}` with `torch.save`.

    Loading reads it with `torch.load(weights_only=True)` (tensors and plain containers only,
    so loading runs no code from the file) and rebuilds the module with
    `attention_ctr.models.build_model(name, **config)`. The model must carry `name` and
    `config` attributes, as every model built by `build_model` does. After a save, the
    dataset loads the version it just wrote (see `VersionedFileDataset`).

    Example catalog entry::

        din.model:
          type: attention_ctr.datasets.TorchModelDataset
          filepath: data/06_models/din/model.pt
          versioned: true
    """

    def load(self) -> nn.Module:
        from attention_ctr.models import build_model

        content, _ = self._read_bytes()
        artifact = torch.load(io.BytesIO(content), map_location="cpu", weights_only=True)
        model = build_model(artifact["model"], **artifact["config"])
        model.load_state_dict(artifact["state_dict"])
        return model.eval()

    def save(self, data: nn.Module) -> None:
        if not hasattr(data, "name") or not hasattr(data, "config"):
            raise DatasetError(
                f"Cannot save {type(data).__name__} to {self._filepath}: a model needs `name` "
                "and `config` attributes (build it with attention_ctr.models.build_model)"
            )
        state_dict = {key: value.detach().cpu() for key, value in data.state_dict().items()}
        buffer = io.BytesIO()
        torch.save(
            {"model": data.name, "config": dict(data.config), "state_dict": state_dict}, buffer
        )
        self._write_bytes(buffer.getvalue())
