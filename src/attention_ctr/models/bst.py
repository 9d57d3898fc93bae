"""BST: Behavior Sequence Transformer.

Paper: Qiwei Chen, Huan Zhao, Wei Li, Pipei Huang, Wenwu Ou, "Behavior Sequence Transformer
for E-commerce Recommendation in Alibaba", DLP-KDD 2019 (arXiv:1905.06874).

The target item is appended to the history as the LAST token; every token is
`[item emb, category emb, position emb]` (the position feature is CONCATENATED, as in the
paper's figure 1). The position feature is, by default, the paper's time gap to the target,
`pos(v_i) = t(v_target) - t(v_i)` bucketised by feature engineering (`batch["time_gap"]`,
ids 1 .. n_time_gap_buckets - 1, 0 = padding); the target's own gap (zero, "now") gets the
dedicated id `n_time_gap_buckets`, so it never shares a row with a history bucket. The
fallback `position="index"` is a learned embedding of the distance from the target in
behaviours: target 1, most recent behaviour 2, the one before 3, ... (padding 0).

One post-LayerNorm Transformer block per layer (paper eq. 1-4): multi-head self-attention via
`scaled_dot_product_attention` (fused kernels; padded keys masked with an additive
`finfo.min` mask, never -inf; the target token is never masked, so no row is fully masked;
CPU training computes the same in `cpu_kernels.packed_attention`, straight from the packed
q | k | v projection), 4 heads by default (the paper uses 8; with d = 96 that is 12 dims a
head, whose attention forward and backward are slower than 4 heads of 24, in the CPU kernel
and in SDPA), dropout 0.1 on both residual branches and inside the
feed-forward (`attention_dropout` on the attention probabilities is an option, off by
default: it forces the unfused attention path), LayerNorm eps 1e-5, a LeakyReLU feed-forward
of width `feedforward_dim` (the paper gives none; default d: the usual 4 d makes the whole
training step markedly slower on CPU). Output (paper): the outputs of all
positions concatenated (`output="concat"`: a fixed width of `max_history + 1` tokens, padded
positions zeroed; outside ONNX export the encoder runs only the batch's own L + 1 tokens and
the MLP's first layer only the matching weight columns, the same function); `output="mean"`
averages the real positions instead. Then an MLP with LeakyReLU.

Shapes (B batch, L history length <= max_history, M = max_history, E = 2 * embedding_dim,
P = position_dim, d = E + P):
    batch["target_item"], batch["target_category"]   [B] int64
    batch["hist_item"], batch["hist_category"]        [B, L] int64
    batch["time_gap"]                                 [B, L] int64 (position="time_gap")
    batch["mask"]                                     [B, L] bool
    tokens [B, S, d], S = M + 1 (concat) or L + 1 (mean), target at S - 1
    encoder output [B, S, d] -> [B, S * d] (concat) or [B, d] (mean) -> MLP -> logits [B]
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attention_ctr.models import cpu_kernels
from attention_ctr.models.layers import (
    MLP,
    Batch,
    BehaviorEmbedding,
    CTRModel,
    capture_config,
    pad_positions,
)

LEAKY_SLOPE = 0.01  # the feed-forward's LeakyReLU (torch's default slope)


def fast_dropout(x: Tensor, p: float, training: bool) -> Tensor:
    """`F.dropout`, with a cheaper random mask on CPU.

    torch's CPU Bernoulli sampler costs ~8 ns an element on some CPUs (it dominated BST's
    training step); here each 64-bit random draw gives four 15-bit uniforms, and an element is
    kept when its uniform is >= round(p * 2^15) (so p is rounded to a multiple of 2^-15). Float32
    CPU training draws the same kind of mask in the fused kernels (`cpu_kernels.dropout`: one
    pass each way, the mask regenerated from its seed in the backward, never stored).
    """
    if not training or p <= 0.0:
        return x
    if x.device.type != "cpu" or p >= 1.0:
        return F.dropout(x, p, training=True)
    threshold = dropout_threshold(p, training)
    if cpu_kernels.usable(x):
        return cpu_kernels.dropout(x, threshold)
    draws = torch.empty((x.numel() + 3) // 4, dtype=torch.int64).random_()
    uniforms = draws.view(torch.int16)[: x.numel()].view(x.shape) & 0x7FFF  # [0, 2^15)
    scale = 32768 / (32768 - threshold)  # 1 / P(keep)
    return x * (uniforms >= threshold).to(x.dtype).mul_(scale)


def dropout_threshold(p: float, training: bool) -> int:
    """`fast_dropout`'s threshold: round(p 2^15), 0 (keep all) outside training."""
    return round(p * 32768) if training and p > 0.0 else 0


def _padding_bias(keep: Tensor, dtype: torch.dtype) -> Tensor:
    """`[B, S]` bool (True = attend) -> additive mask `[B, 1, 1, S]`: 0 or finfo(dtype).min."""
    bias = torch.zeros(keep.shape, dtype=dtype, device=keep.device)
    return bias.masked_fill(~keep, torch.finfo(dtype).min)[:, None, None, :]


class TransformerBlock(nn.Module):
    """Post-LN Transformer encoder layer on `scaled_dot_product_attention`.

    S' = LayerNorm(S + Dropout(MultiHead(S))); F = LayerNorm(S' + Dropout(FFN(S'))), with
    FFN(x) = W2 Dropout(LeakyReLU(W1 x)). `forward(x [B, S, d], keep [B, S]) -> [B, S, d]`.
    `attention_dropout` (on the attention probabilities, as `nn.MultiheadAttention` does) is
    separate and 0 by default: with it SDPA leaves its fused kernel for the unfused math path,
    several times slower on CPU.
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        feedforward_dim: int,
        dropout: float = 0.1,
        attention_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model {d_model} is not divisible by n_heads {n_heads}")
        self.n_heads = n_heads
        self.dropout_p = dropout
        self.attention_dropout = attention_dropout
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)
        self.feedforward1 = nn.Linear(d_model, feedforward_dim)
        self.feedforward2 = nn.Linear(feedforward_dim, d_model)
        self.norm1 = nn.LayerNorm(d_model, eps=1e-5)
        self.norm2 = nn.LayerNorm(d_model, eps=1e-5)

    def _heads(self, qkv: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The projection `[B, S, 3 d]` -> q, k, v `[B, heads, S, d / heads]`."""
        batch, length, width = qkv.shape
        qkv = qkv.view(batch, length, 3, self.n_heads, width // (3 * self.n_heads))
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        return q, k, v

    def attention_weights(self, x: Tensor, keep: Tensor) -> Tensor:
        """The attention probabilities `[B, heads, S, S]` (no dropout), for explanations."""
        q, k, _ = self._heads(self.qkv(x))
        scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
        return torch.softmax(scores + _padding_bias(keep, scores.dtype), dim=-1)

    @staticmethod
    def _fused(
        linear: nn.Linear,
        x: Tensor,
        threshold: int,
        residual: Tensor | None = None,
        leaky_slope: float | None = None,
    ) -> Tensor:
        """`residual + dropout(act(linear(x)))` through `cpu_kernels.bias_dropout`."""
        product = cpu_kernels.linear(x, linear.weight).float()
        return cpu_kernels.bias_dropout(product, linear.bias, threshold, residual, leaky_slope)

    def _attend(self, x: Tensor, keep: Tensor, kernels: bool) -> Tensor:
        """Multi-head attention before the output projection: `[B, S, d]`, heads side by side;
        `kernels`: CPU training may take the fused kernels (`cpu_kernels.usable`)."""
        # Attention itself in float32 even under bf16 autocast: the CPU's bf16 SDPA (and its
        # casts) made a bf16 training step slower than float32; the Linears stay bf16.
        if kernels and not (self.training and self.attention_dropout):
            # CPU training: straight from the packed projection (the kernel adds its bias), the
            # gradient in its layout
            qkv = cpu_kernels.linear(x, self.qkv.weight).float()
            return cpu_kernels.packed_attention(qkv, self.qkv.bias, keep, self.n_heads)
        q, k, v = self._heads(self.qkv(x))
        with torch.autocast(x.device.type, enabled=False):
            dtype = torch.promote_types(q.dtype, torch.float32)
            q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
            attended = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=_padding_bias(keep, q.dtype),
                dropout_p=self.attention_dropout if self.training else 0.0,
            )  # [B, heads, S, d / heads]
        return attended.transpose(1, 2).reshape(x.shape)

    def forward(self, x: Tensor, keep: Tensor) -> Tensor:
        kernels = cpu_kernels.usable(x)
        attended = self._attend(x, keep, kernels)
        p, training = self.dropout_p, self.training
        threshold = dropout_threshold(p, training)
        if kernels and threshold < 32768:
            # CPU training: each Linear's bias, activation, dropout and residual in one float32
            # pass (the Linears multiply without their biases, in bf16 under autocast)
            x = self.norm1(self._fused(self.out, attended, threshold, residual=x))
            hidden = self._fused(self.feedforward1, x, threshold, leaky_slope=LEAKY_SLOPE)
            return self.norm2(self._fused(self.feedforward2, hidden, threshold, residual=x))
        x = self.norm1(x + fast_dropout(self.out(attended), p, training))
        hidden = fast_dropout(F.leaky_relu(self.feedforward1(x), LEAKY_SLOPE), p, training)
        return self.norm2(x + fast_dropout(self.feedforward2(hidden), p, training))


class BST(CTRModel):
    """Behavior Sequence Transformer: [history ..., target] tokens -> Transformer -> MLP."""

    name = "bst"

    def __init__(
        self,
        *,
        n_items: int,
        n_categories: int,
        n_behaviors: int = 0,
        n_time_gap_buckets: int = 0,
        max_history: int = 50,
        embedding_dim: int = 32,
        mlp_hidden: Sequence[int] = (200, 80),
        position: str = "time_gap",
        position_dim: int | None = None,
        n_heads: int = 4,
        n_layers: int = 1,
        feedforward_dim: int | None = None,
        transformer_dropout: float = 0.1,
        attention_dropout: float = 0.0,
        output: str = "concat",
        dropout: float = 0.0,
        l2_weight: float = 0.0,
        use_behavior: bool = False,
    ):
        super().__init__()
        self.config = capture_config(locals())
        if position not in ("time_gap", "index"):
            raise ValueError(f"position must be 'time_gap' or 'index', got {position!r}")
        if output not in ("concat", "mean"):
            raise ValueError(f"output must be 'concat' or 'mean', got {output!r}")
        if position == "time_gap" and n_time_gap_buckets < 1:
            raise ValueError("position='time_gap' needs n_time_gap_buckets >= 1")
        self.position = position
        self.output = output
        self.max_history = max_history
        self.l2_weight = float(l2_weight)  # DIN's mini-batch aware L2 (CTRModel.regularization)
        self.embedding = BehaviorEmbedding(
            n_items, n_categories, embedding_dim, n_behaviors, use_behavior
        )
        position_dim = position_dim or embedding_dim
        # time_gap: ids 1 .. n_time_gap_buckets - 1 for history, n_time_gap_buckets = target.
        # index: 1 = target, 1 + k = k-th most recent behaviour (k = 1 .. max_history).
        rows = n_time_gap_buckets + 1 if position == "time_gap" else max_history + 2
        self.target_position = n_time_gap_buckets if position == "time_gap" else 1
        self.position_embedding = nn.Embedding(rows, position_dim, padding_idx=0)
        # Same scale as the item and category vectors: torch's N(0, 1) default would let the
        # position dominate every token and stall training on a constant prediction.
        nn.init.normal_(self.position_embedding.weight, std=position_dim**-0.5)
        with torch.no_grad():
            self.position_embedding.weight[0].zero_()
        d_model = self.embedding.dim + position_dim
        self.layers = nn.ModuleList(
            TransformerBlock(
                d_model,
                n_heads,
                feedforward_dim or d_model,
                transformer_dropout,
                attention_dropout,
            )
            for _ in range(n_layers)
        )
        width = d_model * (max_history + 1) if output == "concat" else d_model
        self.mlp = MLP(width, mlp_hidden, "leaky_relu", dropout, out_features=1)

    def _positions(self, batch: Batch, mask: Tensor) -> Tensor:
        """History position ids `[B, L]`, 0 on padding."""
        if self.position == "time_gap":
            ids = batch["time_gap"]
        else:
            length = mask.sum(1, keepdim=True)
            ids = length + 1 - torch.arange(mask.shape[1], device=mask.device)
        return ids.masked_fill(~mask, 0)

    def tokens(self, batch: Batch, pad: bool = True) -> tuple[Tensor, Tensor]:
        """-> tokens `[B, S, d]` (target last) and `keep` `[B, S]` (True = real token).

        With `output="concat"` the history is padded to `max_history` (S = M + 1) unless `pad`
        is False (then S = L + 1, see `_concat_logits`).
        """
        mask = batch["mask"]
        batch_size, length = mask.shape
        if length > self.max_history:
            raise ValueError(f"history length {length} exceeds max_history {self.max_history}")
        target_position = torch.full_like(batch["target_item"], self.target_position)
        positions = torch.cat([self._positions(batch, mask), target_position.unsqueeze(1)], 1)
        tables = [
            self.embedding.item_embedding.weight,
            self.embedding.category_embedding.weight,
            self.position_embedding.weight,
        ]
        if self.embedding.behavior_embedding is None and all(map(cpu_kernels.usable, tables)):
            # CPU training: the tokens [history..., target] in one lookup of the three tables
            # (no concatenations; each table's gradient in one pass)
            keep = torch.cat([mask, mask.new_ones(batch_size, 1)], dim=1)
            ids = [
                torch.cat([batch[f"hist_{key}"], batch[f"target_{key}"].unsqueeze(1)], 1)
                for key in ("item", "category")
            ]
            ids = [i.masked_fill(~keep, 0) for i in ids] + [positions]  # padding reads id 0
            if self.output == "concat" and pad:  # history padded to max_history, then target
                ids = [
                    torch.cat([pad_positions(i[:, :-1], self.max_history), i[:, -1:]], 1)
                    for i in ids
                ]
                keep = torch.cat([pad_positions(mask, self.max_history), keep[:, -1:]], 1)
            return cpu_kernels.concat_lookup(tables, ids), keep
        target, history, _ = self.embedding.lookup(batch)  # [B, E], [B, L, E]
        position_vectors = self.position_embedding(positions)  # [B, L + 1, P], one lookup
        history = torch.cat([history, position_vectors[:, :-1]], dim=-1)  # [B, L, d]
        target = torch.cat([target, position_vectors[:, -1]], dim=-1)  # [B, d]
        if self.output == "concat" and pad:  # fixed width for the flattened output
            history, mask = (
                pad_positions(history, self.max_history),
                pad_positions(mask, self.max_history),
            )
        tokens = torch.cat([history, target.unsqueeze(1)], dim=1)
        keep = torch.cat([mask, mask.new_ones(batch_size, 1)], dim=1)
        return tokens, keep

    def attention(self, batch: Batch) -> Tensor:
        """`[B, L]`: the target token's attention over the history (last layer, mean of heads).

        Real positions sum to < 1: the rest of the target's attention is on itself.
        """
        x, keep = self.tokens(batch)
        for layer in self.layers[:-1]:
            x = layer(x, keep)
        weights = self.layers[-1].attention_weights(x, keep)[:, :, -1, :]  # [B, heads, S]
        length = batch["mask"].shape[1]
        return weights.mean(1)[:, :length].float().masked_fill(~batch["mask"], 0.0)

    def forward(self, batch: Batch) -> Tensor:
        """-> logits `[B]`."""
        # Outside export the concat output skips the padding to max_history (same function).
        trim = self.output == "concat" and not torch.onnx.is_in_onnx_export()
        x, keep = self.tokens(batch, pad=not trim)
        for layer in self.layers:
            x = layer(x, keep)
        # padded positions contribute nothing; in place: the last LayerNorm keeps no output
        x = x.masked_fill_(~keep.unsqueeze(-1), 0.0)
        if trim:
            return self._concat_logits(x)
        if self.output == "concat":
            features = x.flatten(1)  # [B, (M + 1) * d]
        else:
            features = x.sum(1) / keep.sum(1, keepdim=True).to(x.dtype)
        return self.mlp(features).squeeze(-1).float()

    def _concat_logits(self, x: Tensor) -> Tensor:
        """The concat output's MLP on encoder outputs `x` `[B, L + 1, d]` not padded to M + 1.

        Padded tokens are masked as keys (they change no real token) and zeroed in the output,
        so they only ever met zeros in the MLP's first Linear: W [x_0 .. x_{L-1}, 0 .., x_t] =
        [W_0 .. W_{L-1}, W_M] [x_0 .. x_{L-1}, x_t]. Encoder and first layer run over L + 1
        tokens instead of M + 1 (with `training.length_window`, L is about the batch's own
        history length).
        """
        first = self.mlp.linears[0]
        length, d_model = x.shape[1] - 1, x.shape[2]
        weight = first.weight.view(first.out_features, self.max_history + 1, d_model)
        if length < self.max_history:
            weight = torch.cat([weight[:, :length], weight[:, -1:]], dim=1)
        hidden = F.linear(x.flatten(1), weight.reshape(first.out_features, -1), first.bias)
        return self.mlp.after_first_linear(hidden).squeeze(-1).float()
