"""Pipeline 'ingestion': raw behaviour logs -> validated interactions, quarantine and report."""

from attention_ctr.pipelines.ingestion.pipeline import create_pipeline

__all__ = ["create_pipeline"]
