"""DIEN: Deep Interest Evolution Network.

Paper: Guorui Zhou, Na Mou, Ying Fan, Qi Pi, Weijie Bian, Chang Zhou, Xiaoqiang Zhu, Kun Gai,
"Deep Interest Evolution Network for Click-Through Rate Prediction", AAAI 2019
(arXiv:1809.03672).

1. Interest extractor: an `nn.GRU` over the history vectors, hidden states h_t. It runs over
   the full padded length (histories are left-aligned, so padding only follows the real steps
   and never reaches them); no `pack_padded_sequence`.
2. Auxiliary loss (eq. 6), ON by default (`aux_weight` = 1.0): h_t must tell the next clicked
   behaviour e_{t+1} from the sampled negative ê_{t+1} (feature engineering's negative
   history), through a small MLP on [h_t, e] (hidden `aux_hidden` 100-50 as in the authors'
   code, PReLU by default: their sigmoid hidden units, `aux_activation="sigmoid"`, learn far
   slower) with sigmoid cross-entropy, averaged over the valid positions (t + 1 is a real
   behaviour; a missing negative, id 0, drops only its own term).
3. Attention (eq. 5): a_t = softmax over the real t of h_t W e_target (bilinear), 0 on padding.
4. Interest evolving layer: AUGRU (eq. 12-13), u'_t = a_t * u_t,
   h'_t = (1 - u'_t) * h'_{t-1} + u'_t * h~_t, so padded steps (a_t = 0) keep the state and
   the final state is the one after the last real behaviour. The AUGRU's own biases (input
   and hidden) are separate parameters.
5. Output: MLP on [h'_final, e_target, masked mean of the history vectors].

Shapes (B batch, L history length, E = 2 * embedding_dim, H = hidden_size, default E):
    batch["target_item"], batch["target_category"]   [B] int64
    batch["hist_item"], batch["hist_category"]        [B, L] int64
    batch["neg_item"], batch["neg_category"]          [B, L] int64 (auxiliary loss only)
    batch["mask"]                                     [B, L] bool
    history e [B, L, E] -> extractor states h [B, L, H] -> attention a [B, L]
    AUGRU final state [B, H]; MLP input [B, H + 2E] -> logits [B]
    auxiliary loss: scalar, already multiplied by aux_weight
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attention_ctr.models import ops
from attention_ctr.models.attention import masked_mean, masked_softmax
from attention_ctr.models.base import Batch, CTRModel, capture_config
from attention_ctr.models.embedding import BehaviorEmbedding
from attention_ctr.models.mlp import MLP
from attention_ctr.models.recurrence import AUGRUCell


class DIEN(CTRModel):
    """Interest extractor GRU + auxiliary loss, bilinear attention, AUGRU evolution -> MLP."""

    name = "dien"

    def __init__(
        self,
        *,
        n_items: int,
        n_categories: int,
        n_behaviors: int = 0,
        n_time_gap_buckets: int = 0,
        max_history: int = 50,
        embedding_dim: int = 32,
        hidden_size: int | None = None,
        mlp_hidden: Sequence[int] = (200, 80),
        aux_hidden: Sequence[int] = (100, 50),
        aux_weight: float = 1.0,
        aux_activation: str = "prelu",
        activation: str = "dice",
        dropout: float = 0.0,
        l2_weight: float = 0.0,
        use_behavior: bool = False,
    ):
        super().__init__()
        self.config = capture_config(locals())
        if aux_weight < 0:
            raise ValueError(f"aux_weight must be >= 0 (paper: > 0), got {aux_weight}")
        self.max_history = max_history
        self.l2_weight = float(l2_weight)  # DIN's mini-batch aware L2 (CTRModel.regularization)
        self.aux_weight = float(aux_weight)
        self.embedding = BehaviorEmbedding(
            n_items, n_categories, embedding_dim, n_behaviors, use_behavior
        )
        dim = self.embedding.dim
        hidden = hidden_size or dim
        self.extractor = nn.GRU(dim, hidden, batch_first=True)
        self.aux_net = MLP(hidden + dim, aux_hidden, aux_activation, out_features=1)
        self.attention_weight = nn.Parameter(torch.empty(hidden, dim))  # W of h_t W e_target
        nn.init.xavier_uniform_(self.attention_weight)
        self.evolution = AUGRUCell(hidden, hidden)
        self.mlp = MLP(hidden + 2 * dim, mlp_hidden, activation, dropout, out_features=1)

    # -- pieces ---------------------------------------------------------------------------
    def interest_states(self, history: Tensor, mask: Tensor) -> Tensor:
        """Interest extractor: the GRU's hidden states `[B, L, H]` over the padded history."""
        return ops.gru_states(self.extractor, history, mask)

    def _attention(self, states: Tensor, target: Tensor, mask: Tensor) -> Tensor:
        """a_t = masked softmax_t(h_t W e_target) -> `[B, L]` (`states` `[B or 1, L, H]`)."""
        query = F.linear(target, self.attention_weight)  # W e_target: [B, H]
        scores = torch.matmul(states, query.unsqueeze(-1).to(states.dtype)).squeeze(-1)
        return masked_softmax(scores, mask)

    def _logits(self, target: Tensor, history: Tensor, states: Tensor, mask: Tensor) -> Tensor:
        """Attention, AUGRU, then the MLP on [final state, target, mean history] -> `[B]`."""
        weights = self._attention(states, target, mask)
        final = ops.augru_final_state(self.evolution, states, weights)  # [B, H]
        pooled = masked_mean(history, mask).expand(target.shape[0], -1)
        return self.mlp(torch.cat([final, target, pooled], dim=-1)).squeeze(-1).float()

    def _auxiliary(self, batch: Batch, history: Tensor, states: Tensor) -> Tensor:
        """aux_weight * mean over valid t of BCE(h_t vs e_{t+1}, 1) + BCE(h_t vs ê_{t+1}, 0).

        Valid t: behaviour t + 1 is real (a missing negative, id 0, drops only its own term).
        """
        valid = batch["mask"][:, 1:]  # t + 1 is a real behaviour (then so is t)
        valid_negative = valid & (batch["neg_item"][:, 1:] != 0)
        negative = self.embedding.negative_history(batch)
        state = states[:, :-1].unsqueeze(0).expand(2, -1, -1, -1)  # h_t, twice
        following = torch.stack([history[:, 1:], negative[:, 1:]])  # e_{t+1}, ê_{t+1}
        logits = self.aux_net(torch.cat([state, following], dim=-1)).squeeze(-1).float()
        labels = torch.stack([torch.ones_like(logits[0]), torch.zeros_like(logits[1])])
        weights = torch.stack([valid, valid_negative]).float()  # [2, B, L-1]
        losses = F.binary_cross_entropy_with_logits(logits, labels, weights, reduction="sum")
        return self.aux_weight * losses / valid.sum().clamp_min(1)

    # -- public ---------------------------------------------------------------------------
    def attention(self, batch: Batch) -> Tensor:
        """`[B, L]` AUGRU attention a_t (softmax over real positions), exactly 0 on padding."""
        target, history = self.embedding.lookup(batch)
        states = self.interest_states(history, batch["mask"])
        return self._attention(states, target, batch["mask"])

    def forward_with_auxiliary(self, batch: Batch) -> tuple[Tensor, Tensor | None]:
        """-> (logits `[B]`, aux_weight * auxiliary loss, or None when aux_weight == 0)."""
        target, history = self.embedding.lookup(batch)
        states = self.interest_states(history, batch["mask"])
        logits = self._logits(target, history, states, batch["mask"])
        aux = self._auxiliary(batch, history, states) if self.aux_weight else None
        return logits, aux

    def auxiliary_loss(self, batch: Batch) -> Tensor | None:
        """aux_weight * auxiliary loss (scalar), None when aux_weight == 0."""
        if not self.aux_weight:
            return None
        history = self.embedding.history(batch)
        return self._auxiliary(batch, history, self.interest_states(history, batch["mask"]))

    def forward(self, batch: Batch) -> Tensor:
        """-> logits `[B]` (needs no negative history)."""
        target, history = self.embedding.lookup(batch)
        states = self.interest_states(history, batch["mask"])
        return self._logits(target, history, states, batch["mask"])

    def score_request(self, batch: Batch) -> Tensor:
        """One history `[1, L]` against K candidates -> logits `[K]`: the history's lookup and
        the interest extractor once, attention and the AUGRU per candidate."""
        target, history = self.embedding.lookup(batch)  # [K, E], [1, L, E]
        states = self.interest_states(history, batch["mask"])  # [1, L, H]
        return self._logits(target, history, states, batch["mask"])
