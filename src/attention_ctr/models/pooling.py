"""Pooling baseline: the "Embedding & MLP" base model of the DIN paper.

Paper: Zhou et al., "Deep Interest Network for Click-Through Rate Prediction", KDD 2018
(section 4.2, "Base Model (Embedding & MLP)"). Every history behaviour counts the same: the
history is mean- (or sum-) pooled into one vector whatever the candidate is, the fixed-length
"interest juice" that the attention models improve on. Its top MLP is DIN's, so the only
difference from DIN is the attention.

Shapes (B batch, L history length, E = 2 * embedding_dim):
    batch["target_item"], batch["target_category"]   [B] int64
    batch["hist_item"], batch["hist_category"]        [B, L] int64
    batch["mask"]                                     [B, L] bool
    history vectors [B, L, E] -> pooled [B, E]; target [B, E]
    MLP input [pooled, target, pooled * target] [B, 3E] -> logits [B]
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from attention_ctr.models.attention import weighted_sum
from attention_ctr.models.base import Batch, CTRModel, capture_config
from attention_ctr.models.embedding import BehaviorEmbedding
from attention_ctr.models.mlp import MLP


class PoolingModel(CTRModel):
    """Mean/sum-pooled history ⊕ target ⊕ their product -> MLP -> logit."""

    name = "pooling"

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
        activation: str = "dice",
        dropout: float = 0.0,
        pooling: str = "mean",
        l2_weight: float = 0.0,
        use_behavior: bool = False,
    ):
        super().__init__()
        self.config = capture_config(locals())
        if pooling not in ("mean", "sum"):
            raise ValueError(f"pooling must be 'mean' or 'sum', got {pooling!r}")
        self.pooling = pooling
        self.max_history = max_history
        self.l2_weight = float(l2_weight)  # DIN's mini-batch aware L2 (CTRModel.regularization)
        self.embedding = BehaviorEmbedding(
            n_items, n_categories, embedding_dim, n_behaviors, use_behavior
        )
        dim = self.embedding.dim
        self.mlp = MLP(3 * dim, mlp_hidden, activation, dropout, out_features=1)

    def attention(self, batch: Batch) -> Tensor:
        """`[B, L]` weights: 1 / length (mean) or 1 (sum) on real positions, 0 on padding."""
        weights = batch["mask"].float()
        if self.pooling == "mean":
            weights = weights / weights.sum(1, keepdim=True).clamp_min(1.0)
        return weights

    def forward(self, batch: Batch) -> Tensor:
        """-> logits `[B]`."""
        target, history = self.embedding.lookup(batch)  # [B, E], [B, L, E]
        pooled = weighted_sum(self.attention(batch), history)  # [B, E]
        features = torch.cat([pooled, target, pooled * target], dim=-1)
        return self.mlp(features).squeeze(-1).float()
