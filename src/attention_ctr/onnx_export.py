"""ONNX export of the CTR models and onnxruntime sessions for them (plain torch/onnx, no Kedro).

The TorchScript exporter (`dynamo=False`) is used on purpose: the dynamo exporter mis-exports
recurrent loops (see MISSION.md). The graph is traced at batch 2 with the full `max_history`,
never at size 1 (a size-1 trace can bake a broadcast into the graph), and both the batch and the
history axes are dynamic, so the exported model takes any B >= 1 and 1 <= L <= max_history.

Two graphs per model, same inputs and output names:

- the batch graph (`export_onnx`): the model's own `forward`, B samples with B histories;
- the request graph (`export_request_onnx`): ONE user's history `[1, L]` scored against K
  candidates `[K]`, what a server does per request. Work that depends on the history alone runs
  once per request instead of once per candidate: DIN's history term of the activation unit's
  first layer, DIEN's interest-extractor GRU and the AUGRU's input projection, the embedding
  lookups of the history. Models without such a split expand the history and run `forward`.
  The same parity gate checks both graphs against eager `forward` on the tiled batch.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable

import numpy as np
import onnx
import onnxruntime
import torch
import torch.nn.functional as F
from torch import nn

from attention_ctr.models import random_batch
from attention_ctr.models.layers import masked_mean, masked_softmax, pad_positions

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
    return _export(_PositionalInputs(model, names), example, names, axes)


def export_request_onnx(model: nn.Module) -> bytes:
    """The request graph: history inputs `[1, L]` (one user), targets `[K]` (candidates)."""
    model = model.eval().cpu()
    names = export_inputs(model)
    example = random_batch(3, model.max_history, **model.config, seed=0)  # row 0: full history
    example = {key: value[:1] if value.dim() == 2 else value for key, value in example.items()}
    axes = {name: {1: "history"} for name in names if example[name].dim() == 2}
    axes.update(target_item={0: "candidates"}, target_category={0: "candidates"})
    request = REQUEST_MODULES.get(model.name, _ExpandedRequest)(model)
    return _export(_PositionalInputs(request, names), example, names, axes)


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


# -- request graphs: one history [1, L], K candidates [K] -------------------------------------
def _request_vectors(model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Target vectors `[K, E]` and the one history `[1, L, E]` (padding read as id 0)."""
    embedding, mask = model.embedding, batch["mask"]
    target = embedding.items(batch["target_item"], batch["target_category"])
    history = embedding.items(
        batch["hist_item"].masked_fill(~mask, 0), batch["hist_category"].masked_fill(~mask, 0)
    )
    if embedding.behavior_embedding is not None:
        history = history + embedding.behavior_embedding(
            batch["hist_behavior"].masked_fill(~mask, 0)
        )
    return target, history


class _ExpandedRequest(nn.Module):
    """Any model: the history expanded to every candidate, then the model's `forward`."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: dict) -> torch.Tensor:
        candidates = batch["target_item"].shape[0]
        return self.model(
            {
                key: value.expand(candidates, -1) if value.dim() == 2 else value
                for key, value in batch.items()
            }
        )


class _DINRequest(_ExpandedRequest):
    """DIN: the activation unit's first layer W [h, t, h - t, h * t] + b split as
    (W_h + W_d) h, once per request, + W_p (h * t) + (W_t - W_d) t + b per candidate."""

    def forward(self, batch: dict) -> torch.Tensor:
        model = self.model
        target, history = _request_vectors(model, batch)  # [K, E], [1, L, E]
        keep = batch["mask"].expand(target.shape[0], -1)  # [K, L]
        unit = model.activation_unit
        linear = unit.unit.linears[0]
        w_h, w_t, w_d, w_p = linear.weight.split(history.shape[-1], dim=1)
        hidden = (
            F.linear(history, w_h + w_d)  # [1, L, A], once per request
            + F.linear(history * target[:, None, :], w_p)  # [K, L, A]
            + F.linear(target, w_t - w_d, linear.bias)[:, None, :]  # [K, 1, A]
        )
        scores = unit.unit.after_first_linear(hidden, keep).squeeze(-1).masked_fill(~keep, 0.0)
        if unit.normalization == "softmax":
            scores = masked_softmax(scores, keep)
        features = [scores @ history[0], target]  # interest = sum_j w_j h_j: [K, E]
        if model.use_pooled_history:
            features.append(masked_mean(history, batch["mask"]).expand(target.shape[0], -1))
        return model.mlp(torch.cat(features, dim=-1)).squeeze(-1).float()


class _DIENRequest(_ExpandedRequest):
    """DIEN: the interest extractor GRU and the AUGRU's input projection run once per request;
    attention and the AUGRU recurrence per candidate."""

    def forward(self, batch: dict) -> torch.Tensor:
        model = self.model
        target, history = _request_vectors(model, batch)  # [K, E], [1, L, E]
        candidates, mask = target.shape[0], batch["mask"]
        states = model._interest_states(history)  # [1, L, H], once per request
        query = F.linear(target, model.attention_weight)  # W e_target: [K, H]
        weights = masked_softmax(query @ states[0].t(), mask.expand(candidates, -1))  # [K, L]
        # The loop is traced unrolled: pad to max_history (a_t = 0 keeps the state), as DIEN does.
        states = pad_positions(states, model.max_history)
        weights = pad_positions(weights.unsqueeze(-1), model.max_history)  # [K, M, 1]
        evolution = model.evolution
        projected = evolution.input_projection(states)[0]  # [M, 3H], once per request
        h = target.new_zeros(candidates, evolution.hidden_size)
        for projected_t, a_t in zip(projected.unbind(0), weights.unbind(1)):
            h = evolution.step(projected_t.unsqueeze(0), h, a_t)
        pooled = masked_mean(history, mask).expand(candidates, -1)
        return model.mlp(torch.cat([h, target, pooled], dim=-1)).squeeze(-1).float()


REQUEST_MODULES: dict[str, Callable[[nn.Module], nn.Module]] = {
    "din": _DINRequest,
    "dien": _DIENRequest,
}


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
