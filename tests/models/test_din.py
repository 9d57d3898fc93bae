"""DIN: the activation unit's input, unnormalised weights, Dice/PReLU, mini-batch aware L2."""

from __future__ import annotations

import pytest
import torch
from model_sizes import SIZES

from attention_ctr.models import DIN, random_batch
from attention_ctr.models.activations import Dice, PReLU
from attention_ctr.models.base import minibatch_aware_l2

SMALL = {
    **SIZES,
    "attention_hidden": [8, 4],
}


def make(**overrides) -> DIN:
    torch.manual_seed(0)
    return DIN(**{**SMALL, **overrides})


def batch(batch_size: int = 5, seed: int = 1) -> dict:
    return random_batch(batch_size, SMALL["max_history"], **SMALL, seed=seed)


def test_defaults_follow_the_paper():
    model = DIN(n_items=10, n_categories=3, n_behaviors=2, n_time_gap_buckets=4, max_history=5)
    unit = model.activation_unit
    assert unit.normalization == "none"
    assert [layer.out_features for layer in unit.unit.linears] == [80, 40]
    assert unit.unit.output.out_features == 1
    assert unit.unit.linears[0].in_features == 4 * 2 * 32  # [h, t, h - t, h * t], h = item ⊕ cat
    assert all(isinstance(a, Dice) for a in unit.unit.activations)
    assert all(isinstance(a, Dice) for a in model.mlp.activations)
    assert model.l2_weight == 0.0


@pytest.mark.parametrize("train", [False, True])
def test_unit_scores_history_target_difference_product(train):
    """The weights are the unit's MLP applied to [h, t, h - t, h * t] built by hand."""
    model = make().train(train)
    b = batch()
    mask = b["mask"]
    item, category = model.item_embedding, model.category_embedding
    h = torch.cat([item(b["hist_item"]), category(b["hist_category"])], -1)
    t = torch.cat([item(b["target_item"]), category(b["target_category"])], -1)
    t = t[:, None, :].expand_as(h)
    by_hand = torch.cat([h, t, h - t, h * t], dim=-1)  # [B, L, 4E]
    unit = model.activation_unit.unit
    assert unit.linears[0].in_features == by_hand.shape[-1] == 64
    reference = make().train(train)
    reference.load_state_dict(model.state_dict())
    expected = reference.activation_unit.unit(by_hand, mask).squeeze(-1).masked_fill(~mask, 0)
    torch.testing.assert_close(model.attention(b), expected)


def test_weights_are_not_normalised_by_default():
    model = make().eval()
    b = batch(batch_size=8)
    weights = model.attention(b)
    assert not torch.allclose(weights.sum(1), torch.ones(8))
    assert (weights[~b["mask"]] == 0).all()
    assert (weights < 0).any() or (weights.sum(1) > 1).any()  # raw scores, not a distribution


def test_softmax_option_sums_to_one_over_real_positions():
    model = make(normalization="softmax").eval()
    b = batch(batch_size=8)
    weights = model.attention(b)
    torch.testing.assert_close(weights.sum(1), torch.ones(8))
    assert (weights[~b["mask"]] == 0).all()


def test_attention_depends_on_the_target():
    model = make().eval()
    b = batch()
    other = dict(b, target_item=b["target_item"] % 39 + 1)
    assert not torch.allclose(model.attention(b), model.attention(other))


def test_prelu_option():
    model = make(activation="prelu")
    assert all(isinstance(a, PReLU) for a in model.activation_unit.unit.activations)
    assert model(batch()).shape == (5,)


def test_mlp_input_is_interest_target_and_their_product_with_options():
    assert make().mlp.linears[0].in_features == 3 * 16
    assert make(use_pooled_history=True).mlp.linears[0].in_features == 4 * 16
    assert make(interest_product=False).mlp.linears[0].in_features == 2 * 16
    model, b = make().eval(), batch()
    seen = {}
    model.mlp.register_forward_pre_hook(lambda _, inputs: seen.setdefault("x", inputs[0]))
    model(b)
    interest, target, product = seen["x"].split(16, dim=-1)
    torch.testing.assert_close(product, interest * target)


def test_minibatch_aware_l2_regularization():
    b = batch()
    item_frequency = torch.arange(SMALL["n_items"] + 1) % 7 + 1
    category_frequency = torch.arange(SMALL["n_categories"] + 1) + 1
    assert make().regularization(b, item_frequency).item() == 0.0

    model = make(l2_weight=0.5)
    ids = torch.cat([b["target_item"], b["hist_item"][b["mask"]]])
    expected = 0.5 * minibatch_aware_l2(model.item_embedding, ids, item_frequency)
    term = model.regularization(b, item_frequency)
    torch.testing.assert_close(term, expected)
    with_categories = model.regularization(b, item_frequency, category_frequency)
    assert with_categories > term

    term.backward()
    touched = model.item_embedding.weight.grad.abs().sum(1) > 0
    assert touched.nonzero().flatten().tolist() == sorted(set(ids.tolist()))


@pytest.mark.parametrize("normalization", ["none", "softmax"])
def test_padding_rows_get_zero_weight_even_with_padding_ids_nonzero(normalization):
    model = make(normalization=normalization).eval()
    b = batch(batch_size=6)
    b["hist_item"] = torch.where(b["mask"], b["hist_item"], 7)
    weights = model.attention(b)
    assert (weights[~b["mask"]] == 0).all()
