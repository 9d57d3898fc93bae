"""Behaviour embeddings: item ⊕ category, shared by the target and the history."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn


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

    def target(self, batch: Mapping[str, Tensor]) -> Tensor:
        """`[B, E]` target vectors."""
        return self.items(batch["target_item"], batch["target_category"])

    def history(self, batch: Mapping[str, Tensor]) -> Tensor:
        """`[B, L, E]` history vectors; padded positions read as id 0, whatever they hold."""
        return self.lookup(batch)[1]

    def negative_history(self, batch: Mapping[str, Tensor]) -> Tensor:
        """`[B, L, E]` DIEN's sampled negative history; padding and missing negatives (id 0)
        read as id 0."""
        real = batch["mask"] & (batch["neg_item"] != 0)
        return self.items(
            batch["neg_item"].masked_fill(~real, 0), batch["neg_category"].masked_fill(~real, 0)
        )

    def lookup(self, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Target `[B, E]` and history `[B, L, E]` (a request's `[K, E]` and `[1, L, E]`), in
        ONE lookup per table: one gradient per table and step instead of two (on the CPU each is
        a zeroed table-sized tensor)."""
        mask = batch["mask"]
        targets, histories = batch["target_item"], batch["hist_item"].masked_fill(~mask, 0)
        vectors = self.items(
            torch.cat([targets, histories.flatten()]),
            torch.cat(
                [batch["target_category"], batch["hist_category"].masked_fill(~mask, 0).flatten()]
            ),
        )
        target, history = vectors.split([targets.numel(), histories.numel()])
        history = history.view(*histories.shape, self.dim)
        if self.behavior_embedding is not None:
            behavior = batch["hist_behavior"].masked_fill(~mask, 0)
            history = history + self.behavior_embedding(behavior)
        return target, history
