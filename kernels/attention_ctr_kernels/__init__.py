"""Optional compiled CPU kernel of attention_ctr for training: the GRU / AUGRU recurrence of DIEN.

`recurrence.cpp` runs the time loop of a one-layer GRU or AUGRU, forward and backward: per
step, for each thread's share of the rows, the input projection and the hidden matmul
(oneDNN's brgemm micro-kernels where they run, else BLAS: `matmul_backend`) and one fused pass
over the gates, so no `[B, L, 3H]` projection or its gradient is ever written; given the
rows' lengths, rows sorted longest first skip the steps after their length. Eager torch spends
~10 small autograd ops per step on the same work.

Built at install (`pip install --no-build-isolation ./kernels`) once per instruction-set level
(`setup.py`); `available()` loads the one torch's own dispatcher picks for this CPU. Models
never import this package: `attention_ctr.models.ops` does, and only in CPU training. Not
installed, built for another torch, or switched off (`ATTENTION_CTR_CPU_KERNELS=0`),
training runs the plain-torch reference, the same function.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import os
import threading

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

# "0" (or off/false/no) switches the kernel off; a variant's name forces that variant.
ENV_SWITCH = "ATTENTION_CTR_CPU_KERNELS"
# The builds, lowest level first, each with torch's CPU capability
# (`torch.backends.cpu.get_cpu_capability()`) that runs it: a CPU runs its level and those below.
LEVELS = {"baseline": "DEFAULT", "avx2": "AVX2", "avx512": "AVX512"}
REINSTALL = "pip install --no-build-isolation ./kernels"
_lock = threading.Lock()
_state: dict[str, object] = {}
_registered: list[bool] = []  # the torch.library registrations, once per process


def built_variants() -> list[str]:
    """The variants this installation holds (x86-64: baseline, avx2, avx512)."""
    return [n for n in LEVELS if importlib.util.find_spec(f"{__name__}._recurrence_{n}")]


def runnable_variants() -> list[str]:
    """The variants this CPU can run, lowest level first (the baseline everywhere)."""
    capabilities = list(LEVELS.values())
    capability = torch.backends.cpu.get_cpu_capability()
    top = capabilities.index(capability) if capability in capabilities else 0
    return list(LEVELS)[: top + 1]


def variant() -> str | None:
    """The variant for this CPU and setting: the switch's variant name if it names one, else
    the highest built one this CPU runs (torch's own CPU capability); None when switched off."""
    setting = os.environ.get(ENV_SWITCH, "1").strip().lower()
    if setting in {"0", "false", "no", "off"}:
        return None
    built, runnable = built_variants(), runnable_variants()
    if setting in LEVELS:
        if setting not in built:
            raise ValueError(f"{ENV_SWITCH}={setting}: not built here (built: {built})")
        if setting not in runnable:  # it would die of an illegal instruction
            raise ValueError(
                f"{ENV_SWITCH}={setting}: this CPU "
                f"({torch.backends.cpu.get_cpu_capability()}) cannot run it"
            )
        return setting
    if setting not in {"1", "true", "yes", "on", ""}:
        raise ValueError(
            f"{ENV_SWITCH}={setting!r}: expected 0 (off), 1 (the build for this CPU), or one of "
            f"{built}"
        )
    return [name for name in runnable if name in built][-1]


def available() -> bool:
    """Load the kernel (once per process); False, with a warning saying why, where it cannot."""
    if "loaded" in _state:
        return bool(_state["loaded"])
    with _lock:
        if "loaded" not in _state:
            _state["loaded"] = _load()
    return bool(_state["loaded"])


def _load() -> bool:
    chosen = variant()
    if chosen is None:
        return False
    built_for = _built_for_torch()
    if built_for is not None and built_for != torch.__version__:
        logger.warning(
            "attention_ctr_kernels was built for torch %s but torch %s runs: DIEN's CPU "
            "training runs the plain-torch recurrence. Rebuild it: %s",
            built_for,
            torch.__version__,
            REINSTALL,
        )
        return False
    library = importlib.util.find_spec(f"{__name__}._recurrence_{chosen}").origin
    try:
        torch.ops.load_library(library)
    except OSError as error:
        logger.warning(
            "attention_ctr_kernels (%s) did not load (%s); DIEN's CPU training runs the "
            "plain-torch recurrence. Rebuild it: %s",
            chosen,
            str(error).strip().splitlines()[0],
            REINSTALL,
        )
        return False
    if not _registered:
        _register_fake_and_autograd()
        _registered.append(True)
    _state["variant"] = chosen
    logger.info("CPU recurrence kernel loaded: %s build", chosen)
    return True


def _built_for_torch() -> str | None:
    """The torch version this package was compiled against (its pinned requirement)."""
    try:
        requirements = importlib.metadata.requires("attention-ctr-kernels") or []
    except importlib.metadata.PackageNotFoundError:
        return None
    pins = [r.split("==", 1)[1].strip() for r in requirements if r.startswith("torch==")]
    return pins[0] if pins else None


def matmul_backend() -> str:
    """Which matmuls the kernel runs: "brgemm", "blas", "aten", or "none" (not loaded)."""
    return torch.ops.attention_ctr_kernels.matmul_backend() if available() else "none"


def _bf16_matmuls() -> bool:
    """Under CPU bf16 autocast the kernel's matmuls take bf16-rounded operands and accumulate
    in float32, as autocast's own matmuls do; states and gates stay float32."""
    return torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


def _register_fake_and_autograd() -> None:
    """Shape (fake) and autograd registrations of the C++ ops (`torch.library`), so they trace
    like any torch op; `tests/test_kernels.py` checks them with `torch.library.opcheck`."""
    ops = torch.ops.attention_ctr_kernels

    @torch.library.register_fake("attention_ctr_kernels::gated_forward")
    def _(x, weight_ih, bias_ih, weight, bias, attention, lengths, final_only, bf16):
        batch, length, size = x.shape[0], x.shape[1], weight.shape[1]
        output = x.new_empty((batch, size) if final_only else (batch, length, size))
        states = x.new_empty((length + 1, batch, size))  # h_0 .. h_L, in the kernel's row order
        saved = x.new_empty((length, batch, 4, size))  # per step: r, update gate, U_n h + b_n, h~
        return output, states, saved, x.new_empty((batch,), dtype=torch.long)

    @torch.library.register_fake("attention_ctr_kernels::gated_backward")
    def _(upstream, x, states, saved, order, lengths, weight_ih, weight, attention, bf16):
        gates = weight.shape[0]
        d_attention = x.new_empty((x.shape[0] if attention.numel() else 0, x.shape[1]))
        return (
            x.new_empty(x.shape),
            x.new_empty(weight_ih.shape),
            x.new_empty(weight.shape),
            d_attention,
            x.new_empty((gates,)),
            x.new_empty((gates,)),
        )

    def setup_context(ctx, inputs, output):
        x, weight_ih, _, weight, _, attention, lengths, _, bf16 = inputs
        _, states, saved, order = output
        ctx.save_for_backward(x, states, saved, order, lengths, weight_ih, weight, attention)
        ctx.bf16 = bf16

    def backward(ctx, grad_output, _states, _saved, _order):
        x, states, saved, order, lengths, weight_ih, weight, attention = ctx.saved_tensors
        d_x, d_weight_ih, d_weight, d_attention, d_bias_ih, d_bias = ops.gated_backward(
            grad_output, x, states, saved, order, lengths, weight_ih, weight, attention, ctx.bf16
        )
        d_attention = d_attention if attention.numel() else None
        return d_x, d_weight_ih, d_bias_ih, d_weight, d_bias, d_attention, None, None, None

    torch.library.register_autograd(
        "attention_ctr_kernels::gated_forward", backward, setup_context=setup_context
    )


def gated_recurrence(
    x: Tensor,
    weight_ih: Tensor,
    bias_ih: Tensor,
    weight_hh: Tensor,
    bias_hh: Tensor,
    attention: Tensor | None = None,
    lengths: Tensor | None = None,
    final_only: bool = False,
) -> Tensor:
    """The states `[B, L, H]` of a one-layer GRU (parameters as in `nn.GRU`) over `x`
    `[B, L, I]` from h_0 = 0, or with `attention` `[B, L]` of the AUGRU (update gate scaled by
    a_t); `final_only`: each row's last state `[B, H]`. With `lengths` `[B]` (left-aligned
    rows), row b runs only its first lengths[b] steps: its later states repeat its last one."""
    attention = x.new_empty(0) if attention is None else attention
    lengths = torch.empty(0, dtype=torch.long) if lengths is None else lengths.to(torch.long)
    bf16 = _bf16_matmuls()
    with torch.autocast("cpu", enabled=False):  # float32 operands; bf16 rounding is the kernel's
        output, _, _, _ = torch.ops.attention_ctr_kernels.gated_forward(
            x.float(),
            weight_ih.float(),
            bias_ih.float(),
            weight_hh.float(),
            bias_hh.float(),
            attention.float(),
            lengths,
            final_only,
            bf16,
        )
    return output
