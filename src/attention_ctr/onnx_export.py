"""ONNX export of the CTR models and onnxruntime sessions for them (plain torch/onnx, no Kedro).

The TorchScript exporter (`dynamo=False`) is used on purpose: the dynamo exporter mis-exports
recurrent loops (DIEN's AUGRU). Two graphs per model, same input and output names:

- the batch graph (`export_onnx`): the model's `forward`, B samples with B histories, traced
  at batch 2 with the full `max_history` (never at size 1: a size-1 trace can bake a broadcast
  into the graph); batch and history axes are dynamic: any B >= 1, 1 <= L <= max_history;
- the request graph (`export_request_onnx`): ONE user's history `[1, L]` (its first axis is 1
  by design) against K candidates `[K]` (dynamic, traced at 3), what a server does per
  request. What depends on the history alone runs once per request instead of once per
  candidate: the history's embeddings, DIN's history term of the activation unit's first
  layer, DIEN's interest-extractor GRU and AUGRU input projections, BST's history tokens and
  their first-layer query/key/value. Other models expand the history and run `forward`.

The request graph is the model's own `score_request`; this module knows no model. Traced loops
(DIEN's AUGRU) unroll at the traced length, so every graph pads its history inputs to
`max_history` first (padding is masked: the same scores for any L <= max_history). The export
pipeline's parity gate checks both graphs against eager `forward`.
"""

from __future__ import annotations

import io
import warnings
from copy import deepcopy

import numpy as np
import onnx
import torch
from torch import nn

from attention_ctr.models import random_batch
from attention_ctr.models.base import pad_positions
from attention_ctr.runtime import onnx_session

__all__ = ["export_inputs", "export_onnx", "export_request_onnx", "onnx_feed", "onnx_session"]

# Inputs of every exported graph, in order; the output is "logits" [batch].
EXPORT_INPUTS = ("target_item", "target_category", "hist_item", "hist_category", "time_gap", "mask")
OUTPUT_NAME = "logits"
OPSET = 17


class _Graph(nn.Module):
    """The model with positional tensor inputs, as `torch.onnx.export` wants them, its history
    inputs padded to `max_history`; runs `forward` or `score_request` (`method`)."""

    def __init__(self, model: nn.Module, input_names: tuple[str, ...], method: str):
        super().__init__()
        self.model = model
        self.input_names = input_names
        self.method = method

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        batch = {
            name: pad_positions(value, self.model.max_history) if value.dim() == 2 else value
            for name, value in zip(self.input_names, tensors)
        }
        return getattr(self.model, self.method)(batch)


def export_inputs(model: nn.Module) -> tuple[str, ...]:
    """The graph's input names: the shared ones, plus the behaviour type when the model uses it."""
    if model.config.get("use_behavior"):
        return (*EXPORT_INPUTS, "hist_behavior")
    return EXPORT_INPUTS


def export_onnx(model: nn.Module) -> bytes:
    """The model as a serialised, checked ONNX graph with dynamic batch and history axes."""
    model = deepcopy(model).eval().cpu()
    names = export_inputs(model)
    example = random_batch(2, model.max_history, **model.config, seed=0)
    axes = {name: {0: "batch", 1: "history"} for name in names if example[name].dim() == 2}
    axes.update(target_item={0: "batch"}, target_category={0: "batch"})
    return _export(_Graph(model, names, "forward"), example, names, axes)


def export_request_onnx(model: nn.Module) -> bytes:
    """The request graph: history inputs `[1, L]` (one user), targets `[K]` (candidates)."""
    model = deepcopy(model).eval().cpu()
    names = export_inputs(model)
    example = random_batch(3, model.max_history, **model.config, seed=0)  # row 0: full history
    example = {key: value[:1] if value.dim() == 2 else value for key, value in example.items()}
    axes = {name: {1: "history"} for name in names if example[name].dim() == 2}
    axes.update(target_item={0: "candidates"}, target_category={0: "candidates"})
    return _export(_Graph(model, names, "score_request"), example, names, axes)


def _export(module: nn.Module, example: dict, names: tuple[str, ...], axes: dict) -> bytes:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # Tracer warnings about Python-side shape checks are expected and harmless here.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module.eval(),
            tuple(example[name] for name in names),
            buffer,
            input_names=list(names),
            output_names=[OUTPUT_NAME],
            dynamic_axes={**axes, OUTPUT_NAME: {0: next(iter(axes["target_item"].values()))}},
            dynamo=False,
            opset_version=OPSET,
        )
    graph = buffer.getvalue()
    onnx.checker.check_model(onnx.load_from_string(graph))
    return graph


def onnx_feed(session, batch: dict) -> dict[str, np.ndarray]:
    """The session's inputs taken from a batch dict of tensors or arrays."""
    return {
        item.name: np.asarray(
            batch[item.name].cpu() if torch.is_tensor(batch[item.name]) else batch[item.name]
        )
        for item in session.get_inputs()
    }
