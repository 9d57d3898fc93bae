"""Fused C++ kernels for CPU training, built on first use with `torch.utils.cpp_extension`.

`kernels/cpu_kernels.cpp` holds:
- the GRU / AUGRU time loop of `layers.gated_recurrence`: per step, for each thread's share
  of the rows, the input projection and the hidden matmul (oneDNN's brgemm micro-kernels
  where they run, else BLAS: `matmul_backend`) and one fused pass, forward
  and backward, so no `[B, L, 3H]` projection or its gradient is ever written; given the
  rows' lengths, rows sorted longest first skip the steps after their length;
- a Linear's matmuls on the same micro-kernels (`linear`: the models' MLPs and DIN's
  activation unit);
- per-sample matrix-vector products over a history (`row_dots`: DIEN's attention scores;
  `weighted_sum`: attention-weighted and masked means), one pass each way;
- a Linear's bias (plus an optional tiled addend) and PReLU in one pass, and its backward in
  one more (eager torch: about 10 passes over the activations for the same layer);
- the same for a last hidden PReLU layer together with a one-unit output Linear (the
  activations are never written);
- a head of two PReLU layers and a one-unit output from its input (DIEN's auxiliary net), by
  row blocks whose products and activations stay in cache, with the part of the input that
  rows share (DIEN's h_t, for its positive and negative rows) projected once per block;
- a gather of (row, position) pairs from strided `[B, L, E]` tensors (DIEN's auxiliary rows)
  and its backward, one pass each;
- DIN's unit input `[h, h * t]` at the real positions, and a per-sample term repeated over
  each sample's positions, in one pass each way (no index_select and its sorting scatter, no
  concatenation, no per-row copies of the target);
- the item + category lookup of `BehaviorEmbedding` (no concatenation or split; each table's
  gradient summed in one pass, in id order), and BST's tokens (item, category and position
  vectors in one lookup);
- Dice in training (weighted batch statistics, one pass forward, two backward);
- dropout with a counter-based mask regenerated in the backward (BST), alone or together with
  a Linear's bias, a LeakyReLU and a residual (BST's Transformer block: one pass each way
  instead of the bias copy, activation, dropout and addition, and the bias gradient summed
  in the backward's pass);
- BST's multi-head self-attention straight from its packed q | k | v projection, its output in
  the layout the output projection reads and its gradient in the projection's (no head
  transposes, no q / k / v gradient reassembly), the probabilities recomputed in the backward
  from each query's log-sum-exp, as flash attention does.

Weight gradients and column sums are summed over fixed blocks in order, so results repeat for
a given thread count. Under CPU bf16 autocast the recurrences and the head round their
matmuls' operands to bf16 and accumulate in float32 (`bf16_matmuls`); the kernels without
matmuls compute what eager torch does under autocast.

The build runs once per machine and torch version, cached under torch's extensions directory
(`TORCH_EXTENSIONS_DIR`).

Without a C++ compiler, when the build fails, or with `ATTENTION_CTR_CPU_KERNELS=0`, training
uses the eager torch implementation (same equations): `available()` says which.
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
import torch.nn.functional as F
from torch import Tensor

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("kernels") / "cpu_kernels.cpp"
ENV_SWITCH = "ATTENTION_CTR_CPU_KERNELS"
_lock = threading.Lock()
_state: dict[str, bool] = {}


def has_cxx_compiler() -> bool:
    """Whether a C++ compiler is on PATH ($CXX, g++, c++ or clang++): these kernels and
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
    """Build (once per process, from the cache after the first time) and load the kernels."""
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
        logger.warning("No C++ compiler: CPU training runs the slower eager code (no kernels)")
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
    except Exception as error:  # noqa: BLE001 - any build failure falls back to eager torch
        logger.warning(
            "Fused CPU kernels did not build (%s: %s); CPU training runs the slower eager "
            "code. Set %s=0 to skip the attempt.",
            type(error).__name__,
            str(error).strip().splitlines()[-1] if str(error).strip() else "",
            ENV_SWITCH,
        )
        return False
    # the first time on a machine this includes the build, later only the load
    logger.info("Fused CPU kernels ready in %.1f s", time.perf_counter() - started)
    return True


def bf16_matmuls() -> bool:
    """Whether CPU bf16 autocast is on: the kernels with matmuls (the recurrences, DIEN's
    auxiliary head) then round the matmuls' operands to bfloat16 and accumulate in float32, as
    autocast's own matmuls do (MKL's bf16 matmul: AMX or AVX512-BF16 where the CPU has them),
    while their elementwise work, states and outputs stay float32."""
    return torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


class FusedGatedRecurrence(torch.autograd.Function):
    """`layers.gated_recurrence` in float32 through the C++ kernels, which also compute each
    step's input projection W_i x_t + b_i (and its gradients) inside the time loop; under bf16
    autocast its matmuls take bf16 operands (`bf16_matmuls`)."""

    @staticmethod
    def forward(ctx, x, weight_ih, bias_ih, attention, lengths, weight_hh, bias_hh, final_only):  # type: ignore[override]
        ctx.bf16 = bf16_matmuls()
        with torch.autocast("cpu", enabled=False):
            x_, weight_ih_, weight = x.float(), weight_ih.float(), weight_hh.float()
            a = attention.float()
            output, states, saved, order = torch.ops.attention_ctr_kernels.gated_forward(
                x_,
                weight_ih_,
                bias_ih.float(),
                weight,
                bias_hh.float(),
                a,
                lengths,
                final_only,
                ctx.bf16,
            )
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
                    grad_output.float(),
                    x,
                    states,
                    saved,
                    order,
                    lengths,
                    weight_ih,
                    weight,
                    attention,
                    ctx.bf16,
                )
            )
        gradients = (d_x, d_weight_ih, d_bias_ih, d_attention, None, d_weight, d_bias_hh, None)
        return tuple(
            None if x is None or x.numel() == 0 else x.to(dtype)
            for x, dtype in zip(gradients, ctx.dtypes)
        )


def fused_gated_recurrence(
    x: Tensor,
    weight_ih: Tensor,
    bias_ih: Tensor,
    weight_hh: Tensor,
    bias_hh: Tensor,
    attention: Tensor,
    lengths: Tensor,
    final_only: bool = False,
) -> Tensor:
    """All states `[B, L, H]` over `x` `[B, L, I]` (`final_only`: each row's last `[B, H]`);
    `attention` empty for the GRU, `lengths` `[B]` empty when every row runs all L steps."""
    return FusedGatedRecurrence.apply(
        x, weight_ih, bias_ih, attention, lengths, weight_hh, bias_hh, final_only
    )


def usable(x: Tensor, matmuls: bool = False) -> bool:
    """Whether training ops on `x` should take the kernels: float32 CPU autograd, not export,
    not inside torch.compile (which fuses the same work itself). Under CPU autocast a kernel
    with `matmuls` only for bf16 (`bf16_matmuls`); the others compute what eager torch does
    under any autocast (no products)."""
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and torch.is_grad_enabled()
        and (not matmuls or not torch.is_autocast_enabled("cpu") or bf16_matmuls())
        and not torch.onnx.is_in_onnx_export()
        and not torch.compiler.is_compiling()
        and available()
    )


def matmul_backend() -> str:
    """The kernels' matmuls: "brgemm" (oneDNN's micro-kernels, through ATen's
    `cpublas::brgemm`), "blas" (torch's BLAS sgemm: MKL in x86 wheels) or "aten"; "none"
    without the kernels."""
    return torch.ops.attention_ctr_kernels.matmul_backend() if available() else "none"


class FusedLinear(torch.autograd.Function):
    """`x W^T + bias + addend` for `x` `[N, I]` (`bias` `[O]` and `addend` `[N, O]` may be
    empty) on the kernels' matmuls; see `linear`."""

    @staticmethod
    def forward(ctx, x, weight, bias, addend):  # type: ignore[override]
        ctx.save_for_backward(x, weight)
        ctx.has_bias, ctx.has_addend = bias.numel() > 0, addend.numel() > 0
        return torch.ops.attention_ctr_kernels.linear_forward(x, weight, bias, addend)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        d_x, d_weight, d_bias = torch.ops.attention_ctr_kernels.linear_backward(
            grad, x, weight, ctx.needs_input_grad[0]
        )
        return (
            d_x if ctx.needs_input_grad[0] else None,
            d_weight,
            d_bias if ctx.has_bias else None,
            grad if ctx.has_addend else None,
        )


def linear(
    x: Tensor, weight: Tensor, bias: Tensor | None = None, addend: Tensor | None = None
) -> Tensor:
    """`F.linear(x, weight, bias) + addend` (`addend` shaped as the output).

    In float32 CPU training with brgemm (`matmul_backend`) the matmuls run on it
    (`FusedLinear`): ATen's own float32 matmuls take MKL, which on AMD CPUs runs its AVX2 code
    at about half of what brgemm reaches there. Elsewhere (eval, export, autocast, GPU) this
    is F.linear.
    """
    if linear_fuses(x, weight.shape[0]):
        empty = x.new_empty(0)
        rows = x.reshape(-1, x.shape[-1])
        extra = empty if addend is None else addend.reshape(rows.shape[0], -1)
        out = FusedLinear.apply(rows, weight, empty if bias is None else bias, extra)
        return out.view(*x.shape[:-1], weight.shape[0])
    out = F.linear(x, weight, bias)
    return out if addend is None else out + addend.to(out.dtype)


# `linear` takes the kernels from this many rows and output units on: below, ATen's matmul
# is as fast (the weight's transpose and the single-threaded weight gradient of one row block
# cost more than brgemm saves; a one-unit output is a matrix-vector product).
LINEAR_MIN_ROWS, LINEAR_MIN_OUTPUTS = 1024, 8


def linear_fuses(x: Tensor, out_features: int) -> bool:
    """Whether `linear` on `x` runs on the kernels' brgemm (float32 training, no autocast)."""
    return (
        x.numel() >= LINEAR_MIN_ROWS * x.shape[-1]
        and out_features >= LINEAR_MIN_OUTPUTS
        and usable(x)
        and not torch.is_autocast_enabled("cpu")
        and matmul_backend() == "brgemm"
    )


def apply_linear(module: torch.nn.Linear, x: Tensor) -> Tensor:
    """`module(x)`, through `linear` in training where that runs on the kernels (the module's
    forward hooks then do not fire)."""
    if module.training and linear_fuses(x, module.out_features):
        return linear(x, module.weight, module.bias)
    return module(x)


class FusedRowDots(torch.autograd.Function):
    """`[B, L]` dot products of `x` `[B, L, D]`'s rows with `v` `[B, D]`; see `row_dots`."""

    @staticmethod
    def forward(ctx, x, v):  # type: ignore[override]
        ctx.save_for_backward(x, v)
        return torch.ops.attention_ctr_kernels.row_dots(x, v)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):  # type: ignore[override]
        x, v = ctx.saved_tensors
        ops = torch.ops.attention_ctr_kernels
        d_x = ops.outer_rows(grad, v) if ctx.needs_input_grad[0] else None
        d_v = ops.weighted_rows(grad, x) if ctx.needs_input_grad[1] else None
        return d_x, d_v


class FusedWeightedRows(torch.autograd.Function):
    """`[B, D]` sums of `x` `[B, L, D]`'s rows weighted by `w` `[B, L]`; see `weighted_sum`."""

    @staticmethod
    def forward(ctx, w, x):  # type: ignore[override]
        ctx.save_for_backward(w, x)
        return torch.ops.attention_ctr_kernels.weighted_rows(w, x)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):  # type: ignore[override]
        w, x = ctx.saved_tensors
        ops = torch.ops.attention_ctr_kernels
        d_w = ops.row_dots(x, grad) if ctx.needs_input_grad[0] else None
        d_x = ops.outer_rows(w, grad) if ctx.needs_input_grad[1] else None
        return d_w, d_x


def _matvec_fuses(x: Tensor, other: Tensor) -> bool:
    return usable(x) and other.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")


def row_dots(x: Tensor, v: Tensor) -> Tensor:
    """`[B, L]` = `x` `[B, L, D]` times `v` `[B, D]` per sample (`bmm(x, v[..., None])`); in
    float32 CPU training one pass each way through the kernels (ATen's bmm takes MKL one
    small matrix at a time)."""
    if _matvec_fuses(x, v):
        return FusedRowDots.apply(x, v)
    return torch.bmm(x, v.unsqueeze(-1)).squeeze(-1)


def weighted_sum(w: Tensor, x: Tensor) -> Tensor:
    """`[B, D]` = sum over L of `w` `[B, L]` times `x` `[B, L, D]` (`bmm(w[:, None], x)`), as
    `row_dots`; positions of weight 0 (padding) are not read in the kernels' forward."""
    if _matvec_fuses(x, w):
        return FusedWeightedRows.apply(w, x)
    return torch.bmm(w.unsqueeze(1), x).squeeze(1)


class FusedBiasPReLU(torch.autograd.Function):
    """PReLU(z + bias + addend tiled over rows): z `[R, C]`, addend `[M, C]` with M | R or empty."""

    @staticmethod
    def forward(ctx, z, bias, slope, addend):  # type: ignore[override]
        out, h = torch.ops.attention_ctr_kernels.bias_prelu_forward(z, bias, slope, addend)
        ctx.save_for_backward(h, slope)
        ctx.period = addend.shape[0] if addend.numel() else 0
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):  # type: ignore[override]
        h, slope = ctx.saved_tensors
        d_z, d_bias, d_slope, d_addend = torch.ops.attention_ctr_kernels.bias_prelu_backward(
            grad, h, slope, ctx.period
        )
        return d_z, d_bias, d_slope, d_addend if ctx.period else None


def bias_prelu(z: Tensor, bias: Tensor, slope: Tensor, addend: Tensor | None = None) -> Tensor:
    """`PReLU(z + bias [+ addend[r % M]])` for `z` `[R, C]` (see `FusedBiasPReLU`)."""
    return FusedBiasPReLU.apply(z, bias, slope, z.new_empty(0) if addend is None else addend)


class FusedPReLULinear(torch.autograd.Function):
    """`Linear_out(PReLU(z + bias))` for an output Linear with one unit: z `[R, C]` -> `[R, 1]`."""

    @staticmethod
    def forward(ctx, z, bias, slope, out_weight, out_bias):  # type: ignore[override]
        logits, h = torch.ops.attention_ctr_kernels.prelu_linear_forward(
            z, bias, slope, out_weight, out_bias
        )
        ctx.save_for_backward(h, slope, out_weight)
        return logits

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):  # type: ignore[override]
        h, slope, out_weight = ctx.saved_tensors
        return torch.ops.attention_ctr_kernels.prelu_linear_backward(grad, h, slope, out_weight)


class FusedDice(torch.autograd.Function):
    """Training-mode Dice on `x` `[N, C]` with row weights `[N]` (or empty): as
    `layers._DiceFunction`, in one pass forward (after the statistics) and two backward.
    -> (out, mean, var, count); only out is differentiable."""

    @staticmethod
    def forward(ctx, x, alpha, weights, eps):  # type: ignore[override]
        out, mean, var, count = torch.ops.attention_ctr_kernels.dice_forward(x, alpha, weights, eps)
        ctx.save_for_backward(x, alpha, weights, mean, var, count)
        ctx.eps = eps
        ctx.mark_non_differentiable(mean, var, count)
        return out, mean, var, count

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad, _mean, _var, _count):  # type: ignore[override]
        d_x, d_alpha = torch.ops.attention_ctr_kernels.dice_backward(
            grad, *ctx.saved_tensors, ctx.eps
        )
        return d_x, d_alpha, None, None


class FusedDropout(torch.autograd.Function):
    """Dropout whose mask is a counter-based hash of a seed and each position (drawn from torch's
    generator, so seeded runs repeat): one pass forward, and one backward that regenerates the
    mask instead of keeping it. Keeps an element when its 15-bit uniform is >= `threshold`."""

    @staticmethod
    def forward(ctx, x, threshold, seed):  # type: ignore[override]
        ctx.threshold, ctx.seed = threshold, seed
        return torch.ops.attention_ctr_kernels.dropout_forward(x, threshold, seed)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):  # type: ignore[override]
        d_x = torch.ops.attention_ctr_kernels.dropout_backward(grad, ctx.threshold, ctx.seed)
        return d_x, None, None


def _dropout_seed() -> int:
    """A mask's seed, drawn from torch's generator (seeded runs repeat)."""
    return int(torch.randint(0, 2**62, (1,)).item())


def dropout(x: Tensor, threshold: int) -> Tensor:
    """`x` with elements dropped where their uniform in [0, 2^15) is below `threshold`, the rest
    scaled by 2^15 / (2^15 - threshold)."""
    return FusedDropout.apply(x, threshold, _dropout_seed())


class FusedPackedAttention(torch.autograd.Function):
    """Multi-head self-attention on a packed projection (see `packed_attention`); keeps only qkv,
    bias, keep and each query's log-sum-exp for the backward."""

    @staticmethod
    def forward(ctx, qkv, bias, keep, heads):  # type: ignore[override]
        bias = bias if bias is not None else qkv.new_empty(0)
        out, lse = torch.ops.attention_ctr_kernels.packed_attention_forward(qkv, bias, keep, heads)
        ctx.heads = heads
        ctx.save_for_backward(qkv, bias, keep, lse)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):  # type: ignore[override]
        qkv, bias, keep, lse = ctx.saved_tensors
        d_qkv, d_bias = torch.ops.attention_ctr_kernels.packed_attention_backward(
            grad, qkv, bias, keep, lse, ctx.heads
        )
        return d_qkv, (d_bias if bias.numel() else None), None, None


def packed_attention(qkv: Tensor, bias: Tensor | None, keep: Tensor, heads: int) -> Tensor:
    """`softmax(q k^T / sqrt(D) + mask) v` per head -> `[B, S, H D]` (heads side by side), for
    float32 `qkv + bias` `[B, S, 3 H D]` (per token q | k | v, each H heads of D; `bias` `[3 H D]`
    or None: a Linear's bias, added here instead of in a pass of its own) and keys masked where
    `keep` `[B, S]` (bool) is False, as `scaled_dot_product_attention` with a `finfo.min` mask;
    every batch row must keep a key."""
    return FusedPackedAttention.apply(qkv, bias, keep, heads)


class FusedBiasDropout(torch.autograd.Function):
    """`residual + dropout(act(z + bias))` in one pass (see `bias_dropout`)."""

    @staticmethod
    def forward(ctx, z, bias, residual, leaky_slope, threshold, seed):  # type: ignore[override]
        leaky = leaky_slope is not None
        ctx.options = (leaky, float(leaky_slope or 0.0), threshold, seed)
        ctx.has_residual = residual is not None
        ctx.save_for_backward(z if leaky else z.new_empty(0), bias)
        residual = residual if residual is not None else z.new_empty(0)
        return torch.ops.attention_ctr_kernels.bias_dropout_forward(z, bias, residual, *ctx.options)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):  # type: ignore[override]
        z, bias = ctx.saved_tensors
        d_z, d_bias = torch.ops.attention_ctr_kernels.bias_dropout_backward(
            grad, z, bias, *ctx.options
        )
        return d_z, d_bias, (grad if ctx.has_residual else None), None, None, None


def bias_dropout(
    z: Tensor,
    bias: Tensor,
    threshold: int,
    residual: Tensor | None = None,
    leaky_slope: float | None = None,
) -> Tensor:
    """`residual + dropout(act(z + bias))` for a Linear's product `z` `[..., C]` and its bias
    `[C]`: act is LeakyReLU(`leaky_slope`) or none, dropout that of `dropout(x, threshold)`
    (`threshold` 0: none)."""
    seed = _dropout_seed() if threshold else 0
    return FusedBiasDropout.apply(z, bias, residual, leaky_slope, threshold, seed)


class FusedPReLUHead(torch.autograd.Function):
    """A head of two PReLU layers and a one-unit output, from its input `x` `[R, E]`:
    `w_out PReLU(W2 PReLU(x W1^T + b1 + (shared W_s^T)[r % M]) + b2) + b_out` -> `[R, 1]`,
    with `shared` `[M, S]` the rows' shared part (or empty), run by blocks of shared rows whose
    products and activations stay in cache; only the PReLUs' inputs are kept for the backward.
    Float32 inputs; under bf16 autocast its matmuls take bf16 operands (`bf16_matmuls`)."""

    @staticmethod
    def forward(ctx, x, w1, shared, w_shared, b1, s1, w2, b2, s2, w_out, b_out):  # type: ignore[override]
        ctx.bf16 = bf16_matmuls()
        logits, h1, h2 = torch.ops.attention_ctr_kernels.prelu_head_forward(
            x, w1, shared, w_shared, b1, s1, w2, b2, s2, w_out, b_out, ctx.bf16
        )
        ctx.save_for_backward(x, w1, shared, w_shared, h1, h2, s1, w2, s2, w_out)
        return logits

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):  # type: ignore[override]
        d_x, d_w1, d_shared, d_w_shared, *rest = (
            torch.ops.attention_ctr_kernels.prelu_head_backward(grad, *ctx.saved_tensors, ctx.bf16)
        )
        if not d_shared.numel():
            d_shared = d_w_shared = None
        return (d_x, d_w1, d_shared, d_w_shared, *rest)


class FusedPairLookup(torch.autograd.Function):
    """[item ⊕ category] vectors of K pairs of id tensors from two embedding tables, one output
    per pair (no concatenation, no split); the backward sums each table's dense gradient in one
    pass (row 0 is padding: no gradient, as `nn.Embedding(padding_idx=0)`)."""

    @staticmethod
    def forward(ctx, item_table, category_table, *ids):  # type: ignore[override]
        pairs = len(ids) // 2
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(*ids)
        ctx.tables = (*item_table.shape, *category_table.shape)
        return tuple(
            torch.ops.attention_ctr_kernels.pair_lookup_forward(
                item_table, category_table, list(ids[:pairs]), list(ids[pairs:])
            )
        )

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads):  # type: ignore[override]
        ids = ctx.saved_tensors
        pairs = len(ids) // 2
        grads = [g if g is not None else ids[0].new_empty(0, dtype=torch.float32) for g in grads]
        d_items, d_categories = torch.ops.attention_ctr_kernels.pair_lookup_backward(
            grads, list(ids[:pairs]), list(ids[pairs:]), *ctx.tables
        )
        return (d_items, d_categories, *([None] * len(ids)))


def pair_lookup(
    item_table: Tensor, category_table: Tensor, items: list[Tensor], categories: list[Tensor]
) -> tuple[Tensor, ...]:
    """`cat([item_table[items[i]], category_table[categories[i]]], -1)` for each i."""
    return FusedPairLookup.apply(item_table, category_table, *items, *categories)


class FusedConcatLookup(torch.autograd.Function):
    """`cat([tables[k][ids[k]] for k], -1)` in one pass (no concatenation); the backward sums
    each table's dense gradient in one pass, row 0 (padding) getting none."""

    @staticmethod
    def forward(ctx, n_tables, *tables_and_ids):  # type: ignore[override]
        tables, ids = tables_and_ids[:n_tables], tables_and_ids[n_tables:]
        ctx.save_for_backward(*ids)
        ctx.shapes = [list(table.shape) for table in tables]
        return torch.ops.attention_ctr_kernels.concat_lookup_forward(list(tables), list(ids))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):  # type: ignore[override]
        rows, widths = zip(*ctx.shapes)
        d_tables = torch.ops.attention_ctr_kernels.concat_lookup_backward(
            grad, list(ctx.saved_tensors), list(rows), list(widths)
        )
        return (None, *d_tables, *([None] * len(d_tables)))


def concat_lookup(tables: list[Tensor], ids: list[Tensor]) -> Tensor:
    """`torch.cat([table[i] for table, i in zip(tables, ids)], -1)` for embedding tables whose
    row 0 is padding (id tensors of one shape)."""
    return FusedConcatLookup.apply(len(tables), *tables, *ids)


class FusedDINUnitInput(torch.autograd.Function):
    """DIN's per-behaviour unit input `[h, h * t]` `[N, 2E]` at the real positions `index`
    (`b * L + l`, ascending) of history `[B, L, E]` with each sample's target `[B, E]`."""

    @staticmethod
    def forward(ctx, history, target, index):  # type: ignore[override]
        ctx.save_for_backward(history, target, index)
        return torch.ops.attention_ctr_kernels.din_unit_input_forward(history, target, index)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):  # type: ignore[override]
        history, target, index = ctx.saved_tensors
        d_history, d_target = torch.ops.attention_ctr_kernels.din_unit_input_backward(
            grad, history, target, index
        )
        return d_history, d_target, None


class FusedSampleRows(torch.autograd.Function):
    """Row `x[index[n] // L]` `[N, A]` of per-sample `x` `[B, A]` for each real position
    `index[n]` (ascending); the backward sums each sample's rows (no accumulating scatter)."""

    @staticmethod
    def forward(ctx, x, index, length):  # type: ignore[override]
        ctx.save_for_backward(index)
        ctx.batch, ctx.length = x.shape[0], length
        return torch.ops.attention_ctr_kernels.sample_rows_forward(x, index, length)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):  # type: ignore[override]
        (index,) = ctx.saved_tensors
        d_x = torch.ops.attention_ctr_kernels.sample_rows_backward(
            grad, index, ctx.batch, ctx.length
        )
        return d_x, None, None


class FusedGatherPositions(torch.autograd.Function):
    """`torch.stack([x[row, position] for x in sources])` for float32 `[B, L, E]` sources."""

    @staticmethod
    def forward(ctx, row, position, *sources):  # type: ignore[override]
        ctx.save_for_backward(row, position)
        ctx.shape = sources[0].shape
        return torch.ops.attention_ctr_kernels.gather_positions_forward(
            list(sources), row, position
        )

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):  # type: ignore[override]
        row, position = ctx.saved_tensors
        batch, length, _ = ctx.shape
        grads = torch.ops.attention_ctr_kernels.gather_positions_backward(
            grad, row, position, batch, length
        )
        return (None, None, *grads.unbind(0))
