"""The one place where a model's op may leave plain torch.

Every function here IS its plain-torch reference; the models call these and nothing else for
speed. CPU training may run a recurrence in the optional compiled kernels instead (see
`attention_ctr.kernels`): the same function, tested against the reference.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from attention_ctr import kernels


def _kernel_training(x: Tensor) -> bool:
    """CPU training with the optional kernels installed (not while exporting or compiling)."""
    return (
        x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.bfloat16)
        and torch.is_grad_enabled()
        and x.requires_grad
        and not torch.onnx.is_in_onnx_export()
        and not torch.compiler.is_compiling()
        and kernels.available()
    )


def gru_states(gru: nn.GRU, x: Tensor, mask: Tensor) -> Tensor:
    """The states `[B, L, H]` of a one-layer `nn.GRU` over `x` `[B, L, I]` from h_0 = 0.

    In the kernels each row stops at its length (`mask` `[B, L]`, left-aligned): its states on
    padding then repeat its last real one, where the reference runs on; nothing reads them.
    """
    if gru.training and _kernel_training(x):
        weights = (gru.weight_ih_l0, gru.bias_ih_l0, gru.weight_hh_l0, gru.bias_hh_l0)
        return kernels.gated_recurrence(x, *weights, lengths=mask.sum(1))
    return gru(x)[0]


def augru_final_state(cell: nn.Module, x: Tensor, attention: Tensor) -> Tensor:
    """`AUGRUCell.sequence`: the final state `[B, H]` over `x` `[B or 1, L, I]` with
    `attention` `[B, L]` (a_t = 0 keeps the state)."""
    if cell.training and x.shape[0] == attention.shape[0] and _kernel_training(x):
        weights = (cell.weight_ih, cell.bias_ih, cell.weight_hh, cell.bias_hh)
        return kernels.gated_recurrence(x, *weights, attention=attention, final_only=True)
    return cell.sequence(x, attention)
