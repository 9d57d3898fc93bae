"""Pipeline 'feature_engineering': interactions -> ids, sequences, samples, cold-start tables."""

from attention_ctr.pipelines.feature_engineering.pipeline import create_pipeline

__all__ = ["create_pipeline"]
