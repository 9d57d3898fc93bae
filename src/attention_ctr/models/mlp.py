"""The fully connected stack every model ends with (and DIN's activation unit is made of)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from attention_ctr.models.activations import make_activation


class MLP(nn.Module):
    """Linear -> activation -> dropout per hidden layer, then an optional output Linear.

    `forward(x [..., in_features], mask [...] | None) -> [..., out]`; the mask only matters for
    Dice (which positions count in its batch statistics).
    """

    def __init__(
        self,
        in_features: int,
        hidden: Sequence[int],
        activation: str = "dice",
        dropout: float = 0.0,
        out_features: int | None = None,
    ):
        super().__init__()
        self.linears = nn.ModuleList()
        self.activations = nn.ModuleList()
        width = in_features
        for size in hidden:
            self.linears.append(nn.Linear(width, size))
            self.activations.append(make_activation(activation, size))
            width = size
        self.dropout = nn.Dropout(dropout)
        self.output = nn.Linear(width, out_features) if out_features else None
        self.out_features = out_features or width

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        return self.after_first_linear(self.linears[0](x), mask)

    def after_first_linear(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """The rest of `forward` from the first Linear's output `[..., hidden[0]]` (for DIN's
        activation unit, which computes that Linear in two parts)."""
        for index, activation in enumerate(self.activations):
            if index:
                x = self.linears[index](x)
            x = self.dropout(activation(x, mask))
        return self.output(x) if self.output is not None else x
