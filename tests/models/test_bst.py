"""BST: the target in the sequence, position features, masked SDPA attention, outputs."""

from __future__ import annotations

import pytest
import torch
from model_sizes import SIZES

from attention_ctr.models import BST, ops, random_batch
from attention_ctr.models.base import pad_positions
from attention_ctr.models.bst import TransformerBlock

MAX_HISTORY = 6
SMALL = {
    **SIZES,
    "n_heads": 4,
    "feedforward_dim": 16,
}


def make(**overrides) -> BST:
    torch.manual_seed(0)
    return BST(**{**SMALL, **overrides})


def batch(batch_size: int = 5, length: int = MAX_HISTORY, seed: int = 1) -> dict:
    return random_batch(batch_size, length, **SMALL, seed=seed)


def test_defaults_follow_the_paper():
    model = BST(n_items=10, n_categories=3, n_behaviors=2, n_time_gap_buckets=4, max_history=5)
    assert model.position == "time_gap"
    assert model.output == "concat"
    layer = model.layers[0]
    assert len(model.layers) == 1
    assert layer.n_heads == 4
    assert layer.dropout_p == 0.1
    assert layer.attention_dropout == 0.0
    assert layer.feedforward1.out_features == 2 * 32 + 32
    assert layer.norm1.eps == layer.norm2.eps == 1e-5
    d_model = 2 * 32 + 32  # item ⊕ category ⊕ time-gap embedding (concatenated)
    assert layer.qkv.in_features == d_model
    assert model.mlp.linears[0].in_features == (5 + 1) * d_model  # all positions, flattened
    assert model.position_embedding.num_embeddings == 4 + 1  # ids 1..3 history, 4 = target


@pytest.mark.parametrize("output", ["concat", "mean"])
def test_sequence_is_history_then_target(output):
    model = make(output=output).eval()
    length = MAX_HISTORY - 2
    b = batch(length=length)
    tokens, keep = model.tokens(b)
    assert tokens.shape == (5, length + 1, 16 + 8)  # the concat output pads after the encoder
    assert keep[:, -1].all()  # the target is never masked
    assert torch.equal(keep[:, :length], b["mask"])
    assert not keep[:, length:-1].any()
    torch.testing.assert_close(tokens[:, -1, :16], model.embedding.target(b))
    target_position = model.position_embedding.weight[SMALL["n_time_gap_buckets"]]
    torch.testing.assert_close(tokens[:, -1, 16:], target_position.expand(5, -1))
    full_tokens, _ = model.tokens(batch(length=MAX_HISTORY))
    assert full_tokens.shape[1] == MAX_HISTORY + 1  # L + 1 at full length


def test_target_changes_attention_and_output():
    model = make().eval()
    b = batch()
    other = dict(b, target_item=b["target_item"] % 39 + 1)
    assert not torch.allclose(model.attention(b), model.attention(other))
    assert not torch.allclose(model(b), model(other))


def test_time_gap_is_the_position_feature():
    model = make().eval()
    b = batch()
    other = dict(b, time_gap=torch.where(b["mask"], b["time_gap"] % 6 + 1, 0))
    assert not torch.allclose(model(b), model(other))


def test_index_position_counts_back_from_the_target():
    model = make(position="index").eval()
    b = batch(batch_size=2)
    b["mask"] = torch.tensor([[True] * 6, [True, True, False, False, False, False]])
    ids = model._positions(b, b["mask"])
    assert ids.tolist() == [[7, 6, 5, 4, 3, 2], [3, 2, 0, 0, 0, 0]]
    assert model.target_position == 1
    assert model.position_embedding.num_embeddings == MAX_HISTORY + 2
    assert model(b).shape == (2,)


def test_attention_is_the_target_query_averaged_over_heads():
    model = make().eval()
    b = batch()
    tokens, keep = model.tokens(b)
    layer = model.layers[0]
    q, k, _ = layer._heads(layer.qkv(tokens))
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    scores = scores.masked_fill(~keep[:, None, None, :], float("-inf"))
    expected = torch.softmax(scores, -1)[:, :, -1, :MAX_HISTORY].mean(1)
    weights = model.attention(b)
    torch.testing.assert_close(weights, expected.masked_fill(~b["mask"], 0))
    assert (weights.sum(1) < 1).all()  # the rest is the target attending to itself
    assert (weights[~b["mask"]] == 0).all()


def test_block_forward_uses_the_same_attention_it_reports():
    torch.manual_seed(0)
    block = TransformerBlock(12, 3, 20).eval()
    x = torch.randn(4, 5, 12)
    keep = torch.tensor(
        [[True] * 5, [True, False, False, False, True], [False] * 4 + [True], [True] * 5]
    )
    probabilities = block.attention_weights(x, keep)  # [B, heads, S, S]
    _, _, v = block._heads(block.qkv(x))
    attended = (probabilities @ v).transpose(1, 2).reshape(x.shape)
    expected = block.norm1(x + block.out(attended))
    expected = block.norm2(
        expected + block.feedforward2(torch.nn.functional.leaky_relu(block.feedforward1(expected)))
    )
    torch.testing.assert_close(block(x, keep), expected)
    assert (probabilities.masked_select(~keep[:, None, None, :]) == 0).all()


def test_mean_output_option():
    model = make(output="mean")
    assert model.mlp.linears[0].in_features == 16 + 8
    assert model(batch(length=3)).shape == (5,)


def test_bad_options_are_rejected():
    with pytest.raises(ValueError, match="divisible"):
        make(n_heads=5)
    with pytest.raises(ValueError, match="position"):
        make(position="sinusoid")
    with pytest.raises(ValueError, match="output"):
        make(output="cls")
    with pytest.raises(ValueError, match="max_history"):
        make().eval()(batch(length=MAX_HISTORY + 1))


@pytest.mark.parametrize("length", [1, 3, MAX_HISTORY])
def test_concat_output_is_the_paper_s_fixed_width_sequence(length):
    """Encoding the L + 1 real tokens and padding the outputs to max_history afterwards is the
    same function, values and gradients, as encoding the history padded to max_history."""
    model = make(transformer_dropout=0.0).double()
    b = batch(4, length)

    def padded_logits() -> torch.Tensor:
        history, keep = model.history_tokens(b)
        x = torch.cat([pad_positions(history, MAX_HISTORY), model.target_tokens(b)], dim=1)
        keep = torch.cat([pad_positions(keep, MAX_HISTORY), keep.new_ones(4, 1)], dim=1)
        for layer in model.layers:
            x = layer(x, keep)
        features = x.masked_fill(~keep.unsqueeze(-1), 0.0).flatten(1)
        return model.mlp(features).squeeze(-1)

    got, expected = model(b), padded_logits()
    torch.testing.assert_close(got.double(), expected)
    parameters = list(model.parameters())
    for a, w in zip(
        torch.autograd.grad(got.sum(), parameters, allow_unused=True),
        torch.autograd.grad(expected.sum(), parameters, allow_unused=True),
    ):
        if w is None:
            assert a is None or not a.any()
        else:
            torch.testing.assert_close(a, w)


def test_cpu_training_dropout_keeps_one_minus_p_and_rescales():
    torch.manual_seed(0)
    x = torch.ones(200, 500)
    out = ops.dropout(x, 0.1, training=True)
    kept = out != 0
    assert abs(kept.float().mean().item() - 0.9) < 0.005
    torch.testing.assert_close(out[kept], torch.full_like(out[kept], 1 / 0.9), rtol=1e-4, atol=0)
    assert not torch.equal(kept, ops.dropout(x, 0.1, training=True) != 0)  # fresh masks
    assert ops.dropout(x, 0.1, training=False) is x
    x.requires_grad_()
    out = ops.dropout(x, 0.1, training=True)
    out.sum().backward()
    torch.testing.assert_close(x.grad, out.detach())  # gradient = mask * scale
