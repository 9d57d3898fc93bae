"""Custom Kedro datasets of this project."""

from attention_ctr.datasets.behavior_log_dataset import BehaviorLogDataset, BehaviorLogSource

__all__ = ["BehaviorLogDataset", "BehaviorLogSource"]
