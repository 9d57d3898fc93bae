"""DIEN: Deep Interest Evolution Network.

Paper: Guorui Zhou, Na Mou, Ying Fan, Qi Pi, Weijie Bian, Chang Zhou, Xiaoqiang Zhu, Kun Gai,
"Deep Interest Evolution Network for Click-Through Rate Prediction", AAAI 2019
(arXiv:1809.03672).

1. Interest extractor: an `nn.GRU` over the history vectors, hidden states h_t. It runs over
   the full padded length (histories are left-aligned, so padding only follows the real steps
   and never reaches them); no `pack_padded_sequence`. CPU training runs the same GRU (same
   parameters) through `layers.gated_recurrence` (fused C++ kernels, `cpu_kernels`), several
   times faster than `nn.GRU`'s backward on CPU; GPU training, eval and export use `nn.GRU`.
2. Auxiliary loss (eq. 6), ON by default (`aux_weight` = 1.0): h_t must tell the next clicked
   behaviour e_{t+1} from the sampled negative ê_{t+1} (feature engineering's negative
   history), through a small MLP on [h_t, e] (hidden `aux_hidden` 100-50 as in the authors'
   code, PReLU by default: their sigmoid hidden units, `aux_activation="sigmoid"`, learn far
   slower) with sigmoid cross-entropy, averaged over the valid positions (t + 1 is a real
   behaviour; a missing negative, id 0, drops only its own term).
3. Attention (eq. 5): a_t = softmax over the real t of h_t W e_target (bilinear), 0 on padding.
4. Interest evolving layer: AUGRU (eq. 12-13), u'_t = a_t * u_t,
   h'_t = (1 - u'_t) * h'_{t-1} + u'_t * h~_t, so padded steps (a_t = 0) keep the state and
   the final state is the one after the last real behaviour. The input projections of all
   timesteps are one matmul before the loop; the loop does the hidden matmul and elementwise
   (in training inside `gated_recurrence`: fused kernels on CPU, which project each step's
   input inside the loop, hand-written backpropagation through time elsewhere).
   The AUGRU's own biases (input and hidden) are separate parameters. For ONNX export the
   loop is traced unrolled, so the model pads to `max_history` steps while exporting: the
   exported graph takes any L <= max_history.
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

from attention_ctr.models import cpu_kernels
from attention_ctr.models.layers import (
    MLP,
    AUGRUCell,
    Batch,
    BehaviorEmbedding,
    CTRModel,
    capture_config,
    gated_recurrence,
    gather_positions,
    masked_mean,
    masked_softmax,
    pad_positions,
)


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
    def _extract(self, batch: Batch, negatives: bool = False):
        """-> target `[B, E]`, history `[B, L, E]`, the auxiliary loss's next behaviours (None
        without `negatives`; see `_auxiliary_pairs`), extractor states `[B, L, H]`."""
        pairs = self._auxiliary_pairs(batch) if negatives else None
        at = None if pairs is None else (pairs[0], pairs[1] + 1)  # behaviour t + 1
        target, history, following = self.embedding.lookup(batch, negatives, pairs_at=at)
        states = self._interest_states(history, batch["mask"])
        return target, history, (pairs, following), states

    @staticmethod
    def _auxiliary_pairs(batch: Batch) -> tuple[Tensor, Tensor] | None:
        """(row, t) `[N]` each of the auxiliary terms that count (behaviour t + 1 is real) on
        CPU, where only those are computed: their next behaviours e_{t+1}, ê_{t+1} are looked
        up there, `[2, N, E]`. None elsewhere (or when all count): the dense `[B, L-1]` grid,
        from the negative history `[B, L, E]`, with zero weights on the rest."""
        valid = batch["mask"][:, 1:]
        if valid.device.type != "cpu" or bool(valid.all()):
            return None
        return valid.nonzero(as_tuple=True)

    def _interest_states(self, history: Tensor, mask: Tensor | None = None) -> Tensor:
        """Interest extractor: the GRU's hidden states `[B, L, H]` over the padded history.

        `self.extractor` is an `nn.GRU` (cuDNN on GPU, an ONNX GRU at export). CPU training
        runs the same GRU, with the same parameters, through `gated_recurrence` (fused
        kernels): `nn.GRU` backpropagates on CPU through L x ~10 small autograd ops. Given the
        `mask`, it stops each row at its length: the states on padding then repeat the last
        real one instead of running on over the padding, which nothing downstream reads
        (attention 0, no auxiliary term, the AUGRU stopped there too).
        """
        gru = self.extractor
        if (
            history.device.type == "cpu"
            and self.training
            and torch.is_grad_enabled()
            and not torch.onnx.is_in_onnx_export()
        ):
            weights = (gru.weight_ih_l0, gru.bias_ih_l0, gru.weight_hh_l0, gru.bias_hh_l0)
            lengths = None if mask is None else mask.sum(1)
            return gated_recurrence(history, *weights, lengths=lengths)
        states, _ = gru(history)
        return states

    def _attention(self, states: Tensor, target: Tensor, mask: Tensor) -> Tensor:
        """a_t = masked softmax_t(h_t W e_target) -> `[B, L]`."""
        query = F.linear(target, self.attention_weight)  # W e_target: [B, H]
        scores = cpu_kernels.row_dots(states, query.to(states.dtype))  # h_t . W e_target
        return masked_softmax(scores, mask)

    def _logits(self, mask: Tensor, target: Tensor, history: Tensor, states: Tensor) -> Tensor:
        """Attention, AUGRU, then the MLP on [final state, target, mean history] -> `[B]`."""
        weights = self._attention(states, target, mask)
        if torch.onnx.is_in_onnx_export():
            # Tracing unrolls the AUGRU loop: pad to max_history so the exported graph takes
            # any L <= max_history (padded steps have a_t = 0 and leave the state unchanged).
            states = pad_positions(states, self.max_history)
            weights = pad_positions(weights.unsqueeze(-1), self.max_history).squeeze(-1)
        # AUGRU over the L steps -> [B, H]; training stops each row at its length
        final = self.evolution.sequence(states, weights, mask.sum(1) if self.training else None)
        features = torch.cat([final, target, masked_mean(history, mask)], dim=-1)
        return self.mlp(features).squeeze(-1).float()

    def _auxiliary(self, batch: Batch, history: Tensor, following: tuple, states: Tensor) -> Tensor:
        """aux_weight * mean over valid t of BCE(h_t vs e_{t+1}, 1) + BCE(h_t vs ê_{t+1}, 0).

        Valid t: behaviour t + 1 is real. `following` is `_extract`'s (pairs, vectors): on CPU
        only the valid pairs are computed (their next behaviours looked up at them, the states
        gathered), elsewhere the dense `[B, L-1]` grid with zero weights on the rest.
        """
        pairs, next_vectors = following
        valid = batch["mask"][:, 1:]  # t + 1 is a real behaviour (then so is t)
        valid_negative = valid & (batch["neg_item"][:, 1:] != 0)
        weights = torch.stack([valid, valid_negative]).float()  # [2, B, L-1]
        if pairs is not None:
            row, step = pairs
            state = gather_positions([states], row, step).squeeze(0)  # [N, H] (a view)
            next_behaviours = next_vectors  # [2, N, E]
            weights = weights[:, row, step]  # [2, N]
        else:
            state = states[:, :-1]
            next_behaviours = torch.stack([history[:, 1:], next_vectors[:, 1:]])
        # aux_net on [h_t, e_{t+1}] and [h_t, ê_{t+1}]; its first Linear is split as
        # W [h, e] + b = W_h h + W_e e + b so the h_t part is computed once for both.
        first = self.aux_net.linears[0]
        w_state, w_behaviour = first.weight.split([states.shape[-1], history.shape[-1]], dim=1)
        logits = self.aux_net.after_first_input(
            next_behaviours.reshape(-1, history.shape[-1]),
            w_behaviour,
            shared=state.reshape(-1, state.shape[-1]),  # [rows, H], both halves' h_t
            shared_weight=w_state,
        )
        logits = logits.view(2, *state.shape[:-1]).float()  # [2, ...]
        labels = torch.stack([torch.ones_like(logits[0]), torch.zeros_like(logits[1])])
        losses = F.binary_cross_entropy_with_logits(logits, labels, weights, reduction="sum")
        return self.aux_weight * losses / valid.sum().clamp_min(1)

    # -- public ---------------------------------------------------------------------------
    def attention(self, batch: Batch) -> Tensor:
        """`[B, L]` AUGRU attention a_t (softmax over real positions), exactly 0 on padding."""
        target, _, _, states = self._extract(batch)
        return self._attention(states, target, batch["mask"])

    def forward_with_auxiliary(self, batch: Batch) -> tuple[Tensor, Tensor | None]:
        """-> (logits `[B]`, aux_weight * auxiliary loss, or None when aux_weight == 0)."""
        with_aux = bool(self.aux_weight)
        target, history, following, states = self._extract(batch, negatives=with_aux)
        logits = self._logits(batch["mask"], target, history, states)
        aux = self._auxiliary(batch, history, following, states) if with_aux else None
        return logits, aux

    def auxiliary_loss(self, batch: Batch) -> Tensor | None:
        """aux_weight * auxiliary loss (scalar), None when aux_weight == 0."""
        if not self.aux_weight:
            return None
        _, history, following, states = self._extract(batch, negatives=True)
        return self._auxiliary(batch, history, following, states)

    def forward(self, batch: Batch) -> Tensor:
        """-> logits `[B]` (needs no negative history)."""
        target, history, _, states = self._extract(batch)
        return self._logits(batch["mask"], target, history, states)
