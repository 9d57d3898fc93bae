"""ONNX export of the CTR models and onnxruntime sessions for them (plain torch/onnx, no Kedro).

The TorchScript exporter (`dynamo=False`) is used on purpose: the dynamo exporter mis-exports
recurrent loops (see MISSION.md). Two graphs per model, same input and output names:

- the batch graph (`export_onnx`): the model's `forward`, B samples with B histories, traced
  at batch 2 with the full `max_history` (never at size 1: a size-1 trace can bake a broadcast
  into the graph); batch and history axes are dynamic: any B >= 1, 1 <= L <= max_history;
- the request graph (`export_request_onnx`): ONE user's history `[1, L]` (its first axis is 1
  by design) against K candidates `[K]` (dynamic, traced at 3), what a server does per
  request. What depends on the history alone runs once per request instead of once per
  candidate: the history's embeddings, DIN's history term of the activation unit's first
  layer, DIEN's interest-extractor GRU and AUGRU input projections, BST's history tokens and
  their first-layer query/key/value. Other models expand the history and run `forward`.

Both are exported from a copy of the model with export-only stand-ins of the same math
(`_for_export`: DIEN's AUGRU loop in fewer ONNX ops); the models' files are untouched. The
export pipeline's parity gate checks both graphs against eager `forward`.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable
from copy import deepcopy

import numpy as np
import onnx
import onnxruntime
import torch
import torch.nn.functional as F
from torch import nn

from attention_ctr.models import random_batch
from attention_ctr.models.bst import _padding_bias
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
    model = _for_export(model)
    names = export_inputs(model)
    example = random_batch(2, model.max_history, **model.config, seed=0)
    axes = {name: {0: "batch", 1: "history"} for name in names if example[name].dim() == 2}
    axes.update(target_item={0: "batch"}, target_category={0: "batch"})
    return _export(_PositionalInputs(model, names), example, names, axes)


def export_request_onnx(model: nn.Module) -> bytes:
    """The request graph: history inputs `[1, L]` (one user), targets `[K]` (candidates)."""
    model = _for_export(model)
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


# -- export-only stand-ins: the same math in a leaner graph ----------------------------------
def _augru_final_state(
    evolution: nn.Module, states: torch.Tensor, weights: torch.Tensor, steps: int
) -> torch.Tensor:
    """The AUGRU's final state `[K, H]` from the extractor states, one history's `[M, H]`
    (shared by the K candidates) or `[K, M, H]`, and the attention `[K, M]`, exactly as
    `AUGRUCell.step` computes it but in fewer ONNX ops per step.

    The loop is traced unrolled (M = `steps` = max_history). The input projections of all
    steps are one matmul with the hidden biases of r and u folded in, and ONE Split cuts them
    into the per-step slices, so a step is two Gemms and nine elementwise ops:
    r, u = sigmoid(W_ru h + p_ru), h~ = tanh(p_n + r (W_n h + b_n)), h += a u (h~ - h).
    """
    size = evolution.hidden_size
    w_ru, w_n = evolution.weight_hh[: 2 * size].t(), evolution.weight_hh[2 * size :].t()
    b_n = evolution.bias_hh[2 * size :]
    folded = torch.cat([evolution.bias_hh[: 2 * size], torch.zeros_like(b_n)])
    projected = evolution.input_projection(states) + folded  # [..., M, 3H]
    slices = projected.reshape(-1, steps * 3 * size).split([2 * size, size] * steps, dim=1)
    h = weights.new_zeros(weights.shape[0], size)
    for t, a_t in enumerate(weights.split(1, dim=1)):
        p_ru, p_n = slices[2 * t], slices[2 * t + 1]  # [1 or K, 2H], [1 or K, H]
        r, u = torch.sigmoid(torch.addmm(p_ru, h, w_ru)).split(size, dim=1)
        candidate = torch.tanh(p_n + r * torch.addmm(b_n, h, w_n))
        h = h + (a_t * u) * (candidate - h)
    return h


class _ExportAUGRU(nn.Module):
    """Stands in for DIEN's `AUGRUCell` in the copy that is exported (same parameters): its
    `sequence` is `_augru_final_state`, about a third fewer ONNX ops than the cell's steps."""

    def __init__(self, cell: nn.Module, steps: int):
        super().__init__()
        self.cell = cell
        self.steps = steps

    def sequence(
        self, x: torch.Tensor, attention: torch.Tensor, lengths: torch.Tensor | None = None
    ) -> torch.Tensor:
        # `lengths` only lets training skip padded steps; a_t = 0 there gives the same state
        return _augru_final_state(self.cell, x, attention, self.steps)


def _for_export(model: nn.Module) -> nn.Module:
    """An eval-mode CPU copy of the model with export-only stand-ins (same math, leaner
    graph); the model itself is left untouched."""
    copy = deepcopy(model).eval().cpu()
    if copy.name == "dien":
        copy.evolution = _ExportAUGRU(copy.evolution, copy.max_history)
    return copy


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
        interest = scores @ history[0]  # sum_j w_j h_j: [K, E]
        pooled = None
        if model.use_pooled_history:
            pooled = masked_mean(history, batch["mask"]).expand(target.shape[0], -1)
        return model.head(interest, target, pooled)


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
        states = pad_positions(states, model.max_history)[0]  # [M, H]
        weights = pad_positions(weights.unsqueeze(-1), model.max_history).squeeze(-1)  # [K, M]
        final = model.evolution.sequence(states, weights)
        pooled = masked_mean(history, mask).expand(candidates, -1)
        return model.mlp(torch.cat([final, target, pooled], dim=-1)).squeeze(-1).float()


class _BSTRequest(_ExpandedRequest):
    """BST: the history tokens and their query/key/value projections of the first
    Transformer layer are computed once per request; the rest of the encoder and the MLP per
    candidate (every token attends to the candidate's target token)."""

    def forward(self, batch: dict) -> torch.Tensor:
        model = self.model
        candidates = batch["target_item"].shape[0]
        first = {
            **batch,
            "target_item": batch["target_item"][:1],
            "target_category": batch["target_category"][:1],
        }
        tokens, keep = model.tokens(first)  # [1, S, d], [1, S]: the history tokens, then one target
        history, keep = tokens[:, :-1], keep.expand(candidates, -1)
        target = torch.cat(
            [
                model.embedding.items(batch["target_item"], batch["target_category"]),
                model.position_embedding(
                    torch.full_like(batch["target_item"], model.target_position)
                ),
            ],
            dim=-1,
        ).unsqueeze(1)  # [K, 1, d]
        layer = model.layers[0]
        qkv = torch.cat([layer.qkv(history).expand(candidates, -1, -1), layer.qkv(target)], dim=1)
        x = torch.cat([history.expand(candidates, -1, -1), target], dim=1)  # [K, S, d]
        x = _transformer_block(layer, x, qkv, keep)
        for layer in model.layers[1:]:
            x = layer(x, keep)
        x = x.masked_fill(~keep.unsqueeze(-1), 0.0)  # padded positions contribute nothing
        if model.output == "concat":
            features = x.flatten(1)
        else:
            features = x.sum(1) / keep.sum(1, keepdim=True).to(x.dtype)
        return model.mlp(features).squeeze(-1).float()


def _transformer_block(layer: nn.Module, x: torch.Tensor, qkv: torch.Tensor, keep: torch.Tensor):
    """`TransformerBlock.forward` in eval mode, from precomputed projections `qkv` [B, S, 3d]."""
    batch, length, d_model = x.shape
    heads = qkv.view(batch, length, 3, layer.n_heads, d_model // layer.n_heads)
    q, k, v = heads.permute(2, 0, 3, 1, 4).unbind(0)
    attended = F.scaled_dot_product_attention(q, k, v, attn_mask=_padding_bias(keep, q.dtype))
    x = layer.norm1(x + layer.out(attended.transpose(1, 2).reshape(x.shape)))
    return layer.norm2(x + layer.feedforward2(F.leaky_relu(layer.feedforward1(x))))


REQUEST_MODULES: dict[str, Callable[[nn.Module], nn.Module]] = {
    "din": _DINRequest,
    "dien": _DIENRequest,
    "bst": _BSTRequest,
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
