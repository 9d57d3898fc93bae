"""Activations with the `(x, mask=None)` signature: Dice (DIN paper, eq. 4), PReLU and the
parameter-free ones. The mask only matters for Dice's batch statistics."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Dice(nn.Module):
    """Dice activation (DIN paper, eq. 4): `p(s) * s + (1 - p(s)) * alpha * s`.

    `p(s) = sigmoid((s - E[s]) / sqrt(Var[s] + eps))` normalises each unit over the batch, like
    BatchNorm without affine parameters: batch statistics in training (over the real positions
    only when a `mask` is given; gradients flow through them as in BatchNorm), moving averages
    in eval mode. `alpha` is learned per unit and starts at 0. Computed in float32
    (bf16-autocast safe).
    """

    def __init__(self, num_features: int, eps: float = 1e-9, momentum: float = 0.1):
        super().__init__()
        self.eps = eps
        self.momentum = momentum
        self.alpha = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """`x` `[..., C]`, optional bool `mask` `[...]` (True = counts in the statistics)."""
        xf = x.float()
        if self.training:
            mean, var = self._batch_statistics(xf.reshape(-1, x.shape[-1]), mask)
        else:
            mean, var = self.running_mean, self.running_var
        p = torch.sigmoid((xf - mean) * torch.rsqrt(var + self.eps))
        return (xf * (p + (1.0 - p) * self.alpha)).to(x.dtype)

    def _batch_statistics(self, x: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """Mean and biased variance over the counted rows of `x` `[N, C]`; updates the running
        ones (unbiased variance, as in BatchNorm)."""
        weights = x.new_ones(x.shape[0]) if mask is None else mask.reshape(-1).to(x.dtype)
        count = weights.sum().clamp_min(1.0)
        mean = weights @ x / count
        var = weights @ (x - mean).square() / count
        with torch.no_grad():
            bessel = count / (count - 1.0).clamp_min(1.0)
            self.running_mean.lerp_(mean.to(self.running_mean.dtype), self.momentum)
            self.running_var.lerp_((var * bessel).to(self.running_var.dtype), self.momentum)
        return mean, var


class PReLU(nn.Module):
    """PReLU with one slope per unit of the LAST dimension (`nn.PReLU` uses dim 1)."""

    def __init__(self, num_features: int, init: float = 0.25):
        super().__init__()
        self.weight = nn.Parameter(torch.full((num_features,), init))

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        # F.prelu's slopes run along dim 1: on the 2-D view that is the last dimension.
        flat = x.reshape(-1, x.shape[-1])
        return F.prelu(flat, self.weight.to(x.dtype)).view(x.shape)


class _Pointwise(nn.Module):
    """A parameter-free activation with the `(x, mask)` signature of Dice."""

    def __init__(self, function):
        super().__init__()
        self.function = function

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        return self.function(x)


ACTIVATIONS = ("dice", "prelu", "relu", "leaky_relu", "sigmoid")


def make_activation(name: str, num_features: int) -> nn.Module:
    """An activation module taking `(x, mask=None)`: dice, prelu, relu, leaky_relu, sigmoid."""
    if name == "dice":
        return Dice(num_features)
    if name == "prelu":
        return PReLU(num_features)
    if name == "relu":
        return _Pointwise(F.relu)
    if name == "leaky_relu":
        return _Pointwise(F.leaky_relu)
    if name == "sigmoid":
        return _Pointwise(torch.sigmoid)
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {name!r}")
