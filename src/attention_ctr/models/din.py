"""DIN: Deep Interest Network.

Paper: Guorui Zhou, Xiaoqiang Zhu, Chenru Song, Ying Fan, Han Zhu, Xiao Ma, Yanghui Yan,
Junqi Jin, Han Li, Kun Gai, "Deep Interest Network for Click-Through Rate Prediction",
KDD 2018 (arXiv:1706.06978).

The user's interest is a weighted sum of the history vectors, the weight of each behaviour
computed against the candidate by the local activation unit from
`[h, t, h - t, h * t]` (MLP 80-40, Dice or PReLU, Linear to 1). As in the paper the weights are
NOT softmax-normalised by default (the sum keeps the intensity of interest); padding always
gets exactly zero weight. Dice and the mini-batch aware L2 regulariser (`regularization`,
weight `l2_weight`, off by default) are the paper's training techniques.

The unit's first Linear is computed without building its 4E-wide input (an exact identity,
`DINAttention.first_layer`), which also lets a request compute the history's own term once
for all its candidates (`score_request`).

Shapes (B batch, L history length, E = 2 * embedding_dim):
    batch["target_item"], batch["target_category"]   [B] int64
    batch["hist_item"], batch["hist_category"]        [B, L] int64
    batch["mask"]                                     [B, L] bool
    history h [B, L, E], target t [B, E] -> unit input [B, L, 4E] -> weights [B, L]
    interest = sum_j w_j h_j [B, E]
    MLP input [interest, t, interest * t (, masked mean of h)] [B, 3E or 4E] -> logits [B]
    (the product is on by default, `interest_product`: the authors' released code has it, and
    so does the pooling baseline, so attention is the only difference between the two)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from attention_ctr.models.attention import DINAttention, masked_mean
from attention_ctr.models.base import Batch, CTRModel, capture_config
from attention_ctr.models.embedding import BehaviorEmbedding
from attention_ctr.models.mlp import MLP


class DIN(CTRModel):
    """Deep Interest Network: target-aware weighted sum pooling of the history -> MLP."""

    name = "din"

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
        attention_hidden: Sequence[int] = (80, 40),
        activation: str = "dice",
        normalization: str = "none",
        dropout: float = 0.0,
        l2_weight: float = 0.0,
        use_pooled_history: bool = False,
        interest_product: bool = True,
        use_behavior: bool = False,
    ):
        super().__init__()
        self.config = capture_config(locals())
        self.max_history = max_history
        self.l2_weight = float(l2_weight)
        self.use_pooled_history = use_pooled_history
        self.interest_product = interest_product
        self.embedding = BehaviorEmbedding(
            n_items, n_categories, embedding_dim, n_behaviors, use_behavior
        )
        dim = self.embedding.dim
        self.activation_unit = DINAttention(dim, attention_hidden, activation, normalization)
        width = (2 + interest_product + use_pooled_history) * dim
        self.mlp = MLP(width, mlp_hidden, activation, dropout, out_features=1)

    def attention(self, batch: Batch) -> Tensor:
        """`[B, L]` activation weights (raw scores, or softmax), exactly 0 on padding."""
        target, history = self.embedding.lookup(batch)
        return self.activation_unit.weights(history, target, batch["mask"])

    def forward(self, batch: Batch) -> Tensor:
        """-> logits `[B]`."""
        target, history = self.embedding.lookup(batch)  # [B, E], [B, L, E]
        return self._logits(history, target, batch["mask"])

    def score_request(self, batch: Batch) -> Tensor:
        """One history `[1, L]` against K candidates -> logits `[K]`: the history's lookup and
        its own term of the activation unit's first layer once, the rest per candidate."""
        target, history = self.embedding.lookup(batch)  # [K, E], [1, L, E]
        return self._logits(history, target, batch["mask"])

    def _logits(self, history: Tensor, target: Tensor, mask: Tensor) -> Tensor:
        interest, _ = self.activation_unit(history, target, mask)  # [B, E]
        pooled = None
        if self.use_pooled_history:
            pooled = masked_mean(history, mask).expand(target.shape[0], -1)
        return self.head(interest, target, pooled)

    def head(self, interest: Tensor, target: Tensor, pooled: Tensor | None = None) -> Tensor:
        """MLP on [interest, target, interest * target (option), pooled history (option)]
        -> logits `[B]`. The product is the authors' released code's (zhougr1993/
        DeepInterestNetwork, din/model.py), as in the pooling baseline."""
        features = [interest, target]
        if self.interest_product:
            features.append(interest * target)
        if pooled is not None:
            features.append(pooled)
        return self.mlp(torch.cat(features, dim=-1)).squeeze(-1).float()
