"""CTR models: pooling baseline, DIN, DIEN, BST (plain `torch.nn.Module`s, no Kedro).

Every model takes keyword-only, JSON-serialisable constructor arguments (`model.config` holds
them, so `build_model(model.name, **model.config)` rebuilds the architecture) and a batch dict
of tensors (see `base.py` for the conventions), and offers:

- `forward(batch) -> logits [B]` (no sigmoid),
- `score_request(batch) -> logits [K]`: one history `[1, L]` against K candidates, the
  history-only work done once (what the exported request graph runs),
- `forward_with_auxiliary(batch) -> (logits [B], auxiliary loss or None)` (DIEN's loss, already
  weighted by `aux_weight`; None for the other models),
- `auxiliary_loss(batch)`, `attention(batch) -> [B, L]` (exactly 0 on padding),
- `regularization(batch, item_frequency, category_frequency=None)` (DIN's mini-batch aware L2,
  a zero scalar when `l2_weight` is 0),
- `item_embedding`, `category_embedding` (the shared `nn.Embedding` tables, row 0 = padding).
"""

from __future__ import annotations

import hashlib

import torch

from attention_ctr.models.base import FEATURE_KEYS, CTRModel
from attention_ctr.models.bst import BST
from attention_ctr.models.dien import DIEN
from attention_ctr.models.din import DIN
from attention_ctr.models.pooling import PoolingModel

MODELS: dict[str, type[CTRModel]] = {
    "pooling": PoolingModel,
    "din": DIN,
    "dien": DIEN,
    "bst": BST,
}


def build_model(name: str, **config) -> CTRModel:
    """The model registered as `name`, built from keyword arguments."""
    try:
        cls = MODELS[name]
    except KeyError:
        raise ValueError(f"Unknown model {name!r}; expected one of {sorted(MODELS)}") from None
    return cls(**config)


def fingerprint(model: torch.nn.Module) -> str:
    """sha256 of the model's name, config and weights: which trained model a report is about."""
    digest = hashlib.sha256(repr((model.name, sorted(model.config.items()))).encode())
    for key, tensor in sorted(model.state_dict().items()):
        digest.update(key.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def random_batch(
    batch_size: int,
    length: int,
    *,
    n_items: int,
    n_categories: int,
    n_behaviors: int = 4,
    n_time_gap_buckets: int = 10,
    seed: int = 0,
    device: str | torch.device = "cpu",
    **_: object,
) -> dict[str, torch.Tensor]:
    """A random batch in the models' format (dummy inputs for export, benchmarks and tests).

    Histories are left-aligned with random lengths in 1 .. `length` (row 0 always full, the last
    row length 1 when `batch_size` > 1); padded positions hold 0. Extra keyword arguments (the
    rest of a model config) are ignored, so `random_batch(B, L, **model.config)` works.
    """
    generator = torch.Generator().manual_seed(seed)

    def ids(high: int, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.randint(1, max(high, 1) + 1, shape, generator=generator)

    lengths = torch.randint(1, length + 1, (batch_size,), generator=generator)
    lengths[0] = length
    if batch_size > 1:
        lengths[-1] = 1
    mask = torch.arange(length)[None, :] < lengths[:, None]
    shape = (batch_size, length)
    batch = {
        "target_item": ids(n_items, (batch_size,)),
        "target_category": ids(n_categories, (batch_size,)),
        "hist_item": ids(n_items, shape) * mask,
        "hist_category": ids(n_categories, shape) * mask,
        "hist_behavior": ids(n_behaviors, shape) * mask,
        "time_gap": ids(max(n_time_gap_buckets - 1, 1), shape) * mask,
        "neg_item": ids(n_items, shape) * mask,
        "neg_category": ids(n_categories, shape) * mask,
        "mask": mask,
    }
    return {name: value.to(device) for name, value in batch.items()}


__all__ = [
    "BST",
    "DIEN",
    "DIN",
    "FEATURE_KEYS",
    "MODELS",
    "CTRModel",
    "PoolingModel",
    "build_model",
    "random_batch",
]
