"""Layers shared by the CTR models: behaviour embeddings, Dice, MLP, DIN's activation unit, AUGRU.

Conventions used everywhere:

- ids are int64, 0 is padding / unknown; histories are `[B, L]`, left-aligned (positions
  `0 .. len-1` real, padding after), with a bool `mask` `[B, L]` (True = real behaviour);
- a behaviour vector is item embedding ⊕ category embedding, `E = 2 * embedding_dim` wide;
- padded positions are excluded by the mask everywhere (attention weights, batch statistics,
  pooling, losses), never only by `padding_idx=0` embeddings being zero.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attention_ctr.models import cpu_kernels

Batch = Mapping[str, Tensor]

#: Keys of the feature spec (feature engineering's `feature_spec`) every model constructor takes.
FEATURE_KEYS = ("n_items", "n_categories", "n_behaviors", "n_time_gap_buckets", "max_history")


def capture_config(arguments: dict) -> dict:
    """A model's constructor arguments as a JSON-serialisable dict (`cls(**config)` rebuilds it)."""
    config = {}
    for key, value in arguments.items():
        if key in ("self", "__class__"):
            continue
        config[key] = list(value) if isinstance(value, tuple) else value
    return config


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of `values` `[B, L, E]` over the real positions of `mask` `[B, L]` -> `[B, E]`."""
    weights = mask.to(values.dtype)
    total = cpu_kernels.weighted_sum(weights, values)
    return total / weights.sum(1, keepdim=True).clamp_min(1.0)


def masked_softmax(scores: Tensor, mask: Tensor, dim: int = -1) -> Tensor:
    """Softmax over real positions; padding gets exactly 0 (filled with finfo.min, never -inf)."""
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    return torch.softmax(scores, dim=dim).masked_fill(~mask, 0.0)


def pad_positions(x: Tensor, length: int) -> Tensor:
    """Zero-pad (False for bool) dim 1 of `x` `[B, L, ...]` up to `length`.

    No Python branch on L: traced for ONNX, the padding width stays a function of the input's
    shape (an empty block when L == length).
    """
    padding = x.new_zeros((x.shape[0], length - x.shape[1], *x.shape[2:]))
    return torch.cat([x, padding], dim=1)


class BehaviorEmbedding(nn.Module):
    """Item ⊕ category embedding of behaviours, shared by target and history lookups.

    `item_embedding` and `category_embedding` are `nn.Embedding(n + 1, embedding_dim,
    padding_idx=0)`. With `use_behavior`, an embedding of the behaviour type (view, cart, ...)
    of width `2 * embedding_dim` is *added* to history vectors (the target has no behaviour
    type), which keeps history and target vectors the same width.
    """

    def __init__(
        self,
        n_items: int,
        n_categories: int,
        embedding_dim: int,
        n_behaviors: int = 0,
        use_behavior: bool = False,
    ):
        super().__init__()
        self.dim = 2 * embedding_dim
        self.item_embedding = nn.Embedding(n_items + 1, embedding_dim, padding_idx=0)
        self.category_embedding = nn.Embedding(n_categories + 1, embedding_dim, padding_idx=0)
        self.behavior_embedding = (
            nn.Embedding(n_behaviors + 1, self.dim, padding_idx=0) if use_behavior else None
        )
        for table in (self.item_embedding, self.category_embedding):
            nn.init.normal_(table.weight, std=embedding_dim**-0.5)
            with torch.no_grad():
                table.weight[0].zero_()

    def items(self, item: Tensor, category: Tensor) -> Tensor:
        """`[...]` item and category ids -> `[..., E]` behaviour vectors."""
        return torch.cat([self.item_embedding(item), self.category_embedding(category)], dim=-1)

    def lookup(
        self,
        batch: Batch,
        negatives: bool = False,
        pairs_at: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Target `[B, E]`, history `[B, L, E]` and, with `negatives`, DIEN's negative history
        `[B, L, E]`; or, given `pairs_at` (row, position) `[N]` each, of real positions only,
        the history's and the negative history's vectors at just those positions `[2, N, E]`
        (DIEN's auxiliary terms, looked up where they are used instead of densely then
        gathered). ONE lookup per table: one dense gradient per table per step instead of one
        per lookup (on CPU each is a zeroed n_items x embedding_dim tensor). Float32 CPU
        training runs it in the fused kernels (`cpu_kernels.pair_lookup`).

        Padded positions read as id 0, whatever they hold; so do missing negatives (id 0).
        """
        mask = batch["mask"]
        items = [batch["target_item"].unsqueeze(1), batch["hist_item"].masked_fill(~mask, 0)]
        categories = [
            batch["target_category"].unsqueeze(1),
            batch["hist_category"].masked_fill(~mask, 0),
        ]
        if pairs_at is not None:  # real positions: only missing negatives to mask
            row, position = pairs_at
            negative = batch["neg_item"][row, position]
            negative_category = batch["neg_category"][row, position].masked_fill(negative == 0, 0)
            items.append(torch.stack([batch["hist_item"][row, position], negative]))
            categories.append(
                torch.stack([batch["hist_category"][row, position], negative_category])
            )
        elif negatives:
            real = mask & (batch["neg_item"] != 0)
            items.append(batch["neg_item"].masked_fill(~real, 0))
            categories.append(batch["neg_category"].masked_fill(~real, 0))
        item_table, category_table = self.item_embedding.weight, self.category_embedding.weight
        if cpu_kernels.usable(item_table) and category_table.dtype == torch.float32:
            # fused: one pass per lookup, one per table's gradient (aten's embedding backward
            # and the concatenations are a visible share of DIEN's step)
            pieces = cpu_kernels.pair_lookup(item_table, category_table, items, categories)
        else:
            vectors = self.items(
                torch.cat([ids.reshape(-1) for ids in items]),
                torch.cat([ids.reshape(-1) for ids in categories]),
            )
            # split, not slicing: its backward concatenates the pieces' gradients in one pass
            # instead of zero-filling a full-size gradient for each slice and adding them up
            pieces = [
                piece.view(*ids.shape, self.dim)
                for piece, ids in zip(vectors.split([ids.numel() for ids in items]), items)
            ]
        target, history = pieces[0].squeeze(1), pieces[1]
        third = pieces[2] if len(pieces) > 2 else None
        if self.behavior_embedding is not None:
            behavior = batch["hist_behavior"].masked_fill(~mask, 0)
            history = history + self.behavior_embedding(behavior)
            if pairs_at is not None:  # the history's vectors carry their behaviour type
                positive = third[0] + self.behavior_embedding(behavior[pairs_at])
                third = torch.stack([positive, third[1]])
        return target, history, third

    def target(self, batch: Batch) -> Tensor:
        """`[B, E]` target vectors."""
        return self.lookup(batch)[0]

    def history(self, batch: Batch) -> Tensor:
        """`[B, L, E]` history vectors; padded positions read as id 0, whatever they hold."""
        return self.lookup(batch)[1]


def column_sums(x: Tensor) -> Tensor:
    """`x.sum(0)` of a 2-D `x` `[N, C]` as a matrix-vector product: on the CPU, BLAS's gemv
    reads a tall matrix faster than torch's reduction over dim 0."""
    return torch.mv(x.t(), x.new_ones(x.shape[0]))


def gather_positions(sources: Sequence[Tensor], row: Tensor, position: Tensor) -> Tensor:
    """`[x[row, position] for x in sources]` stacked -> `[K, N, ...]`, for K same-shape `x`
    `[B, L, ...]` of any strides and DISTINCT (row, position) pairs. Unlike reshape +
    index_select it copies no shifted slice, and its backward writes each row once (no
    accumulating scatter, which sorts on CPU); float32 CPU training runs it in the kernels."""
    if all(x.dim() == 3 and cpu_kernels.usable(x) for x in sources):
        return cpu_kernels.FusedGatherPositions.apply(row, position, *sources)
    return torch.stack([_GatherPositions.apply(x, row, position) for x in sources])


class _GatherPositions(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, row, position):  # type: ignore[override]
        ctx.save_for_backward(row, position)
        ctx.shape = x.shape
        return x[row, position]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):  # type: ignore[override]
        row, position = ctx.saved_tensors
        grad_x = grad.new_zeros(ctx.shape)
        grad_x[row, position] = grad  # pairs are distinct: a plain write
        return grad_x, None, None


class Dice(nn.Module):
    """Dice activation (DIN paper, eq. 4): `p(s) * s + (1 - p(s)) * alpha * s`.

    `p(s) = sigmoid((s - E[s]) / sqrt(Var[s] + eps))` normalises each unit over the batch, like
    BatchNorm without affine parameters: batch statistics in training (over the real positions
    only when a `mask` is given; gradients flow through them as in BatchNorm), moving averages
    in eval mode. `alpha` is learned per unit and starts at 0. Computed in float32
    (bf16-autocast safe). Training runs `_DiceFunction` (the same formula with a hand-written
    backward: about half the memory passes of autograd's graph for this layer), or in float32
    CPU training the fused kernels (`cpu_kernels.FusedDice`: one pass forward, two backward).
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
        if not self.training:
            xf = x.float()
            p = torch.sigmoid((xf - self.running_mean) * torch.rsqrt(self.running_var + self.eps))
            return (xf * (p + (1.0 - p) * self.alpha)).to(x.dtype)
        flat = x.reshape(-1, x.shape[-1])
        weights = None if mask is None else mask.reshape(-1).float()
        if cpu_kernels.usable(flat) and self.alpha.dtype == torch.float32:
            no_weights = flat.new_empty(0)
            out, mean, var, count = cpu_kernels.FusedDice.apply(
                flat, self.alpha, no_weights if weights is None else weights, self.eps
            )
        else:
            out, mean, var, count = _DiceFunction.apply(flat, self.alpha, weights, self.eps)
        with torch.no_grad():  # running variance is unbiased, as in BatchNorm
            bessel = count / (count - 1.0).clamp_min(1.0)
            dtype = self.running_mean.dtype
            self.running_mean.lerp_(mean.to(dtype), self.momentum)
            self.running_var.lerp_((var * bessel).to(dtype), self.momentum)
        return out.view(x.shape)


class _DiceFunction(torch.autograd.Function):
    """Training-mode Dice on `x` `[N, C]` with optional row weights `[N]` (1 = real, 0 = padding).

    Forward: mean and (biased) variance over the weighted rows, z = (x - mean) / sqrt(var + eps),
    p = sigmoid(z), out = x * (alpha + (1 - alpha) p). Backward is BatchNorm's, written out:
    dz = dout x (1 - alpha) p (1 - p); dx = dout (alpha + (1 - alpha) p)
    + rstd (dz - w (sum dz + z sum(dz z)) / n). Returns (out, mean, var, n); only out is
    differentiable.
    """

    @staticmethod
    def forward(ctx, x, alpha, weights, eps):  # type: ignore[override]
        with torch.autocast(x.device.type, enabled=False):
            dtype = torch.promote_types(x.dtype, torch.float32)
            xf, alpha_f = x.to(dtype), alpha.to(dtype)
            if weights is None:
                count = xf.new_tensor(float(xf.shape[0]))
                mean = column_sums(xf) / count
                z = xf - mean
                var = column_sums(z.square()) / count
            else:
                weights = weights.to(dtype)
                count = weights.sum().clamp_min(1.0)
                mean = (weights @ xf) / count
                z = xf - mean
                var = (weights @ z.square()) / count
            rstd = torch.rsqrt(var + eps)
            z.mul_(rstd)
            p = torch.sigmoid(z)
            gate = torch.addcmul(alpha_f, p, 1 - alpha_f)
            out = (xf * gate).to(x.dtype)
        ctx.save_for_backward(xf, p, z, gate, rstd, alpha_f, weights, count)
        ctx.dtypes = (x.dtype, alpha.dtype)
        ctx.mark_non_differentiable(mean, var, count)
        return out, mean, var, count

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out, _mean, _var, _count):  # type: ignore[override]
        x, p, z, gate, rstd, alpha, weights, count = ctx.saved_tensors
        with torch.autocast(x.device.type, enabled=False):
            grad = grad_out.to(x.dtype)
            grad_x = grad * x
            grad_alpha = column_sums(grad_x) - column_sums(grad_x * p)  # sum dout x (1 - p)
            grad_z = torch.ops.aten.sigmoid_backward(grad_x.mul_(1 - alpha), p)
            dx = grad * gate
            scale = rstd / count
            correction = torch.addcmul(
                scale * column_sums(grad_z), z, scale * column_sums(grad_z * z)
            )
            if weights is not None:
                correction.mul_(weights.unsqueeze(1))
            dx.addcmul_(grad_z, rstd).sub_(correction)
        x_dtype, alpha_dtype = ctx.dtypes
        return dx.to(x_dtype), grad_alpha.to(alpha_dtype), None, None


class PReLU(nn.Module):
    """PReLU with one slope per unit of the LAST dimension (`nn.PReLU` uses dim 1)."""

    def __init__(self, num_features: int, init: float = 0.25):
        super().__init__()
        self.weight = nn.Parameter(torch.full((num_features,), init))

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        # F.prelu's slopes run along dim 1: on the 2-D view that is the last dimension.
        flat = x.reshape(-1, x.shape[-1])
        weight = self.weight.to(x.dtype)
        if (
            flat.device.type == "cpu"
            and torch.is_grad_enabled()
            and not torch.onnx.is_in_onnx_export()
        ):
            return _PReLUFunction.apply(flat, weight).view(x.shape)
        return F.prelu(flat, weight).view(x.shape)


class _PReLUFunction(torch.autograd.Function):
    """`F.prelu` on `x` `[N, C]` with slopes `[C]`, in a few fast passes for CPU training.

    aten's CPU PReLU backward (a broadcast `where` and a column reduction) takes several times
    as long as these: out = x + (w - 1) min(x, 0); dx = g where x > 0 else w g (one `lerp`);
    dw = column sums of g min(x, 0) (one matrix-vector product).
    """

    @staticmethod
    def forward(ctx, x, weight):  # type: ignore[override]
        negative = x.clamp_max(0)
        ctx.save_for_backward(x, negative, weight)
        return torch.addcmul(x, negative, weight - 1)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):  # type: ignore[override]
        x, negative, weight = ctx.saved_tensors
        positive_grad = torch.ops.aten.threshold_backward(grad, x, 0)  # g where x > 0, else 0
        grad_x = torch.lerp(positive_grad, grad, weight.expand_as(grad))
        grad_weight = column_sums(grad * negative)
        return grad_x, grad_weight


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
        return self.after_first_linear(cpu_kernels.apply_linear(self.linears[0], x), mask)

    def after_first_linear(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """The rest of `forward`, from the first Linear's output `[..., hidden[0]]`."""
        return self._rest(self.dropout(self.activations[0](x, mask)), mask)

    def after_first_product(self, product: Tensor, addend: Tensor | None = None) -> Tensor:
        """The rest of `forward` from the first Linear's product W x `[R, hidden[0]]` WITHOUT
        its bias, plus `addend` `[M, hidden[0]]` tiled over the rows (row r gets addend[r % M];
        M divides R). On CPU training with PReLU, bias, addend and activation are one pass."""
        if self._fuses(0, product):
            x = cpu_kernels.bias_prelu(
                product, self.linears[0].bias, self.activations[0].weight, addend
            )
        else:
            x = product + self.linears[0].bias
            if addend is not None:
                x = (x.view(-1, *addend.shape) + addend).view(product.shape)
            x = self.activations[0](x)
        return self._rest(self.dropout(x))

    def after_first_input(
        self,
        x: Tensor,
        weight: Tensor,
        shared: Tensor | None = None,
        shared_weight: Tensor | None = None,
    ) -> Tensor:
        """`after_first_product(F.linear(x, weight), F.linear(shared, shared_weight))` for `x`
        `[R, K]` and `weight` `[hidden[0], K]` (the first Linear's weight or a column slice of
        it), and optionally a part of the input that M rows share, `shared` `[M, S]` (M divides
        R; row r uses shared row r % M) with its columns of the weight `shared_weight`. In CPU
        training a head of two PReLU layers and a one-unit output (DIEN's auxiliary net) is
        one kernel over row blocks (`cpu_kernels.FusedPReLUHead`): the shared product is
        taken once per block of shared rows, and of its activations only the PReLUs' inputs
        are written."""
        # under bf16 autocast the kernel takes float32 and rounds its matmuls' operands itself
        widen = cpu_kernels.bf16_matmuls()
        head_x = x.float() if widen else x
        if (
            len(self.linears) == 2
            and self._fuses(0, head_x, matmuls=True)
            and self._fuses_output(head_x)
        ):
            (first, second), (slope_1, slope_2) = self.linears, self.activations
            no_shared = x.new_empty(0, dtype=torch.float32)
            return cpu_kernels.FusedPReLUHead.apply(
                head_x,
                weight,
                no_shared if shared is None else shared.float() if widen else shared,
                no_shared if shared is None else shared_weight,
                first.bias,
                slope_1.weight,
                second.weight,
                second.bias,
                slope_2.weight,
                self.output.weight,
                self.output.bias,
            )
        addend = None if shared is None else cpu_kernels.linear(shared, shared_weight)
        return self.after_first_product(cpu_kernels.linear(x, weight), addend)

    def _fuses(self, index: int, x: Tensor, matmuls: bool = False) -> bool:
        return (
            isinstance(self.activations[index], PReLU)
            and x.dim() == 2
            and cpu_kernels.usable(x, matmuls)
        )

    def _fuses_output(self, x: Tensor) -> bool:
        """Last PReLU layer + a one-unit output in one kernel (no dropout in between)."""
        return (
            self.output is not None
            and self.output.out_features == 1
            and (self.dropout.p == 0 or not self.training)
            and self._fuses(len(self.linears) - 1, x)
        )

    def _rest(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """Hidden layers 1.. and the output Linear on the first hidden layer's output."""
        last = len(self.linears) - 1
        for index in range(1, len(self.linears)):
            linear, activation = self.linears[index], self.activations[index]
            if index == last and self._fuses_output(x):
                output = self.output
                product = cpu_kernels.linear(x, linear.weight)
                return cpu_kernels.FusedPReLULinear.apply(
                    product, linear.bias, activation.weight, output.weight, output.bias
                )
            if self._fuses(index, x):
                x = cpu_kernels.bias_prelu(
                    cpu_kernels.linear(x, linear.weight), linear.bias, activation.weight
                )
            else:
                x = activation(cpu_kernels.apply_linear(linear, x), mask)
            x = self.dropout(x)
        return cpu_kernels.apply_linear(self.output, x) if self.output is not None else x


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

    def first_layer(self, history: Tensor, target: Tensor, owner: Tensor | None = None) -> Tensor:
        """The unit's first Linear on `unit_input(history, target)`.

        Dense: `history` `[B, L, E]`, `target` `[B, E]` -> `[B, L, hidden[0]]`. Packed: history
        rows `[N, E]` with `owner` `[N]` (the sample each row belongs to) -> `[N, hidden[0]]`.
        Same function, fewer FLOPs: with W = [W_h, W_t, W_d, W_p] split like the input,
        W [h, t, h - t, h * t] + b = [W_h + W_d, W_p] [h, h * t] + ((W_t - W_d) t + b), so the
        per-behaviour matmul is 2E wide instead of 4E and the target part is computed once per
        sample (also what a server scoring many candidates per user can reuse).
        """
        weight, per_target = self._split_first_layer(target)
        if owner is None:
            t, per_target = target.unsqueeze(1), per_target.unsqueeze(1)
        else:
            t, per_target = target.index_select(0, owner), per_target.index_select(0, owner)
        per_behaviour = cpu_kernels.linear(
            torch.cat([history, history * t.to(history.dtype)], dim=-1), weight
        )
        return per_behaviour + per_target.to(per_behaviour.dtype)

    def _split_first_layer(self, target: Tensor) -> tuple[Tensor, Tensor]:
        """The first Linear split as in `first_layer`: the per-behaviour weight
        `[W_h + W_d, W_p]` `[hidden[0], 2E]` and the per-target term `(W_t - W_d) t + b`
        `[B, hidden[0]]`."""
        linear = self.unit.linears[0]
        w_h, w_t, w_d, w_p = linear.weight.split(target.shape[-1], dim=1)
        return torch.cat([w_h + w_d, w_p], dim=1), F.linear(target, w_t - w_d, linear.bias)

    def scores(
        self, history: Tensor, target: Tensor, mask: Tensor, skip_padding: bool | None = None
    ) -> Tensor:
        """The unit's raw output `[B, L]`, exactly 0 on padding.

        With `skip_padding` (default: on CPU, outside ONNX export and torch.compile) the unit
        runs on the real positions only, gathered into `[N, E]` rows: padding costs nothing and
        cannot enter Dice's batch statistics. Otherwise it runs on the dense `[B, L]` grid with
        the mask handed to Dice (no data-dependent shapes). Both give the same result.
        """
        batch, length, dim = history.shape
        if skip_padding is None:  # packing has data-dependent shapes: not for export or compile
            skip_padding = (
                history.device.type == "cpu"
                and not torch.onnx.is_in_onnx_export()
                and not torch.compiler.is_compiling()
            )
        if not skip_padding:
            hidden = self.first_layer(history, target)  # = unit.linears[0](unit_input(h, t))
            return self.unit.after_first_linear(hidden, mask).squeeze(-1).masked_fill(~mask, 0.0)
        index = mask.reshape(-1).nonzero().squeeze(1)  # real positions, row-major
        if index.numel() == batch * length:  # no padding at all
            hidden = self.first_layer(history, target)
            return self.unit.after_first_linear(hidden).squeeze(-1)
        if cpu_kernels.usable(history) and target.dtype == torch.float32:
            hidden = self._first_layer_at(history, target, index)
        else:
            rows = history.reshape(-1, dim).index_select(0, index)  # [N, E]
            owner = torch.div(index, length, rounding_mode="floor")
            hidden = self.first_layer(rows, target, owner)
        packed = self.unit.after_first_linear(hidden).squeeze(-1)
        return packed.new_zeros(batch * length).index_copy(0, index, packed).view(batch, length)

    def _first_layer_at(self, history: Tensor, target: Tensor, index: Tensor) -> Tensor:
        """`first_layer` on the real positions `index` (ascending `b * L + l`) through the
        kernels: `[h, h * t]` gathered and multiplied in one pass, and the per-target term
        repeated over each sample's rows as the matmul's addend -> `[N, hidden[0]]`."""
        weight, per_target = self._split_first_layer(target)
        rows = cpu_kernels.FusedDINUnitInput.apply(history, target, index)  # [N, 2E]
        # float32 for the kernel (bf16 under autocast, which then rounds addmm's operands)
        addend = cpu_kernels.FusedSampleRows.apply(per_target.float(), index, history.shape[1])
        return cpu_kernels.linear(rows, weight, addend=addend)

    def weights(self, history: Tensor, target: Tensor, mask: Tensor) -> Tensor:
        """`history` `[B, L, E]`, `target` `[B, E]`, `mask` `[B, L]` -> weights `[B, L]`."""
        scores = self.scores(history, target, mask)
        if self.normalization == "softmax":
            return masked_softmax(scores, mask)
        return scores

    def forward(self, history: Tensor, target: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """-> (user interest `[B, E]` = sum_j w_j h_j, weights `[B, L]`)."""
        weights = self.weights(history, target, mask)
        interest = cpu_kernels.weighted_sum(weights.to(history.dtype), history)
        return interest, weights


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
    For speed, `input_projection` runs on all timesteps at once and `step` does the rest.
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
        gates = torch.sigmoid(projected[:, : 2 * size] + hidden[:, : 2 * size])
        r, u = gates[:, :size], gates[:, size:]
        candidate = torch.tanh(projected[:, 2 * size :] + r * hidden[:, 2 * size :])
        u = a * u  # attentional update gate u'_t = a_t * u_t
        return h + u * (candidate - h)  # = (1 - u'_t) * h + u'_t * h~_t

    def forward(self, x: Tensor, h: Tensor, a: Tensor) -> Tensor:
        """`x` `[B, input_size]`, `h` `[B, H]`, `a` `[B]` or `[B, 1]` -> new state `[B, H]`."""
        return self.step(self.input_projection(x), h, a.reshape(-1, 1))

    def sequence(self, x: Tensor, attention: Tensor, lengths: Tensor | None = None) -> Tensor:
        """Run over `x` `[B, L, input_size]` with `attention` `[B, L]` from h_0 = 0 -> `[B, H]`.

        The input projections of all L steps are one matmul; the loop does the rest. Steps with
        a_t = 0 (padding) leave the state unchanged; with `lengths` `[B]` training skips a
        row's steps after its length (the same result when a_t = 0 there). In training (grad
        enabled) the loop runs in `gated_recurrence` (same arithmetic in float32: fused kernels
        on CPU, hand-written backpropagation through time elsewhere, instead of an autograd
        graph of L x ~10 small ops); in eval and export it runs as plain `step`s, which trace
        to plain ONNX ops.
        """
        if self.training and torch.is_grad_enabled() and not torch.onnx.is_in_onnx_export():
            weights = (self.weight_ih, self.bias_ih, self.weight_hh, self.bias_hh)
            return gated_recurrence(x, *weights, attention, lengths, final_only=True)
        projected = self.input_projection(x)  # [B, L, 3H], one matmul for all timesteps
        dtype = torch.promote_types(projected.dtype, torch.float32)
        h = projected.new_zeros(projected.shape[0], self.hidden_size, dtype=dtype)
        for projected_t, a_t in zip(projected.unbind(1), attention.unsqueeze(-1).unbind(1)):
            h = self.step(projected_t, h, a_t)
        return h


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
    """All states `[B, L, H]` of a GRU-type recurrence over `x` `[B, L, I]` from h_0 = 0, for
    training; with `final_only` only the last one `[B, H]` (the kernels then write no others).

    With `lengths` `[B]` (left-aligned rows), row b runs only its first lengths[b] steps: its
    states after that repeat its last real one (h_0 = 0 for an empty row), whatever `x` and
    `attention` hold there, and the kernels skip those steps' work.

    Parameters as in `nn.GRU` (gates stacked [r, update, candidate]). With `attention`
    `[B, L]` this is the AUGRU (update gate u, h_t = h_{t-1} + a_t u_t (h~_t - h_{t-1}));
    without, it is exactly `nn.GRU` (its gate z keeps the old state: h_t = h_{t-1} +
    (1 - z_t) (h~_t - h_{t-1})). On CPU (float32, bf16) the loop runs in the fused C++
    kernels (`cpu_kernels`), which also project each step's input W_i x_t + b_i inside it
    (`x` may be a strided view: it is not copied); otherwise the input projections of all
    steps are one matmul and the loop runs (float64, GPU, no compiler) in `_GatedRecurrence`:
    the same arithmetic with backpropagation through time written by hand, the loop keeping
    only what depends on the previous state.
    """
    if attention is None:
        attention = x.new_empty(0)
    if x.device.type == "cpu" and x.dtype != torch.float64 and not torch.compiler.is_compiling():
        if cpu_kernels.available():  # builds the C++ kernels on first use
            no_lengths = torch.empty(0, dtype=torch.long)
            return cpu_kernels.fused_gated_recurrence(
                x,
                weight_ih,
                bias_ih,
                weight_hh,
                bias_hh,
                attention,
                no_lengths if lengths is None else lengths,
                final_only,
            )
    if lengths is not None:
        running = torch.arange(x.shape[1], device=x.device) < lengths.unsqueeze(-1)  # [B, L]
        if attention.numel():  # a_t = 0 keeps the state
            attention = attention * running
        else:  # the GRU as an AUGRU with a_t = 1 while running: u = 1 - z (its gate negated)
            size = weight_hh.shape[1]
            sign = torch.ones(3 * size, dtype=weight_hh.dtype, device=weight_hh.device)
            sign[size : 2 * size] = -1
            weight_ih, bias_ih = weight_ih * sign.unsqueeze(-1), bias_ih * sign
            weight_hh, bias_hh = weight_hh * sign.unsqueeze(-1), bias_hh * sign
            attention = running.to(x.dtype)
    projected = F.linear(x, weight_ih, bias_ih)
    states = _GatedRecurrence.apply(projected, attention, weight_hh, bias_hh)
    return states[:, -1] if final_only else states


class _GatedRecurrence(torch.autograd.Function):
    """Forward and hand-written backward of `gated_recurrence` (float32 or wider, autocast off).

    Built for small per-step ops, where dispatch costs as much as the arithmetic: the forward
    step is one addmm and five elementwise ops; in the backward only dh_{t-1} = dh_t keep_t +
    (dh_t M_t) U (+ the upstream gradient) stays in the loop, with every factor M_t, keep_t
    (and all other derivatives) computed for all steps at once before or after it.
    """

    @staticmethod
    def forward(ctx, projected, attention, weight_hh, bias_hh):  # type: ignore[override]
        dtype = torch.promote_types(projected.dtype, torch.float32)
        augru = attention.numel() > 0
        with torch.autocast(projected.device.type, enabled=False):
            gi = projected.to(dtype).transpose(0, 1)  # [L, B, 3H]
            weight, bias = weight_hh.to(dtype), bias_hh.to(dtype)
            length, batch, size = gi.shape[0], gi.shape[1], weight.shape[1]
            a = attention.to(dtype).t().unsqueeze(-1) if augru else None  # [L, B, 1]
            # What each step's addmm adds U h to: [W_r x + b_ir + b_hr, W_u x + b_iu + b_hu,
            # b_hn]; afterwards `pre` holds [r_t, u_t (AUGRU) or z_t (GRU), U_n h + b_hn].
            pre = torch.cat(
                [
                    gi[..., : 2 * size] + bias[: 2 * size],
                    bias[2 * size :].expand(length, batch, -1),
                ],
                dim=-1,
            )
            gi_n = gi[..., 2 * size :]
            weight_t = weight.t()
            states = gi.new_zeros(length + 1, batch, size)  # h_0 = 0, h_1 .. h_L
            candidates = gi.new_empty(length, batch, size)  # h~_t
            steps = zip(
                pre.unbind(0),
                pre[..., : 2 * size].unbind(0),
                pre[..., :size].unbind(0),
                pre[..., size : 2 * size].unbind(0),
                pre[..., 2 * size :].unbind(0),
                gi_n.unbind(0),
                candidates.unbind(0),
                states.unbind(0),
                states[1:].unbind(0),
                a.unbind(0) if augru else [None] * length,
            )
            for pre_t, gates_t, r_t, gate_t, hidden_n_t, gi_n_t, candidate, h, h_next, a_t in steps:
                torch.addmm(pre_t, h, weight_t, out=pre_t)
                torch.sigmoid_(gates_t)
                torch.addcmul(gi_n_t, r_t, hidden_n_t, out=candidate).tanh_()
                if augru:  # h_t = h_{t-1} + a_t u_t (h~_t - h_{t-1})
                    torch.lerp(h, candidate, gate_t * a_t, out=h_next)
                else:  # h_t = h~_t + z_t (h_{t-1} - h~_t)
                    torch.lerp(candidate, h, gate_t, out=h_next)
        ctx.save_for_backward(states, pre, candidates, a if augru else None, weight)
        ctx.dtypes = (projected.dtype, attention.dtype, weight_hh.dtype, bias_hh.dtype)
        return states[1:].transpose(0, 1)  # [B, L, H] view, float32 or wider

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_states):  # type: ignore[override]
        states, pre, candidates, a, weight = ctx.saved_tensors
        length, batch, size = candidates.shape
        augru = a is not None
        with torch.autocast(grad_states.device.type, enabled=False):
            upstream = grad_states.to(states.dtype).transpose(0, 1)  # [L, B, H]
            previous = states[:-1]
            r, gate, hidden_n = pre[..., :size], pre[..., size : 2 * size], pre[..., 2 * size :]
            gate_slope = gate * (1 - gate)
            if augru:
                update, d_update_d_gate = a * gate, a * gate_slope
            else:
                update, d_update_d_gate = 1 - gate, -gate_slope
            change = candidates - previous  # h_t = h_{t-1} + update_t (h~_t - h_{t-1})
            keep = 1 - update
            gate_n = update * (1 - candidates.square())  # d h_t / d z_n
            # d z / d h_t for z = [z_r, z_gate, the hidden candidate term r U_n h + b_hn]
            factors = torch.stack(
                [gate_n * hidden_n * r * (1 - r), change * d_update_d_gate, gate_n * r], dim=2
            )  # [L, B, 3, H]
            d_hidden = torch.empty_like(factors)
            dh_all = torch.empty_like(candidates)  # dL/dh_t, all t
            dh = upstream[length - 1].clone()
            for t in range(length - 1, -1, -1):
                dh_all[t] = dh
                torch.mul(dh.unsqueeze(1), factors[t], out=d_hidden[t])
                if t:
                    dh = torch.addmm(
                        torch.addcmul(upstream[t - 1], dh, keep[t]),
                        d_hidden[t].view(batch, 3 * size),
                        weight,
                    )
            d_hidden = d_hidden.view(length, batch, 3 * size)
            d_candidate = dh_all * gate_n  # dL/dz_n
            d_projected = torch.cat([d_hidden[..., : 2 * size], d_candidate], dim=-1)
            d_attention = (dh_all * change * gate).sum(-1).t() if augru else None  # [B, L]
            flat = d_hidden.reshape(-1, 3 * size)
            d_weight = flat.t() @ previous.reshape(-1, size)
            d_bias = column_sums(flat)
        projected_dtype, attention_dtype, weight_dtype, bias_dtype = ctx.dtypes
        return (
            d_projected.transpose(0, 1).to(projected_dtype),
            d_attention.to(attention_dtype) if augru else None,
            d_weight.to(weight_dtype),
            d_bias.to(bias_dtype),
        )


def minibatch_aware_l2(embedding_weight: Tensor, ids: Tensor, frequency: Tensor) -> Tensor:
    """DIN's mini-batch aware L2 (sec. 5.1): sum over ids j in the batch of ||w_j||^2 / n_j.

    Only rows that appear in `ids` (any shape; 0 = padding is skipped) are regularised, each
    once however often it appears, scaled by 1 / its frequency `n_j` (`frequency[j]`, e.g.
    training occurrences; clamped to >= 1).
    """
    present = torch.unique(ids.reshape(-1))
    present = present[present != 0]
    frequency = torch.as_tensor(frequency, device=embedding_weight.device)
    rows = embedding_weight[present]
    scale = frequency[present.to(frequency.device)].to(rows.dtype).clamp_min(1.0)
    return (rows.square().sum(-1) / scale).sum()


class CTRModel(nn.Module):
    """What every model offers beyond `forward(batch) -> logits [B]`.

    `attention(batch) -> [B, L]`, `auxiliary_loss`, `forward_with_auxiliary`, `regularization`,
    `item_embedding` / `category_embedding` (the shared tables), and `config` (the constructor
    arguments: `type(model)(**model.config)` rebuilds the architecture).
    """

    name: str = ""
    config: dict
    embedding: BehaviorEmbedding
    l2_weight: float = 0.0

    @property
    def item_embedding(self) -> nn.Embedding:
        return self.embedding.item_embedding

    @property
    def category_embedding(self) -> nn.Embedding:
        return self.embedding.category_embedding

    def attention(self, batch: Batch) -> Tensor:
        raise NotImplementedError

    def auxiliary_loss(self, batch: Batch) -> Tensor | None:
        """Only DIEN has an auxiliary loss."""
        return None

    def forward_with_auxiliary(self, batch: Batch) -> tuple[Tensor, Tensor | None]:
        """`(logits [B], auxiliary loss or None)`, sharing work where a model has both."""
        return self(batch), None

    def regularization(
        self, batch: Batch, item_frequency: Tensor, category_frequency: Tensor | None = None
    ) -> Tensor:
        """`l2_weight` * mini-batch aware L2 of the embeddings of the batch's ids (0 when off).

        `item_frequency` `[n_items + 1]` (and `category_frequency` `[n_categories + 1]`, whose
        table is only regularised when given) count each id's training occurrences.
        """
        weight = self.item_embedding.weight
        if not self.l2_weight:
            return weight.new_zeros(())
        padding = ~batch["mask"]
        items = torch.cat(
            [batch["target_item"], batch["hist_item"].masked_fill(padding, 0).flatten()]
        )
        term = minibatch_aware_l2(weight, items, item_frequency)
        if category_frequency is not None:
            categories = torch.cat(
                [batch["target_category"], batch["hist_category"].masked_fill(padding, 0).flatten()]
            )
            term = term + minibatch_aware_l2(
                self.category_embedding.weight, categories, category_frequency
            )
        return self.l2_weight * term
