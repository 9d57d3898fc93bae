"""DIEN: auxiliary loss against the negative history, bilinear attention, AUGRU evolution."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from model_sizes import SIZES

from attention_ctr.models import DIEN, random_batch
from attention_ctr.models.recurrence import AUGRUCell

SMALL = {
    **SIZES,
    "aux_hidden": [8, 4],
}


def make(**overrides) -> DIEN:
    torch.manual_seed(0)
    return DIEN(**{**SMALL, **overrides})


def batch(batch_size: int = 6, seed: int = 1) -> dict:
    return random_batch(batch_size, SMALL["max_history"], **SMALL, seed=seed)


def test_auxiliary_loss_is_on_by_default():
    model = DIEN(n_items=10, n_categories=3, n_behaviors=2, n_time_gap_buckets=4, max_history=5)
    assert model.aux_weight == 1.0
    assert isinstance(model.evolution, AUGRUCell)
    _, aux = model.forward_with_auxiliary(random_batch(3, 5, **model.config))
    assert aux is not None and aux.item() > 0


def test_auxiliary_weight_scales_and_can_be_switched_off_explicitly():
    b = batch()
    base = make().auxiliary_loss(b)
    torch.testing.assert_close(make(aux_weight=0.25).auxiliary_loss(b), 0.25 * base)
    off = make(aux_weight=0.0)
    assert off.auxiliary_loss(b) is None
    assert off.forward_with_auxiliary(b)[1] is None
    with pytest.raises(ValueError, match="aux_weight"):
        make(aux_weight=-1.0)


def test_auxiliary_loss_pairs_each_state_with_the_next_behaviour():
    """h_t scores the clicked e_{t+1} against the negative ê_{t+1}, averaged over valid t."""
    model = make().eval()
    b = batch()
    b["neg_item"][0, 2] = 0  # a missing negative drops only its own term
    mask = b["mask"]
    history = model.embedding.history(b)
    states, _ = model.extractor(history)
    negative = model.embedding.items(b["neg_item"], b["neg_category"])
    total, count = 0.0, 0
    for i in range(mask.shape[0]):
        for t in range(mask.shape[1] - 1):
            if not mask[i, t + 1]:
                continue
            count += 1
            clicked = model.aux_net(torch.cat([states[i, t], history[i, t + 1]]))
            total = total - F.logsigmoid(clicked)
            if b["neg_item"][i, t + 1] != 0:
                sampled = model.aux_net(torch.cat([states[i, t], negative[i, t + 1]]))
                total = total - F.logsigmoid(-sampled)
    torch.testing.assert_close(model.auxiliary_loss(b), (total / count).squeeze())


def test_auxiliary_loss_uses_the_negative_history():
    model = make().eval()
    b = batch()
    aux = model.auxiliary_loss(b)
    mask = b["mask"]

    changed = dict(b, neg_item=torch.where(mask, b["neg_item"] % 39 + 1, 0))
    assert not torch.allclose(model.auxiliary_loss(changed), aux)

    padded_changed = dict(b, neg_item=torch.where(mask, b["neg_item"], 3))
    torch.testing.assert_close(model.auxiliary_loss(padded_changed), aux)

    # position 0 has no predecessor: its negative is never used
    first_changed = dict(b, neg_item=b["neg_item"].clone())
    first_changed["neg_item"][:, 0] = 1
    torch.testing.assert_close(model.auxiliary_loss(first_changed), aux)

    # missing negatives (id 0) are masked out, whatever their category says
    none = dict(b, neg_item=torch.zeros_like(b["neg_item"]))
    none_other_category = dict(none, neg_category=torch.full_like(b["neg_category"], 2))
    torch.testing.assert_close(
        model.auxiliary_loss(none), model.auxiliary_loss(none_other_category)
    )
    assert not torch.allclose(model.auxiliary_loss(none), aux)


def test_auxiliary_loss_without_any_next_behaviour_is_zero():
    model = make()
    b = random_batch(3, 1, **SMALL)
    assert model.auxiliary_loss(b).item() == 0.0


def test_auxiliary_loss_falls_when_the_next_item_is_predictable():
    """Train only the embeddings, the extractor and the auxiliary net on next = item + 1."""
    model = make(embedding_dim=16, aux_hidden=[32, 16])
    n_items, length = SMALL["n_items"], SMALL["max_history"]
    generator = torch.Generator().manual_seed(0)

    def toy_batch(size: int = 64) -> dict:
        start = torch.randint(0, n_items, (size, 1), generator=generator)
        items = (start + torch.arange(length)) % n_items + 1
        negatives = items + torch.randint(2, n_items - 1, items.shape, generator=generator)
        negatives = (negatives - 1) % n_items + 1  # never the true next item
        return {
            "target_item": items[:, -1],
            "target_category": items[:, -1] % 5 + 1,
            "hist_item": items,
            "hist_category": items % 5 + 1,
            "mask": torch.ones(size, length, dtype=torch.bool),
            "neg_item": negatives,
            "neg_category": negatives % 5 + 1,
        }

    held_out = toy_batch(256)
    parameters = [
        *model.embedding.parameters(),
        *model.extractor.parameters(),
        *model.aux_net.parameters(),
    ]
    optimizer = torch.optim.Adam(parameters, lr=0.01)
    with torch.no_grad():
        before = model.auxiliary_loss(held_out).item()
    for _ in range(100):
        loss = model.auxiliary_loss(toy_batch())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        after = model.auxiliary_loss(held_out).item()
    assert after < 0.5 * before, (before, after)


def test_attention_is_bilinear_masked_softmax():
    model = make().eval()
    b = batch()
    weights = model.attention(b)
    mask = b["mask"]
    torch.testing.assert_close(weights.sum(1), torch.ones(mask.shape[0]))
    assert (weights[~mask] == 0).all()
    states, _ = model.extractor(model.embedding.history(b))
    target = model.embedding.target(b)
    scores = torch.einsum("blh,hd,bd->bl", states, model.attention_weight, target)
    expected = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=1)
    torch.testing.assert_close(weights, expected)


def test_target_steers_the_evolution():
    model = make().eval()
    b = batch()
    other = dict(b, target_item=b["target_item"] % 39 + 1)
    assert not torch.allclose(model.attention(b), model.attention(other))
    assert not torch.allclose(model(b), model(other))


def test_final_state_is_the_state_after_the_last_real_behaviour():
    """A history and the same history with padding after it end in the same AUGRU state."""
    model = make().eval()
    b = batch(batch_size=1)
    b["mask"] = torch.tensor([[True, True, True, False, False, False]])
    trimmed = {key: value[:, :3] if value.dim() == 2 else value for key, value in b.items()}
    torch.testing.assert_close(model(b), model(trimmed))
    # while a real behaviour at the end does move the state
    extended = dict(b, mask=torch.tensor([[True, True, True, True, False, False]]))
    extended["hist_item"] = b["hist_item"].clone()
    extended["hist_item"][0, 3] = 5
    assert not torch.allclose(model(b), model(extended))


def _assert_same_gradients(fast, expected, inputs, upstream=None):
    upstream = torch.randn_like(expected) if upstream is None else upstream
    for got, want in zip(
        torch.autograd.grad(fast, inputs, upstream),
        torch.autograd.grad(expected, inputs, upstream),
    ):
        torch.testing.assert_close(got, want)


def test_training_extractor_is_the_nn_gru():
    """Whichever path CPU training takes (`ops`: the optional kernel or `nn.GRU`), the states on
    real positions and the gradients through them are `nn.GRU`'s."""
    model = make().train()
    history = torch.randn(4, 6, 16, requires_grad=True)
    mask = torch.arange(6) < torch.tensor([6, 3, 1, 0]).unsqueeze(-1)
    states = model.interest_states(history, mask)
    expected, _ = model.extractor(history)
    torch.testing.assert_close(states[mask], expected[mask])
    upstream = torch.randn_like(expected) * mask.unsqueeze(-1)  # what DIEN reads
    _assert_same_gradients(states, expected, [history, *model.extractor.parameters()], upstream)
