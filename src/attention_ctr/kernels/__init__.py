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
`TORCH_EXTENSIONS_DIR`). Without a C++ compiler, when the build fails, or with
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
_registered: list[bool] = []  # the torch.library registrations, once per process


def has_cxx_compiler() -> bool:
    """Whether a C++ compiler is on PATH ($CXX, g++, c++ or clang++): the kernel and
    torch.compile on the CPU both build with it."""
    names = (os.environ.get("CXX", ""), "g++", "c++", "clang++")
    return any(shutil.which(name) for name in names if name)


def _cpu_tag() -> str:
    """The build uses -march=native: key it by CPU so a shared home never runs the wrong one
    (x86's `flags`, aarch64's `Features`; elsewhere, e.g. macOS, the processor's name)."""
    try:
        info = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        info = []
    features = [line for line in info if line.startswith(("flags", "Features"))][:1]
    described = features[0] if features else f"{platform.processor()} {platform.platform()}"
    return hashlib.sha1(f"{platform.machine()} {described}".encode()).hexdigest()[:10]


# A build takes well under a minute: a lock older than this was left by a build that was killed
# half-way, and torch's build would wait on it forever.
STALE_LOCK_SECONDS = 300


def _clear_stale_build_lock(name: str) -> None:
    """Waits for a build of `name` in progress elsewhere (its lock file), at most until the lock
    is STALE_LOCK_SECONDS old; a lock that old is removed, with a warning naming it."""
    from torch.utils.cpp_extension import get_default_build_root

    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
    for lock in [*root.glob(f"*/{name}/lock"), *root.glob(f"{name}/lock")]:
        while lock.exists():
            try:
                age = time.time() - lock.stat().st_mtime
            except FileNotFoundError:
                break
            if age > STALE_LOCK_SECONDS:
                logger.warning(
                    "Removing %s, left %.0f s ago by a kernel build that did not finish",
                    lock,
                    age,
                )
                lock.unlink(missing_ok=True)
                break
            time.sleep(1.0)


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
    _clear_stale_build_lock(name)
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
    if not _registered:
        _register_fake_and_autograd()
        _registered.append(True)
    logger.info("CPU recurrence kernel ready in %.1f s", time.perf_counter() - started)
    return True


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
