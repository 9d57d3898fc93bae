"""The one place where a model's op may leave plain torch.

Every function here IS its plain-torch reference; the models call these and nothing else for
speed. CPU training may run a recurrence in the optional compiled kernel instead (the
`attention_ctr_kernels` package, built from `kernels/` at install): the same function, tested
against the reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attention_ctr.errors import InputError

try:
    import attention_ctr_kernels as kernels
except ImportError:  # not installed: the plain-torch references run everywhere
    kernels = None


def _kernel_training(x: Tensor) -> bool:
    """CPU training with the optional kernel installed (not while exporting or compiling)."""
    return (
        x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.bfloat16)
        and torch.is_grad_enabled()
        and x.requires_grad
        and not torch.onnx.is_in_onnx_export()
        and not torch.compiler.is_compiling()
        and kernels is not None
        and _kernel_loaded()
    )


def _kernel_loaded() -> bool:
    try:
        return kernels.available()
    except ValueError as error:  # a bad ATTENTION_CTR_CPU_KERNELS setting
        raise InputError(str(error)) from error


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


def dropout(x: Tensor, p: float, training: bool) -> Tensor:
    """`F.dropout`; in CPU training with a cheaper random mask of the same law.

    torch's CPU Bernoulli sampler costs several ns an element (a fifth of BST's training step):
    here each 64-bit random draw gives four 15-bit uniforms, and an element is kept when its
    uniform is >= round(p * 2^15) (p rounded to a multiple of 2^-15), then scaled by 1 / P(keep).
    """
    if not training or p <= 0.0:
        return x
    if x.device.type != "cpu" or p >= 1.0 or torch.compiler.is_compiling():
        return F.dropout(x, p, training=True)
    threshold = round(p * 32768)
    draws = torch.empty((x.numel() + 3) // 4, dtype=torch.int64).random_()
    uniforms = draws.view(torch.int16)[: x.numel()].view(x.shape) & 0x7FFF  # [0, 2^15)
    return x * (uniforms >= threshold).to(x.dtype).mul_(32768 / (32768 - threshold))
