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
`scaled_dot_product_attention` (padded keys masked with an additive `finfo.min` mask, never
-inf; the target token is never masked, so no row is fully masked), 4 heads by default (the
paper uses 8; with d = 96 that is 12 dims a head, slower on CPU for no measured gain), dropout
0.1 on both residual branches and inside the feed-forward (`attention_dropout` on the
attention probabilities is an option, off by default), LayerNorm eps 1e-5, a LeakyReLU
feed-forward of width `feedforward_dim` (the paper gives none; default d: the usual 4 d makes
training much slower on CPU). Output (paper): the outputs of all positions concatenated
(`output="concat"`: a fixed width of `max_history + 1` tokens, padded positions zeroed);
`output="mean"` averages the real positions instead. Then an MLP with LeakyReLU.

Shapes (B batch, L history length <= max_history, M = max_history, E = 2 * embedding_dim,
P = position_dim, d = E + P):
    batch["target_item"], batch["target_category"]   [B] int64
    batch["hist_item"], batch["hist_category"]        [B, L] int64
    batch["time_gap"]                                 [B, L] int64 (position="time_gap")
    batch["mask"]                                     [B, L] bool
    tokens [B, L + 1, d], target last
    encoder output [B, L + 1, d] -> [B, (M + 1) * d] (concat: history padded to M) or [B, d]
    (mean) -> MLP -> logits [B]
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attention_ctr.models import ops
from attention_ctr.models.base import Batch, CTRModel, capture_config, pad_positions
from attention_ctr.models.embedding import BehaviorEmbedding
from attention_ctr.models.mlp import MLP

LEAKY_SLOPE = 0.01  # the feed-forward's LeakyReLU (torch's default slope)


def padding_bias(keep: Tensor, dtype: torch.dtype) -> Tensor:
    """`[B, S]` bool (True = attend) -> additive mask `[B, 1, 1, S]`: 0 or finfo(dtype).min."""
    bias = torch.zeros(keep.shape, dtype=dtype, device=keep.device)
    return bias.masked_fill(~keep, torch.finfo(dtype).min)[:, None, None, :]


class TransformerBlock(nn.Module):
    """Post-LN Transformer encoder layer on `scaled_dot_product_attention`.

    S' = LayerNorm(S + Dropout(MultiHead(S))); F = LayerNorm(S' + Dropout(FFN(S'))), with
    FFN(x) = W2 Dropout(LeakyReLU(W1 x)). `forward(x [B, S, d], keep [B, S]) -> [B, S, d]`.
    `attention_dropout` (on the attention probabilities, as `nn.MultiheadAttention` does) is
    separate and 0 by default.
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
        return torch.softmax(scores + padding_bias(keep, scores.dtype), dim=-1)

    def forward(self, x: Tensor, keep: Tensor, qkv: Tensor | None = None) -> Tensor:
        """`qkv`: the query/key/value projection of `x`, when the caller has it already."""
        q, k, v = self._heads(self.qkv(x) if qkv is None else qkv)
        # Attention in float32 even under bf16 autocast (the CPU's bf16 SDPA is slower)
        with torch.autocast(x.device.type, enabled=False):
            dtype = torch.promote_types(q.dtype, torch.float32)
            attended = F.scaled_dot_product_attention(
                q.to(dtype),
                k.to(dtype),
                v.to(dtype),
                attn_mask=padding_bias(keep, dtype),
                dropout_p=self.attention_dropout if self.training else 0.0,
            )  # [B, heads, S, d / heads]
        attended = attended.transpose(1, 2).reshape(x.shape[:-1] + (-1,))
        p, training = self.dropout_p, self.training
        x = self.norm1(x + ops.dropout(self.out(attended), p, training))
        hidden = ops.dropout(F.leaky_relu(self.feedforward1(x), LEAKY_SLOPE), p, training)
        return self.norm2(x + ops.dropout(self.feedforward2(hidden), p, training))


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

    def history_tokens(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """The history's tokens `[B, L, d]` and `keep` `[B, L]` (True = real)."""
        mask = batch["mask"]
        if mask.shape[1] > self.max_history:
            raise ValueError(
                f"history length {mask.shape[1]} exceeds max_history {self.max_history}"
            )
        history = self.embedding.history(batch)  # [B, L, E]
        positions = self.position_embedding(self._positions(batch, mask))  # [B, L, P]
        return torch.cat([history, positions], dim=-1), mask

    def target_tokens(self, batch: Batch) -> Tensor:
        """The candidates' tokens `[B, 1, d]`, at the target's own position id."""
        position = torch.full_like(batch["target_item"], self.target_position)
        target = [self.embedding.target(batch), self.position_embedding(position)]
        return torch.cat(target, dim=-1).unsqueeze(1)

    def tokens(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """-> tokens `[B, S, d]` (history, then the target last) and `keep` `[B, S]`."""
        history, keep = self.history_tokens(batch)
        tokens = torch.cat([history, self.target_tokens(batch)], dim=1)
        return tokens, torch.cat([keep, keep.new_ones(keep.shape[0], 1)], dim=1)

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
        x, keep = self.tokens(batch)
        for layer in self.layers:
            x = layer(x, keep)
        return self._head(x, keep)

    def score_request(self, batch: Batch) -> Tensor:
        """One history `[1, L]` against K candidates -> logits `[K]`: the history's tokens and
        their query/key/value projection in the first layer once, the rest per candidate (every
        token attends to the candidate's target token)."""
        history, keep = self.history_tokens(batch)  # [1, L, d], [1, L]
        target = self.target_tokens(batch)  # [K, 1, d]
        candidates = target.shape[0]
        first = self.layers[0]
        qkv = torch.cat([first.qkv(history).expand(candidates, -1, -1), first.qkv(target)], 1)
        x = torch.cat([history.expand(candidates, -1, -1), target], dim=1)  # [K, S, d]
        keep = torch.cat([keep.expand(candidates, -1), keep.new_ones(candidates, 1)], dim=1)
        x = first(x, keep, qkv)
        for layer in self.layers[1:]:
            x = layer(x, keep)
        return self._head(x, keep)

    def _head(self, x: Tensor, keep: Tensor) -> Tensor:
        """The encoder's output `[B, L + 1, d]` -> logits `[B]` (padded positions contribute 0).

        The concat output has the fixed width of `max_history + 1` tokens: the history's
        outputs are padded with zeros up to `max_history` here, after the encoder (padded tokens
        are masked keys and zeroed outputs, so encoding them would change nothing).
        """
        x = x.masked_fill(~keep.unsqueeze(-1), 0.0)
        if self.output == "concat":
            history = pad_positions(x[:, :-1], self.max_history)
            features = torch.cat([history, x[:, -1:]], dim=1).flatten(1)  # [B, (M + 1) * d]
        else:
            features = x.sum(1) / keep.sum(1, keepdim=True).to(x.dtype)
        return self.mlp(features).squeeze(-1).float()
