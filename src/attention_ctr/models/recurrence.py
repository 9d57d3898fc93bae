"""DIEN's interest evolving layer: the GRU with attentional update gate (AUGRU)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class AUGRUCell(nn.Module):
    """GRU with attentional update gate (DIEN, Zhou et al., AAAI 2019, eq. 12-13).

        r_t  = sigmoid(W_r x_t + b_ir + U_r h_{t-1} + b_hr)
        u_t  = sigmoid(W_u x_t + b_iu + U_u h_{t-1} + b_hu)
        h~_t = tanh(W_h x_t + b_ih + r_t * (U_h h_{t-1} + b_hh))
        u'_t = a_t * u_t
        h'_t = (1 - u'_t) * h'_{t-1} + u'_t * h~_t

    Gates are stacked [r, u, h~] like `nn.GRU`; the input and hidden biases are separate
    parameters (`bias_ih`, `bias_hh`), never tied. Note the paper's convention: u weighs the NEW
    candidate (nn.GRU's z weighs the OLD state, z = 1 - u). a_t = 0 keeps the state exactly.
    """

    def __init__(self, input_size: int, hidden_size: int):
        super().__init__()
        self.hidden_size = hidden_size
        self.weight_ih = nn.Parameter(torch.empty(3 * hidden_size, input_size))
        self.weight_hh = nn.Parameter(torch.empty(3 * hidden_size, hidden_size))
        self.bias_ih = nn.Parameter(torch.empty(3 * hidden_size))
        self.bias_hh = nn.Parameter(torch.empty(3 * hidden_size))
        bound = hidden_size**-0.5
        for parameter in self.parameters():
            nn.init.uniform_(parameter, -bound, bound)

    def input_projection(self, x: Tensor) -> Tensor:
        """`[..., input_size]` -> `[..., 3H]`: W x + b_i for every timestep in one matmul."""
        return F.linear(x, self.weight_ih, self.bias_ih)

    def step(self, projected: Tensor, h: Tensor, a: Tensor) -> Tensor:
        """One step from a precomputed input projection `[B, 3H]`, state `[B, H]`, `a` `[B, 1]`."""
        hidden = F.linear(h, self.weight_hh, self.bias_hh)
        size = self.hidden_size
        r, u = torch.sigmoid(projected[:, : 2 * size] + hidden[:, : 2 * size]).split(size, 1)
        candidate = torch.tanh(projected[:, 2 * size :] + r * hidden[:, 2 * size :])
        return h + (a * u) * (candidate - h)  # = (1 - u'_t) * h + u'_t * h~_t

    def forward(self, x: Tensor, h: Tensor, a: Tensor) -> Tensor:
        """`x` `[B, input_size]`, `h` `[B, H]`, `a` `[B]` or `[B, 1]` -> new state `[B, H]`."""
        return self.step(self.input_projection(x), h, a.reshape(-1, 1))

    def sequence(self, x: Tensor, attention: Tensor) -> Tensor:
        """The final state `[B, H]` over `x` `[B or 1, L, input_size]` with `attention`
        `[B, L]`, from h_0 = 0 (`x` of one history is shared by the B rows of attention).

        `step` over the L steps, in float32 at least, with the input projections of all steps
        in one matmul and cut by one split (a traced ONNX graph then has one Split, not L
        slices). Steps with a_t = 0 (padding) leave the state unchanged.
        """
        projected = self.input_projection(x)  # [B or 1, L, 3H]
        dtype = torch.promote_types(projected.dtype, torch.float32)
        projected, attention = projected.to(dtype), attention.to(dtype)
        h = projected.new_zeros(attention.shape[0], self.hidden_size)
        steps = zip(projected.split(1, dim=1), attention.split(1, dim=1))
        with torch.autocast(x.device.type, enabled=False):
            for projected_t, a_t in steps:
                h = self.step(projected_t.squeeze(1), h, a_t)
        return h
