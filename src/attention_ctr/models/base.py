"""What every CTR model shares: the batch format, the config it is rebuilt from, DIN's
mini-batch aware L2, and the request-time forward a server runs.

Conventions used everywhere:

- ids are int64, 0 is padding / unknown; histories are `[B, L]`, left-aligned (positions
  `0 .. len-1` real, padding after), with a bool `mask` `[B, L]` (True = real behaviour);
- a behaviour vector is item embedding ⊕ category embedding, `E = 2 * embedding_dim` wide;
- padded positions are excluded by the mask everywhere (attention weights, batch statistics,
  pooling, losses), never only by `padding_idx=0` embeddings being zero.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from attention_ctr.models.embedding import BehaviorEmbedding

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


def pad_positions(x: Tensor, length: int) -> Tensor:
    """Zero-pad (False for bool) dim 1 of `x` `[B, L, ...]` up to `length`.

    No Python branch on L: traced for ONNX, the padding width stays a function of the input's
    shape (an empty block when L == length).
    """
    padding = x.new_zeros((x.shape[0], length - x.shape[1], *x.shape[2:]))
    return torch.cat([x, padding], dim=1)


def minibatch_aware_l2(table: nn.Embedding, ids: Tensor, frequency: Tensor) -> Tensor:
    """DIN's mini-batch aware L2 (sec. 5.1): sum over ids j in the batch of ||w_j||^2 / n_j.

    Only rows of `table` that appear in `ids` (any shape; 0 = padding is skipped) are
    regularised, each once however often it appears, scaled by 1 / its frequency `n_j`
    (`frequency[j]`, e.g. training occurrences; clamped to >= 1). The rows are looked up
    through the table, so its gradient stays sparse when the table's is.
    """
    present = torch.unique(ids.reshape(-1))
    present = present[present != 0]
    frequency = torch.as_tensor(frequency, device=table.weight.device)
    rows = table(present)
    scale = frequency[present.to(frequency.device)].to(rows.dtype).clamp_min(1.0)
    return (rows.square().sum(-1) / scale).sum()


class CTRModel(nn.Module):
    """What every model offers beyond `forward(batch) -> logits [B]`.

    `score_request(batch)` (one user's history against K candidates, what a server runs),
    `attention(batch) -> [B, L]`, `auxiliary_loss`, `forward_with_auxiliary`, `regularization`,
    `item_embedding` / `category_embedding` (the shared tables), and `config` (the constructor
    arguments: `type(model)(**model.config)` rebuilds the architecture).
    """

    name: str = ""
    config: dict
    embedding: BehaviorEmbedding
    l2_weight: float = 0.0
    max_history: int

    @property
    def item_embedding(self) -> nn.Embedding:
        return self.embedding.item_embedding

    @property
    def category_embedding(self) -> nn.Embedding:
        return self.embedding.category_embedding

    def attention(self, batch: Batch) -> Tensor:
        raise NotImplementedError

    def score_request(self, batch: Batch) -> Tensor:
        """One request: a history `[1, L]` against K candidates (`target_*` `[K]`) -> `[K]`.

        The same function as `forward` on the history repeated K times. Models override it to
        compute what depends on the history alone once per request instead of K times.
        """
        candidates = batch["target_item"].shape[0]
        return self(
            {
                key: value.expand(candidates, -1) if value.dim() == 2 else value
                for key, value in batch.items()
            }
        )

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
        if not self.l2_weight:
            return self.item_embedding.weight.new_zeros(())
        padding = ~batch["mask"]
        items = torch.cat(
            [batch["target_item"], batch["hist_item"].masked_fill(padding, 0).flatten()]
        )
        term = minibatch_aware_l2(self.item_embedding, items, item_frequency)
        if category_frequency is not None:
            categories = torch.cat(
                [batch["target_category"], batch["hist_category"].masked_fill(padding, 0).flatten()]
            )
            term = term + minibatch_aware_l2(
                self.category_embedding, categories, category_frequency
            )
        return self.l2_weight * term
