"""Shared layers: Dice, MLP activations, DIN's activation unit, the AUGRU cell, mini-batch L2."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from attention_ctr.models.activations import Dice, PReLU
from attention_ctr.models.attention import DINAttention, masked_softmax
from attention_ctr.models.base import minibatch_aware_l2
from attention_ctr.models.embedding import BehaviorEmbedding
from attention_ctr.models.mlp import MLP
from attention_ctr.models.recurrence import AUGRUCell


def _dice_by_hand(x, mean, var, alpha, eps):
    p = torch.sigmoid((x - mean) / torch.sqrt(var + eps))
    return p * x + (1 - p) * alpha * x


def _mask(lengths, length):
    return torch.arange(length)[None, :] < torch.tensor(lengths)[:, None]


# -- Dice -------------------------------------------------------------------------------------
def test_dice_alpha_is_per_unit_and_starts_at_zero():
    dice = Dice(5)
    assert dice.alpha.shape == (5,)
    assert torch.equal(dice.alpha.detach(), torch.zeros(5))
    assert dice.alpha.requires_grad
    assert dice.eps <= 1e-8
    assert not [name for name, _ in dice.named_parameters() if name != "alpha"]  # no affine


def test_dice_uses_batch_statistics_in_training():
    torch.manual_seed(0)
    dice = Dice(3)
    with torch.no_grad():
        dice.alpha.copy_(torch.tensor([0.1, -0.2, 0.5]))
    x = torch.randn(16, 3) * 3 + 2
    out = dice.train()(x)
    expected = _dice_by_hand(x, x.mean(0), x.var(0, unbiased=False), dice.alpha, dice.eps)
    torch.testing.assert_close(out, expected)
    # one sample's output depends on the rest of the batch in training mode
    assert not torch.allclose(dice(x[:4])[0], out[0])


def test_dice_uses_running_statistics_in_eval():
    torch.manual_seed(0)
    dice = Dice(3, momentum=0.5)
    x = torch.randn(32, 3) * 2 + 1
    dice.train()(x)
    torch.testing.assert_close(dice.running_mean, 0.5 * x.mean(0))
    torch.testing.assert_close(dice.running_var, 0.5 * 1 + 0.5 * x.var(0, unbiased=True))
    dice.eval()
    y = torch.randn(8, 3)
    expected = _dice_by_hand(y, dice.running_mean, dice.running_var, dice.alpha, dice.eps)
    torch.testing.assert_close(dice(y), expected)
    torch.testing.assert_close(dice(y[:1]), expected[:1])  # batch-independent at inference
    before = dice.running_mean.clone()
    dice(y)
    assert torch.equal(dice.running_mean, before)  # eval does not update the averages


def test_dice_statistics_ignore_masked_positions():
    torch.manual_seed(0)
    x = torch.randn(4, 5, 3)
    mask = _mask([5, 3, 1, 2], 5)
    dice = Dice(3)
    out = dice.train()(x, mask)
    real = x[mask]
    expected = _dice_by_hand(x, real.mean(0), real.var(0, unbiased=False), 0.0, dice.eps)
    torch.testing.assert_close(out[mask], expected[mask])
    running = dice.running_mean.clone(), dice.running_var.clone()

    garbage = x.clone()
    garbage[~mask] = 1e3
    dice2 = Dice(3)
    out2 = dice2.train()(garbage, mask)
    torch.testing.assert_close(out2[mask], out[mask])
    torch.testing.assert_close((dice2.running_mean, dice2.running_var), running)


def test_dice_alpha_gets_a_finite_gradient():
    torch.manual_seed(0)
    dice = Dice(4)
    x = torch.randn(10, 4, requires_grad=True)
    dice.train()(x).sum().backward()
    assert dice.alpha.grad is not None
    assert torch.isfinite(dice.alpha.grad).all()
    assert (dice.alpha.grad != 0).all()  # d out / d alpha = (1 - p) x, nonzero at alpha = 0
    assert torch.isfinite(x.grad).all()


def test_dice_single_position_and_bf16_are_finite():
    dice = Dice(4).train()
    assert torch.isfinite(dice(torch.randn(1, 4))).all()  # zero variance, eps keeps it finite
    out = dice(torch.randn(6, 4).bfloat16())
    assert out.dtype == torch.bfloat16
    assert torch.isfinite(out.float()).all()


# -- activations and MLP ----------------------------------------------------------------------
def test_prelu_has_one_slope_per_unit_of_the_last_dimension():
    prelu = PReLU(3)
    with torch.no_grad():
        prelu.weight.copy_(torch.tensor([0.0, 0.5, 1.0]))
    x = -torch.ones(2, 7, 3)
    assert torch.equal(prelu(x)[0, 0], torch.tensor([0.0, -0.5, -1.0]))
    assert torch.equal(prelu(-x), -x)


def test_prelu_is_f_prelu_along_the_last_dimension_in_value_and_gradient():
    torch.manual_seed(0)
    prelu = PReLU(4).double()
    with torch.no_grad():
        prelu.weight.copy_(torch.tensor([-0.5, 0.0, 0.25, 2.0]))
    x = torch.randn(3, 5, 4, dtype=torch.double, requires_grad=True)
    upstream = torch.randn(3, 5, 4, dtype=torch.double)
    got = prelu(x)
    want = F.prelu(x.reshape(-1, 4), prelu.weight).view(x.shape)
    torch.testing.assert_close(got, want)
    inputs = [x, prelu.weight]
    for a, b in zip(
        torch.autograd.grad(got, inputs, upstream), torch.autograd.grad(want, inputs, upstream)
    ):
        torch.testing.assert_close(a, b)
    assert torch.autograd.gradcheck(prelu, (x.detach()[:2].requires_grad_(),))


@pytest.mark.parametrize("activation", ["dice", "prelu", "relu", "leaky_relu", "sigmoid"])
def test_mlp_shapes(activation):
    mlp = MLP(6, [5, 4], activation, dropout=0.1, out_features=1)
    assert [layer.out_features for layer in mlp.linears] == [5, 4]
    assert mlp(torch.randn(3, 7, 6), torch.ones(3, 7, dtype=torch.bool)).shape == (3, 7, 1)


def test_mlp_rejects_unknown_activation():
    with pytest.raises(ValueError, match="activation"):
        MLP(4, [3], "swish")


# -- DIN activation unit ----------------------------------------------------------------------
@pytest.mark.parametrize("train", [False, True])
def test_din_unit_input_is_history_target_difference_product(train):
    torch.manual_seed(0)
    unit = DINAttention(4, hidden=[6, 3]).train(train)
    history, target = torch.randn(2, 5, 4), torch.randn(2, 4)
    mask = _mask([5, 2], 5)
    t = target[:, None, :].expand(-1, 5, -1)
    by_hand = torch.cat([history, t, history - t, history * t], dim=-1)
    assert unit.unit.linears[0].in_features == 16
    torch.testing.assert_close(unit.unit_input(history, target), by_hand)
    # the first Linear on [h, t, h - t, h * t], then the rest of the unit, masked
    first = unit.first_layer(history, target)
    torch.testing.assert_close(first, unit.unit.linears[0](by_hand))
    reference = DINAttention(4, hidden=[6, 3]).train(train)
    reference.load_state_dict(unit.state_dict())
    scores = reference.unit(by_hand, mask).squeeze(-1)
    _, weights = unit(history, target, mask)
    torch.testing.assert_close(weights, scores.masked_fill(~mask, 0))


def test_din_unit_default_keeps_raw_scores():
    torch.manual_seed(0)
    unit = DINAttention(4, hidden=[6, 3], activation="prelu").eval()
    history, target = torch.randn(3, 5, 4), torch.randn(3, 4)
    mask = _mask([5, 3, 1], 5)
    interest, weights = unit(history, target, mask)
    assert unit.normalization == "none"
    t = target[:, None, :].expand(-1, 5, -1)
    raw = unit.unit(torch.cat([history, t, history - t, history * t], -1)).squeeze(-1)
    torch.testing.assert_close(weights[mask], raw[mask])  # no softmax, no rescaling
    assert torch.equal(weights[~mask], torch.zeros(int((~mask).sum())))
    assert not torch.allclose(weights.sum(1), torch.ones(3))
    torch.testing.assert_close(interest, (weights[..., None] * history).sum(1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_din_unit_softmax_sums_to_one_over_real_positions(dtype):
    torch.manual_seed(0)
    unit = DINAttention(4, hidden=[6, 3], normalization="softmax").to(dtype)
    history, target = torch.randn(3, 5, 4, dtype=dtype), torch.randn(3, 4, dtype=dtype)
    mask = _mask([5, 3, 1], 5)
    _, weights = unit(history, target, mask)
    torch.testing.assert_close(weights.float().sum(1), torch.ones(3), atol=1e-2, rtol=0)
    assert (weights[~mask] == 0).all()
    assert (weights[mask] > 0).all()


def test_din_unit_rejects_unknown_normalization():
    with pytest.raises(ValueError, match="normalization"):
        DINAttention(4, normalization="sigmoid")


def test_masked_softmax_has_no_infinities_and_exact_zeros():
    scores = torch.tensor([[1.0, 2.0, 3.0], [0.5, 1e4, -1e4]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    weights = masked_softmax(scores, mask)
    assert torch.equal(weights[~mask], torch.zeros(3))
    torch.testing.assert_close(weights.sum(1), torch.ones(2))
    assert torch.isfinite(weights).all()


# -- AUGRU ------------------------------------------------------------------------------------
def _augru_by_hand(cell, x, h, a):
    """The paper's equations, gate by gate."""
    w_ir, w_iu, w_ih = cell.weight_ih.chunk(3)
    w_hr, w_hu, w_hh = cell.weight_hh.chunk(3)
    b_ir, b_iu, b_ih = cell.bias_ih.chunk(3)
    b_hr, b_hu, b_hh = cell.bias_hh.chunk(3)
    r = torch.sigmoid(x @ w_ir.T + b_ir + h @ w_hr.T + b_hr)
    u = torch.sigmoid(x @ w_iu.T + b_iu + h @ w_hu.T + b_hu)
    candidate = torch.tanh(x @ w_ih.T + b_ih + r * (h @ w_hh.T + b_hh))
    u_attention = a[:, None] * u
    return (1 - u_attention) * h + u_attention * candidate


def test_augru_step_matches_the_paper():
    torch.manual_seed(0)
    cell = AUGRUCell(3, 4)
    x, h, a = torch.randn(5, 3), torch.randn(5, 4), torch.rand(5)
    torch.testing.assert_close(cell(x, h, a), _augru_by_hand(cell, x, h, a))
    projected = cell.input_projection(x)
    torch.testing.assert_close(cell.step(projected, h, a[:, None]), cell(x, h, a))


def test_augru_zero_attention_keeps_the_state_exactly():
    torch.manual_seed(0)
    cell = AUGRUCell(3, 4)
    h = torch.randn(5, 4)
    assert torch.equal(cell(torch.randn(5, 3), h, torch.zeros(5)), h)


def test_augru_full_attention_is_a_standard_gru_step():
    torch.manual_seed(0)
    cell = AUGRUCell(3, 4)
    x, h = torch.randn(5, 3), torch.randn(5, 4)
    # nn.GRUCell uses z = 1 - u (z weighs the old state): same weights with the u-gate negated.
    gru = torch.nn.GRUCell(3, 4)
    sign = torch.cat([torch.ones(4), -torch.ones(4), torch.ones(4)])
    with torch.no_grad():
        gru.weight_ih.copy_(cell.weight_ih * sign[:, None])
        gru.weight_hh.copy_(cell.weight_hh * sign[:, None])
        gru.bias_ih.copy_(cell.bias_ih * sign)
        gru.bias_hh.copy_(cell.bias_hh * sign)
    torch.testing.assert_close(cell(x, h, torch.ones(5)), gru(x, h))
    # attention in between scales the step: the state moves only part of the way
    half = cell(x, h, torch.full((5,), 0.5))
    assert not torch.allclose(half, gru(x, h))
    torch.testing.assert_close(half, _augru_by_hand(cell, x, h, torch.full((5,), 0.5)))


def test_augru_sequence_equals_its_steps_in_value_and_gradient():
    """`sequence` against the paper's equations step by step, in float64."""
    torch.manual_seed(0)
    cell = AUGRUCell(5, 4).double()
    x = torch.randn(3, 7, 5, dtype=torch.double, requires_grad=True)
    a = torch.rand(3, 7, dtype=torch.double)
    a[1, 4:] = 0  # padding: the state must stay put
    a.requires_grad_()

    h = torch.zeros(3, 4, dtype=torch.double)
    states = []
    for t in range(7):
        h = _augru_by_hand(cell, x[:, t], h, a[:, t])
        states.append(h)
    final = cell.sequence(x, a)
    torch.testing.assert_close(final, h)
    assert torch.equal(states[3][1], states[6][1])

    upstream = torch.randn(3, 4, dtype=torch.double)
    inputs = [x, a, *cell.parameters()]
    expected = torch.autograd.grad(h, inputs, upstream)
    for got, want in zip(torch.autograd.grad(final, inputs, upstream), expected):
        torch.testing.assert_close(got, want)


def test_augru_sequence_of_one_history_against_many_attentions():
    """A request's K candidates share one history: `x` `[1, L, I]` with attention `[K, L]`."""
    torch.manual_seed(0)
    cell = AUGRUCell(5, 4)
    x, a = torch.randn(1, 7, 5), torch.rand(3, 7)
    torch.testing.assert_close(cell.sequence(x, a), cell.sequence(x.expand(3, -1, -1), a))


def test_augru_sequence_under_bf16_autocast_is_float32():
    torch.manual_seed(0)
    cell = AUGRUCell(5, 4)
    x = torch.randn(3, 7, 5, requires_grad=True)
    a = torch.rand(3, 7, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = cell.sequence(x, a)
    assert h.dtype == torch.float32
    h.sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(cell.weight_hh.grad).all()


def test_augru_input_and_hidden_biases_are_separate():
    torch.manual_seed(0)
    cell = AUGRUCell(3, 4)
    assert cell.bias_ih.data_ptr() != cell.bias_hh.data_ptr()
    x, h, a = torch.randn(5, 3), torch.randn(5, 4), torch.rand(5)
    cell(x, h, a).sum().backward()
    # the reset gate multiplies only the hidden candidate bias: the two get different gradients
    assert not torch.allclose(cell.bias_ih.grad[8:], cell.bias_hh.grad[8:])


# -- embeddings and mini-batch aware L2 -------------------------------------------------------
def test_behavior_embedding_concatenates_item_and_category():
    embedding = BehaviorEmbedding(10, 4, 3)
    items, categories = torch.tensor([[1, 2]]), torch.tensor([[3, 0]])
    vectors = embedding.items(items, categories)
    assert vectors.shape == (1, 2, 6)
    torch.testing.assert_close(vectors[0, 0, :3], embedding.item_embedding.weight[1])
    torch.testing.assert_close(vectors[0, 0, 3:], embedding.category_embedding.weight[3])
    assert torch.equal(vectors[0, 1, 3:], torch.zeros(3))  # padding row


def test_minibatch_aware_l2_counts_each_present_row_once_over_its_frequency():
    torch.manual_seed(0)
    table = torch.nn.Embedding(6, 3)
    weight = table.weight
    frequency = torch.tensor([0, 1, 2, 4, 8, 16])
    ids = torch.tensor([[2, 2, 4, 0], [4, 2, 0, 0]])
    expected = weight[2].square().sum() / 2 + weight[4].square().sum() / 8
    term = minibatch_aware_l2(table, ids, frequency)
    torch.testing.assert_close(term, expected)
    term.backward()
    touched = weight.grad.abs().sum(1) != 0
    assert touched.tolist() == [False, False, True, False, True, False]

    # looked up through the table: a sparse table (lazy Adam) gets a sparse gradient
    sparse = torch.nn.Embedding(6, 3, sparse=True)
    minibatch_aware_l2(sparse, ids, frequency).backward()
    assert sparse.weight.grad.is_sparse
    assert sorted(sparse.weight.grad.coalesce().indices()[0].tolist()) == [2, 4]


def test_behavior_embedding_gradients_reach_each_lookup():
    """Target, history and negative history: each one's gradient lands on its own ids (and
    none on the padding row)."""
    embedding = BehaviorEmbedding(6, 3, 2)
    batch = {
        "target_item": torch.tensor([1]),
        "target_category": torch.tensor([1]),
        "hist_item": torch.tensor([[2, 3]]),
        "hist_category": torch.tensor([[2, 2]]),
        "mask": torch.tensor([[True, False]]),
        "neg_item": torch.tensor([[4, 5]]),
        "neg_category": torch.tensor([[3, 3]]),
    }
    target, history = embedding.lookup(batch)
    negative = embedding.negative_history(batch)
    (target.sum() + 2 * history.sum() + 3 * negative.sum()).backward()
    grad = embedding.item_embedding.weight.grad[:, 0]
    # item 3 and negative 5 sit on the padded position: they read as the padding row
    torch.testing.assert_close(grad, torch.tensor([0.0, 1.0, 2.0, 0.0, 3.0, 0.0, 0.0]))
