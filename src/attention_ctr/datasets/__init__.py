"""Custom Kedro datasets of this project."""

from attention_ctr.datasets.behavior_log_dataset import BehaviorLogDataset, BehaviorLogSource
from attention_ctr.datasets.onnx_model_dataset import OnnxModelDataset
from attention_ctr.datasets.torch_model_dataset import TorchModelDataset

__all__ = ["BehaviorLogDataset", "BehaviorLogSource", "OnnxModelDataset", "TorchModelDataset"]
