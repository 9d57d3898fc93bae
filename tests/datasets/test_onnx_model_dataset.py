"""OnnxModelDataset: versioned bytes, checked on save and on load."""

from __future__ import annotations

import pytest
from kedro.io.core import DatasetError, Version

from attention_ctr.datasets import OnnxModelDataset
from attention_ctr.models import build_model
from attention_ctr.onnx_export import export_onnx

pytestmark = pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")


@pytest.fixture(scope="module")
def graph() -> bytes:
    model = build_model("pooling", n_items=20, n_categories=3, max_history=4, embedding_dim=4)
    return export_onnx(model)


def test_versions_round_trip_and_a_dataset_reads_back_its_own_save(tmp_path, graph):
    filepath = str(tmp_path / "model.onnx")
    first = OnnxModelDataset(filepath=filepath, version=Version(None, "2024-01-01T00.00.00.000Z"))
    first.save(graph)
    newer = OnnxModelDataset(filepath=filepath, version=Version(None, "2025-01-01T00.00.00.000Z"))
    newer.save(graph + b"")  # same graph, a newer version on disk
    assert first.load() == graph  # pinned to what it wrote, not to the newest on disk
    assert first.resolve_load_version() == "2024-01-01T00.00.00.000Z"
    assert OnnxModelDataset(filepath=filepath, version=Version(None, None)).list_versions(
        full_path=False
    ) == ["2025-01-01T00.00.00.000Z", "2024-01-01T00.00.00.000Z"]


def test_a_corrupt_file_fails_on_load_naming_the_file(tmp_path, graph):
    dataset = OnnxModelDataset(filepath=str(tmp_path / "model.onnx"))
    dataset.save(graph)
    (tmp_path / "model.onnx").write_bytes(graph[: len(graph) // 2])
    with pytest.raises(DatasetError, match=r"model\.onnx is not a valid ONNX model"):
        dataset.load()


def test_save_refuses_what_is_not_an_onnx_model(tmp_path):
    dataset = OnnxModelDataset(filepath=str(tmp_path / "model.onnx"))
    with pytest.raises(DatasetError, match="expected the serialised ONNX model as bytes"):
        dataset.save("model.onnx")
    with pytest.raises(DatasetError, match="not a valid ONNX model"):
        dataset.save(b"not a graph")
    assert not (tmp_path / "model.onnx").exists()
