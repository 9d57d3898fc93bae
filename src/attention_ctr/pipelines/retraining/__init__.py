"""Pipeline 'retraining': newest raw logs to a gated, promoted export (what a scheduler runs)."""

from attention_ctr.pipelines.retraining.pipeline import create_pipeline

__all__ = ["create_pipeline"]
