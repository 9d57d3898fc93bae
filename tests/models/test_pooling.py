"""Pooling baseline: every behaviour weighs the same, whatever the target."""

from __future__ import annotations

import pytest
import torch
from model_sizes import SIZES

from attention_ctr.models import PoolingModel, random_batch

SMALL = {
    **SIZES,
}


def make(**overrides) -> PoolingModel:
    torch.manual_seed(0)
    return PoolingModel(**{**SMALL, **overrides})


def batch(batch_size: int = 5) -> dict:
    return random_batch(batch_size, 6, **SMALL, seed=1)


def test_mean_weights_are_uniform_over_real_positions():
    model = make().eval()
    b = batch()
    weights = model.attention(b)
    lengths = b["mask"].sum(1, keepdim=True).float()
    torch.testing.assert_close(weights, b["mask"].float() / lengths)
    torch.testing.assert_close(weights.sum(1), torch.ones(5))


def test_sum_weights_are_one_per_real_position():
    model = make(pooling="sum").eval()
    b = batch()
    assert torch.equal(model.attention(b), b["mask"].float())


def test_weights_do_not_depend_on_the_target():
    model = make().eval()
    b = batch()
    other = dict(b, target_item=b["target_item"] % 39 + 1)
    assert torch.equal(model.attention(b), model.attention(other))
    assert not torch.allclose(model(b), model(other))  # the target still enters the MLP


def test_mlp_sees_pooled_history_target_and_product():
    model = make().eval()
    b = batch()
    seen = []
    model.mlp.linears[0].register_forward_hook(lambda m, inputs, out: seen.append(inputs[0]))
    model(b)
    history = model.embedding.history(b)
    pooled = (history * b["mask"][..., None]).sum(1) / b["mask"].sum(1, keepdim=True)
    target = model.embedding.target(b)
    torch.testing.assert_close(seen[0], torch.cat([pooled, target, pooled * target], -1))


def test_unknown_pooling_is_rejected():
    with pytest.raises(ValueError, match="pooling"):
        make(pooling="max")
