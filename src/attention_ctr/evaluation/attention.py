"""How a model spreads attention over the history: by recency, by category, per user.

Weights are compared as shares of the history's total absolute weight (DIN's raw scores are
unnormalised and may be negative), and as relative weight = share * history length, where 1
is what uniform pooling gives every behaviour.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from torch import nn

from attention_ctr.evaluation import ATTENTION_TYPES, WITHOUT_ATTENTION
from attention_ctr.evaluation.ids import decoder, plain
from attention_ctr.evaluation.metrics import finite_or_none
from attention_ctr.sequences import SampleTensors


def _pad_columns(values: np.ndarray, width: int, fill: float | bool) -> np.ndarray:
    padded = np.full((values.shape[0], width), fill, dtype=values.dtype)
    padded[:, : values.shape[1]] = values
    return padded


@torch.no_grad()
def attention_arrays(
    model: nn.Module, tensors: SampleTensors, batch_size: int, width: int
) -> dict[str, np.ndarray]:
    """Attention `[N, width]` over each sample's history, with mask and same-category flags."""
    model.eval()
    parts: dict[str, list[np.ndarray]] = {"weight": [], "mask": [], "same_category": []}
    for batch, _ in tensors.batches(batch_size):
        mask = batch["mask"]
        same = (batch["hist_category"] == batch["target_category"][:, None]) & mask
        parts["weight"].append(_pad_columns(model.attention(batch).float().cpu().numpy(), width, 0))
        parts["mask"].append(_pad_columns(mask.cpu().numpy(), width, False))
        parts["same_category"].append(_pad_columns(same.cpu().numpy(), width, False))
    return {key: np.concatenate(value) for key, value in parts.items()}


def _mean_or_none(values: np.ndarray) -> float | None:
    return finite_or_none(float(values.mean())) if values.size else None


def attention_profile(
    name: str,
    arrays: dict[str, np.ndarray],
    users: np.ndarray,
    user_ids: pd.DataFrame,
    heatmap_users: int,
) -> dict:
    """Model `name`'s profile from its `attention_arrays` over samples of `users` (encoded; the
    heat map names them by raw id): `heatmap_users` rows of the longest histories."""
    width = arrays["weight"].shape[1]
    magnitude = np.abs(arrays["weight"]) * arrays["mask"]
    total = magnitude.sum(1)
    usable = total > 0  # an all-zero row has no distribution to report
    mask, same = arrays["mask"][usable], arrays["same_category"][usable]
    length = mask.sum(1)
    share = magnitude[usable] / total[usable, None]
    relative = share * length[:, None]
    other = mask & ~same
    mixed = same.any(1) & other.any(1)  # histories holding both kinds of behaviour

    # back[i, p]: how many behaviours position p lies before sample i's target (0 = latest).
    back = length[:, None] - 1 - np.arange(width)[None, :]
    counts = np.bincount(back[mask], minlength=width)
    sums = np.bincount(back[mask], weights=relative[mask], minlength=width)
    recency = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)

    # Heat map rows: the longest histories; column j holds the behaviour j before the target.
    chosen = np.argsort(-length, kind="stable")[:heatmap_users]
    position = back[chosen]  # the same formula maps "j back" to its position
    real = position >= 0
    position = np.clip(position, 0, None)
    heat = np.where(real, np.take_along_axis(share[chosen], position, 1), np.nan)
    heat_same = real & np.take_along_axis(same[chosen], position, 1)
    raw_user = decoder(user_ids, "user")
    heat_users = np.asarray(users)[usable][chosen]
    return {
        "model": name,
        "attention": ATTENTION_TYPES.get(name, "unknown"),
        "has_attention": name not in WITHOUT_ATTENTION,
        "samples": int(usable.sum()),
        "recency_relative_weight": [finite_or_none(value) for value in recency],
        "recency_samples": counts.tolist(),
        "same_category_relative_weight": _mean_or_none(relative[same]),
        "other_category_relative_weight": _mean_or_none(relative[other]),
        "same_category_attention_share": _mean_or_none((share * same).sum(1)[mixed]),
        "same_category_history_share": _mean_or_none((same.sum(1) / length)[mixed]),
        "heatmap": {
            "users": [plain(raw_user[user]) for user in heat_users],
            "share": [[finite_or_none(value) for value in row] for row in heat],
            "same_category": heat_same.tolist(),
        },
    }


def report_attention_distribution(**attention_profiles: dict) -> dict:
    """Every model's attention distribution (recency, same category vs other) as one report."""
    return {
        name: {key: value for key, value in profile.items() if key != "heatmap"}
        for name, profile in attention_profiles.items()
    }
