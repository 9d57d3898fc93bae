"""Attention over a behaviour history: masked pooling and DIN's local activation unit."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attention_ctr.models.mlp import MLP


def weighted_sum(weights: Tensor, values: Tensor) -> Tensor:
    """sum_j w_j v_j: weights `[B, L]`, values `[B or 1, L, E]` -> `[B, E]`."""
    return torch.matmul(weights.unsqueeze(1).to(values.dtype), values).squeeze(1)


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of `values` `[B, L, E]` over the real positions of `mask` `[B, L]` -> `[B, E]`."""
    weights = mask.to(values.dtype)
    return weighted_sum(weights, values) / weights.sum(1, keepdim=True).clamp_min(1.0)


def masked_softmax(scores: Tensor, mask: Tensor, dim: int = -1) -> Tensor:
    """Softmax over real positions; padding gets exactly 0 (filled with finfo.min, never -inf)."""
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    return torch.softmax(scores, dim=dim).masked_fill(~mask, 0.0)


class DINAttention(nn.Module):
    """DIN's local activation unit and weighted-sum pooling (Zhou et al., KDD 2018, sec. 4.3).

    The score of history vector h for target t is `MLP([h, t, h - t, h * t])` (hidden 80-40,
    Dice or PReLU, then a Linear to 1). The paper keeps the raw scores ("normalization='none'")
    to preserve the intensity of interest; "softmax" normalises over the real positions.
    Padding gets exactly zero weight either way.
    """

    def __init__(
        self,
        dim: int,
        hidden: Sequence[int] = (80, 40),
        activation: str = "dice",
        normalization: str = "none",
    ):
        super().__init__()
        if normalization not in ("none", "softmax"):
            raise ValueError(f"normalization must be 'none' or 'softmax', got {normalization!r}")
        if not hidden:
            raise ValueError("the activation unit needs at least one hidden layer")
        self.normalization = normalization
        self.unit = MLP(4 * dim, hidden, activation, out_features=1)

    @staticmethod
    def unit_input(history: Tensor, target: Tensor) -> Tensor:
        """The unit's input `[h, t, h - t, h * t]` `[B, L, 4E]` (written out for reference)."""
        t = target.unsqueeze(1).expand_as(history)
        return torch.cat([history, t, history - t, history * t], dim=-1)

    def first_layer(self, history: Tensor, target: Tensor) -> Tensor:
        """The unit's first Linear on `unit_input(history, target)` -> `[B, L, hidden[0]]`.

        With W = [W_h, W_t, W_d, W_p] split like the input, W [h, t, h - t, h * t] + b =
        (W_h + W_d) h + W_p (h * t) + ((W_t - W_d) t + b): the same function without building
        the 4E-wide input. `history` `[1, L, E]` against `target` `[K, E]` broadcasts, so a
        request computes the history's own term once for its K candidates.
        """
        linear = self.unit.linears[0]
        w_h, w_t, w_d, w_p = linear.weight.split(target.shape[-1], dim=1)
        return (
            F.linear(history, w_h + w_d)
            + F.linear(history * target.unsqueeze(1), w_p)
            + F.linear(target, w_t - w_d, linear.bias).unsqueeze(1)
        )

    def scores(self, history: Tensor, target: Tensor, mask: Tensor) -> Tensor:
        """The unit's raw output `[B, L]`, exactly 0 on padding (Dice's statistics count the
        real positions only)."""
        hidden = self.first_layer(history, target)
        mask = mask.expand(hidden.shape[:-1])
        return self.unit.after_first_linear(hidden, mask).squeeze(-1).masked_fill(~mask, 0.0)

    def weights(self, history: Tensor, target: Tensor, mask: Tensor) -> Tensor:
        """`history` `[B, L, E]`, `target` `[B, E]`, `mask` `[B, L]` -> weights `[B, L]`."""
        scores = self.scores(history, target, mask)
        if self.normalization == "softmax":
            return masked_softmax(scores, mask)
        return scores

    def forward(self, history: Tensor, target: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """-> (user interest `[B, E]` = sum_j w_j h_j, weights `[B, L]`)."""
        weights = self.weights(history, target, mask)
        return weighted_sum(weights, history), weights
