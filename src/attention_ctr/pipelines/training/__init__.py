"""Pipeline 'training': one namespaced branch per model (pooling, din, dien, bst)."""

from attention_ctr.pipelines.training.pipeline import create_pipeline

__all__ = ["create_pipeline"]
