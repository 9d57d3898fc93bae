"""Custom Kedro datasets of this project."""

from attention_ctr.datasets.behavior_log_dataset import BehaviorLogDataset, BehaviorLogSource
from attention_ctr.datasets.json_pointer_dataset import JsonPointerDataset, PointerUpdate
from attention_ctr.datasets.onnx_model_dataset import OnnxModelDataset
from attention_ctr.datasets.parquet_table_dataset import ParquetTable, ParquetTableDataset
from attention_ctr.datasets.serving_metadata_dataset import ServingMetadataDataset
from attention_ctr.datasets.torch_model_dataset import TorchModelDataset

__all__ = [
    "BehaviorLogDataset",
    "BehaviorLogSource",
    "JsonPointerDataset",
    "OnnxModelDataset",
    "ParquetTable",
    "ParquetTableDataset",
    "PointerUpdate",
    "ServingMetadataDataset",
    "TorchModelDataset",
]
