"""TorchModelDataset: config + state_dict, loaded with weights_only, read back per save."""

from __future__ import annotations

import pytest
import torch
from kedro.io.core import DatasetError, Version

from attention_ctr.datasets import TorchModelDataset
from attention_ctr.models import build_model

SIZES = {"n_items": 20, "n_categories": 3, "max_history": 4, "embedding_dim": 4}


def test_a_dataset_reads_back_its_own_save_while_a_newer_version_appears(tmp_path):
    filepath = str(tmp_path / "model.pt")
    ours, theirs = build_model("din", **SIZES), build_model("din", **SIZES)
    torch.nn.init.constant_(theirs.item_embedding.weight, 1.0)
    first = TorchModelDataset(filepath=filepath, version=Version(None, "2024-01-01T00.00.00.000Z"))
    first.save(ours)
    newer = TorchModelDataset(filepath=filepath, version=Version(None, "2025-01-01T00.00.00.000Z"))
    newer.save(theirs)

    loaded = first.load()
    assert loaded.name == "din" and loaded.config == ours.config
    torch.testing.assert_close(loaded.state_dict(), ours.state_dict())
    latest = TorchModelDataset(filepath=filepath, version=Version(None, None)).load()
    torch.testing.assert_close(latest.item_embedding.weight, theirs.item_embedding.weight)


def test_save_refuses_a_module_without_name_and_config(tmp_path):
    dataset = TorchModelDataset(filepath=str(tmp_path / "model.pt"))
    with pytest.raises(DatasetError, match="needs `name`"):
        dataset.save(torch.nn.Linear(2, 1))
