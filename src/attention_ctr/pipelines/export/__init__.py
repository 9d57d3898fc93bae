"""Pipeline 'export': one namespaced branch per model: ONNX graph, parity gate, serving bundle."""

from attention_ctr.pipelines.export.pipeline import create_pipeline

__all__ = ["create_pipeline"]
