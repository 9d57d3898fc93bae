"""Pipeline 'evaluation': per-model metrics and latency, model comparison, plots, explanations."""

from attention_ctr.pipelines.evaluation.pipeline import create_pipeline

__all__ = ["create_pipeline"]
