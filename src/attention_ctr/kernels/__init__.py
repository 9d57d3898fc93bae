"""Optional compiled CPU kernel for training: the GRU / AUGRU recurrence of DIEN.

`recurrence.cpp` runs the time loop of a one-layer GRU or AUGRU, forward and backward: per
step, for each thread's share of the rows, the input projection and the hidden matmul
(oneDNN's brgemm micro-kernels where they run, else BLAS: `matmul_backend`) and one fused pass
over the gates, so no `[B, L, 3H]` projection or its gradient is ever written; given the rows'
lengths, rows sorted longest first skip the steps after their length. Eager torch spends ~10
small autograd ops per step on the same work. It is the one kernel that outruns both eager
torch and `torch.compile` by a wide margin (`benchmarks/training.py` measures it); the rest of
the models are plain torch.

The models never call this module: `attention_ctr.models.ops` does, and only in CPU training.
It builds once per machine and torch version with `torch.utils.cpp_extension` (cached under
`TORCH_EXTENSIONS_DIR`). Without a C++ compiler, when the build fails or times out, or with
`ATTENTION_CTR_CPU_KERNELS=0`, training runs the plain-torch reference (same function):
`available()` says which.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import threading
import time
from pathlib import Path

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("recurrence.cpp")
ENV_SWITCH = "ATTENTION_CTR_CPU_KERNELS"
_lock = threading.Lock()
_state: dict[str, bool] = {}


def has_cxx_compiler() -> bool:
    """Whether a C++ compiler is on PATH ($CXX, g++, c++ or clang++): the kernel and
    torch.compile on the CPU both build with it."""
    names = (os.environ.get("CXX", ""), "g++", "c++", "clang++")
    return any(shutil.which(name) for name in names if name)


def _cpu_tag() -> str:
    """The build uses -march=native: key it by CPU so a shared home never runs the wrong one."""
    try:
        info = Path("/proc/cpuinfo").read_text()
        flags = next((line for line in info.splitlines() if line.startswith("flags")), "")
    except OSError:
        flags = ""
    return hashlib.sha1(f"{platform.machine()} {flags}".encode()).hexdigest()[:10]


def _put_ninja_on_path() -> None:
    """cpp_extension runs `ninja`; the PyPI package's binary is not on PATH outside a venv shell."""
    if shutil.which("ninja"):
        return
    try:
        import ninja
    except ImportError:
        return
    os.environ["PATH"] = os.pathsep.join([ninja.BIN_DIR, os.environ.get("PATH", "")])


def available() -> bool:
    """Build (once per process, from the cache after the first time) and load the kernel."""
    if "loaded" in _state:
        return _state["loaded"]
    with _lock:
        if "loaded" not in _state:
            _state["loaded"] = _load()
    return _state["loaded"]


def _load() -> bool:
    if os.environ.get(ENV_SWITCH, "1").strip().lower() in {"0", "false", "no", "off"}:
        return False
    if not has_cxx_compiler():
        logger.warning("No C++ compiler: DIEN's CPU training runs the plain-torch recurrence")
        return False
    _put_ninja_on_path()
    from torch.utils.cpp_extension import load

    name = f"attention_ctr_kernels_{_cpu_tag()}"
    flags = ["-O3", "-march=native", "-fopenmp"]
    if platform.machine() in {"x86_64", "AMD64"}:
        flags.append("-mprefer-vector-width=512")  # gcc's default is 256-bit vectors
    started = time.perf_counter()
    try:
        load(
            name=name,
            sources=[str(SOURCE)],
            extra_cflags=flags,
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
        )
    except Exception as error:  # noqa: BLE001 - any build failure falls back to plain torch
        logger.warning(
            "The CPU recurrence kernel did not build (%s: %s); DIEN's CPU training runs the "
            "plain-torch recurrence. Set %s=0 to skip the attempt.",
            type(error).__name__,
            str(error).strip().splitlines()[-1] if str(error).strip() else "",
            ENV_SWITCH,
        )
        return False
    logger.info("CPU recurrence kernel ready in %.1f s", time.perf_counter() - started)
    return True


def matmul_backend() -> str:
    """Which matmuls the kernel runs: "brgemm", "blas", "aten", or "none" (not loaded)."""
    return torch.ops.attention_ctr_kernels.matmul_backend() if available() else "none"


def _bf16_matmuls() -> bool:
    """Under CPU bf16 autocast the kernel's matmuls take bf16-rounded operands and accumulate
    in float32, as autocast's own matmuls do; states and gates stay float32."""
    return torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


class _GatedRecurrence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight_ih, bias_ih, attention, lengths, weight_hh, bias_hh, final_only):  # type: ignore[override]
        ctx.bf16 = _bf16_matmuls()
        with torch.autocast("cpu", enabled=False):
            x_, weight_ih_, weight = x.float(), weight_ih.float(), weight_hh.float()
            a = attention.float()
            output, states, saved, order = torch.ops.attention_ctr_kernels.gated_forward(
                x_, weight_ih_, bias_ih.float(), weight, bias_hh.float(), a, lengths,
                final_only, ctx.bf16,
            )  # fmt: skip
        ctx.save_for_backward(x_, states, saved, order, lengths, weight_ih_, weight, a)
        ctx.dtypes = tuple(
            t.dtype for t in (x, weight_ih, bias_ih, attention, lengths, weight_hh, bias_hh)
        ) + (None,)
        return output

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):  # type: ignore[override]
        x, states, saved, order, lengths, weight_ih, weight, attention = ctx.saved_tensors
        with torch.autocast("cpu", enabled=False):
            d_x, d_weight_ih, d_weight, d_attention, d_bias_ih, d_bias_hh = (
                torch.ops.attention_ctr_kernels.gated_backward(
                    grad_output.float(), x, states, saved, order, lengths, weight_ih, weight,
                    attention, ctx.bf16,
                )
            )  # fmt: skip
        gradients = (d_x, d_weight_ih, d_bias_ih, d_attention, None, d_weight, d_bias_hh, None)
        return tuple(
            None if g is None or g.numel() == 0 else g.to(dtype)
            for g, dtype in zip(gradients, ctx.dtypes)
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
    no_attention = x.new_empty(0)
    no_lengths = torch.empty(0, dtype=torch.long)
    return _GatedRecurrence.apply(
        x,
        weight_ih,
        bias_ih,
        no_attention if attention is None else attention,
        no_lengths if lengths is None else lengths.to(torch.long),
        weight_hh,
        bias_hh,
        final_only,
    )
