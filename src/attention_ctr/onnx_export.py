"""ONNX export of the CTR models and onnxruntime sessions for them (plain torch/onnx, no Kedro).

The TorchScript exporter (`dynamo=False`) is used on purpose: the dynamo exporter mis-exports
recurrent loops (see MISSION.md). The graph is traced at batch 2 with the full `max_history`,
never at size 1 (a size-1 trace can bake a broadcast into the graph), and both the batch and the
history axes are dynamic, so the exported model takes any B >= 1 and 1 <= L <= max_history.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import onnx
import onnxruntime
import torch
from torch import nn

from attention_ctr.models import random_batch

# Inputs of every exported graph, in order; the output is "logits" [batch].
EXPORT_INPUTS = ("target_item", "target_category", "hist_item", "hist_category", "time_gap", "mask")
OUTPUT_NAME = "logits"
OPSET = 17


class _PositionalInputs(nn.Module):
    """The model with positional tensor inputs, as `torch.onnx.export` wants them."""

    def __init__(self, model: nn.Module, input_names: tuple[str, ...]):
        super().__init__()
        self.model = model
        self.input_names = input_names

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        return self.model(dict(zip(self.input_names, tensors)))


def export_inputs(model: nn.Module) -> tuple[str, ...]:
    """The graph's input names: the shared ones, plus the behaviour type when the model uses it."""
    if model.config.get("use_behavior"):
        return (*EXPORT_INPUTS, "hist_behavior")
    return EXPORT_INPUTS


def export_onnx(model: nn.Module) -> bytes:
    """The model as a serialised, checked ONNX graph with dynamic batch and history axes."""
    model = model.eval().cpu()
    names = export_inputs(model)
    example = random_batch(2, model.max_history, **model.config, seed=0)
    axes = {name: {0: "batch", 1: "history"} for name in names if example[name].dim() == 2}
    axes.update(target_item={0: "batch"}, target_category={0: "batch"})
    axes[OUTPUT_NAME] = {0: "batch"}
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # Tracer warnings about Python-side shape checks are expected and harmless here.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            _PositionalInputs(model, names).eval(),
            tuple(example[name] for name in names),
            buffer,
            input_names=list(names),
            output_names=[OUTPUT_NAME],
            dynamic_axes=axes,
            dynamo=False,
            opset_version=OPSET,
        )
    graph = buffer.getvalue()
    onnx.checker.check_model(onnx.load_from_string(graph))
    return graph


def onnx_session(graph: bytes, threads: int = 2) -> onnxruntime.InferenceSession:
    """A CPU session with a fixed thread count and no spinning (spinning threads skew latency)."""
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return onnxruntime.InferenceSession(
        graph, sess_options=options, providers=["CPUExecutionProvider"]
    )


def onnx_feed(session: onnxruntime.InferenceSession, batch: dict) -> dict[str, np.ndarray]:
    """The session's inputs taken from a batch dict of tensors or arrays."""
    return {
        item.name: np.asarray(
            batch[item.name].cpu() if torch.is_tensor(batch[item.name]) else batch[item.name]
        )
        for item in session.get_inputs()
    }
