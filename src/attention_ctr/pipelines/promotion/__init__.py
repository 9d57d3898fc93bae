"""Promotion: the gate that decides which exported model version serves."""

from attention_ctr.pipelines.promotion.pipeline import create_pipeline

__all__ = ["create_pipeline"]
