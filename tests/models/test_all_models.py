"""Behaviour every model shares: interface, padding, gradients, shapes, dtypes, devices."""

from __future__ import annotations

import json

import pytest
import torch
from model_sizes import SIZES

from attention_ctr.models import FEATURE_KEYS, MODELS, build_model, random_batch
from attention_ctr.onnx_export import export_onnx, onnx_feed, onnx_session

MAX_HISTORY = 6
SMALL = {
    **SIZES,
}
EXTRA = {  # smaller internals, and the behaviour-type embedding on so every table is exercised
    "pooling": {"use_behavior": True},
    "din": {"attention_hidden": [8, 4], "use_behavior": True},
    "dien": {"aux_hidden": [8, 4], "use_behavior": True},
    "bst": {"n_heads": 4, "feedforward_dim": 16, "use_behavior": True},
}
NAMES = sorted(MODELS)
PADDED_KEYS = (
    "hist_item",
    "hist_category",
    "hist_behavior",
    "time_gap",
    "neg_item",
    "neg_category",
)


def make(name: str, **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(name, **{**SMALL, **EXTRA[name], **overrides})


def batch(batch_size: int = 4, length: int = MAX_HISTORY, seed: int = 1) -> dict:
    return random_batch(batch_size, length, **SMALL, seed=seed)


def with_extra_padding(batch: dict, extra: int) -> dict:
    """The same samples with `extra` more padded columns."""
    return {
        name: torch.cat([value, value.new_zeros(value.shape[0], extra)], 1)
        if value.dim() == 2
        else value
        for name, value in batch.items()
    }


# -- interface --------------------------------------------------------------------------------
def test_registry_names():
    assert set(MODELS) == {"pooling", "din", "dien", "bst"}
    for name, cls in MODELS.items():
        assert cls.name == name
    with pytest.raises(ValueError, match="Unknown model"):
        build_model("transformer", **SMALL)


@pytest.mark.parametrize("name", NAMES)
def test_config_is_json_and_rebuilds_the_model(name):
    model = make(name)
    config = json.loads(json.dumps(model.config))
    assert set(FEATURE_KEYS) <= set(config)
    assert {"embedding_dim", "mlp_hidden", "dropout"} <= set(config)
    rebuilt = build_model(name, **config)
    rebuilt.load_state_dict(model.state_dict())
    b = batch()
    model.eval(), rebuilt.eval()
    torch.testing.assert_close(rebuilt(b), model(b))


@pytest.mark.parametrize("name", NAMES)
def test_constructor_is_keyword_only(name):
    with pytest.raises(TypeError):
        MODELS[name](40, 5)


@pytest.mark.parametrize("name", NAMES)
def test_default_widths(name):
    model = build_model(name, **{k: SMALL[k] for k in FEATURE_KEYS})
    assert model.config["embedding_dim"] == 32
    assert model.config["mlp_hidden"] == [200, 80]
    assert [layer.out_features for layer in model.mlp.linears] == [200, 80]
    assert model.item_embedding.embedding_dim == 32


@pytest.mark.parametrize("name", NAMES)
def test_embedding_tables_are_shared_by_target_and_history(name):
    model = make(name).eval()
    for table, n in ((model.item_embedding, SMALL["n_items"]), (model.category_embedding, 5)):
        assert isinstance(table, torch.nn.Embedding)
        assert table.num_embeddings == n + 1
        assert table.padding_idx == 0
    b = batch(batch_size=2)
    b["target_item"] = torch.tensor([1, 1])
    b["hist_item"] = torch.where(b["mask"], 2, 0)
    before = model(b)
    with torch.no_grad():  # what cold-start replacement does after training
        model.item_embedding.weight[1] += 1.0
    after_target = model(b)
    assert not torch.allclose(before, after_target)
    with torch.no_grad():
        model.item_embedding.weight[2] += 1.0
    assert not torch.allclose(after_target, model(b))


@pytest.mark.parametrize("name", NAMES)
def test_forward_with_auxiliary_matches_forward(name):
    model = make(name).eval()
    b = batch()
    logits, aux = model.forward_with_auxiliary(b)
    torch.testing.assert_close(logits, model(b))
    if name == "dien":
        torch.testing.assert_close(aux, model.auxiliary_loss(b))
    else:
        assert aux is None
        assert model.auxiliary_loss(b) is None


@pytest.mark.parametrize("name", ["pooling", "dien", "bst"])
def test_regularization_is_zero_unless_enabled(name):
    model = make(name)
    frequency = torch.ones(SMALL["n_items"] + 1)
    term = model.regularization(batch(), frequency)
    assert term.shape == () and term.item() == 0.0


# -- padding ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_padding_gets_exactly_zero_attention(name):
    model = make(name).eval()
    b = batch(batch_size=6)
    assert (~b["mask"]).any()
    weights = model.attention(b)
    assert weights.shape == b["mask"].shape
    assert (weights[~b["mask"]] == 0).all()
    assert (weights[b["mask"]] != 0).all()


@pytest.mark.parametrize("name", NAMES)
def test_padded_content_does_not_change_the_output(name):
    model = make(name).eval()
    b = batch(batch_size=6)
    logits, weights = model(b), model.attention(b)
    noisy = dict(b)
    generator = torch.Generator().manual_seed(5)
    for key in PADDED_KEYS:
        garbage = torch.randint(1, 5, b[key].shape, generator=generator)
        noisy[key] = torch.where(b["mask"], b[key], garbage)
    assert any(not torch.equal(noisy[key], b[key]) for key in PADDED_KEYS)
    torch.testing.assert_close(model(noisy), logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(model.attention(noisy), weights, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("length", [1, 4, MAX_HISTORY])
def test_request_forward_is_forward_on_the_repeated_history(name, length):
    """`score_request` (one history against K candidates, what the request graph runs) is
    `forward` with the history repeated for every candidate."""
    model = make(name).eval()
    b = batch(batch_size=5, length=length)
    request = {key: value[:1] if value.dim() == 2 else value for key, value in b.items()}
    repeated = {key: value.expand(5, -1) for key, value in request.items() if value.dim() == 2}
    with torch.no_grad():
        expected = model({**request, **repeated})
        torch.testing.assert_close(model.score_request(request), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("train", [False, True])
def test_more_padding_columns_do_not_change_the_output(name, train):
    """Also in training mode: batch statistics (Dice) must skip padded positions."""
    model = make(name, dropout=0.0)
    if name == "bst":
        model = make(name, dropout=0.0, transformer_dropout=0.0)
    model.train(train)
    b = batch(length=MAX_HISTORY - 2)
    logits = model(b)
    longer = with_extra_padding(b, 2)
    torch.testing.assert_close(model(longer), logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.attention(longer)[:, :-2], model.attention(b))


# -- gradients --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_every_parameter_gets_a_nonzero_gradient(name):
    model = make(name).train()
    b = batch(batch_size=8)
    logits, aux = model.forward_with_auxiliary(b)
    labels = torch.arange(8) % 2
    loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels.float())
    if name == "dien":
        assert aux is not None and aux.item() > 0
        loss = loss + aux
    loss.backward()
    for parameter_name, parameter in model.named_parameters():
        assert parameter.grad is not None, parameter_name
        assert torch.isfinite(parameter.grad).all(), parameter_name
        assert parameter.grad.abs().sum() > 0, parameter_name
    assert model.item_embedding.weight.grad[0].abs().sum() == 0  # padding row stays fixed


# -- shapes -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("batch_size", [1, 3])
@pytest.mark.parametrize("length", [1, MAX_HISTORY])
@pytest.mark.parametrize("train", [False, True])
def test_shapes(name, batch_size, length, train):
    model = make(name).train(train)
    b = batch(batch_size=batch_size, length=length)
    logits, aux = model.forward_with_auxiliary(b)
    assert logits.shape == (batch_size,)
    assert logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    if aux is not None:
        assert aux.shape == () and torch.isfinite(aux)
    assert model.attention(b).shape == (batch_size, length)


@pytest.mark.parametrize("name", NAMES)
def test_inference_is_per_sample(name):
    """In eval mode a sample's logit does not depend on the rest of its batch."""
    model = make(name).eval()
    b = batch(batch_size=3)
    alone = {key: value[1:2] for key, value in b.items()}
    torch.testing.assert_close(model(alone), model(b)[1:2], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_unused_keys_are_not_required(name):
    model = make(name, use_behavior=False).eval()
    needed = {"target_item", "target_category", "hist_item", "hist_category", "mask"}
    if name == "bst":
        needed.add("time_gap")
    b = {key: value for key, value in batch().items() if key in needed}
    assert model(b).shape == (4,)
    assert model.attention(b).shape == (4, MAX_HISTORY)
    if name == "bst":
        index = make(name, use_behavior=False, position="index").eval()
        assert index({k: v for k, v in b.items() if k != "time_gap"}).shape == (4,)


# -- dtypes and devices -----------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_bf16_autocast(name):
    model = make(name).train()
    b = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, aux = model.forward_with_auxiliary(b)
        loss = logits.float().sum() + (aux if aux is not None else 0)
        weights = model.attention(b)
    loss.backward()
    assert torch.isfinite(logits).all()
    assert (weights[~b["mask"]] == 0).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", NAMES)
def test_cuda_and_cuda_bf16_autocast(name):
    model = make(name).eval()
    b = batch()
    expected = model(b)
    model = model.cuda()
    cuda_batch = {key: value.cuda() for key, value in b.items()}
    torch.testing.assert_close(model(cuda_batch).cpu(), expected, rtol=1e-3, atol=1e-4)
    model.train()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits, aux = model.forward_with_auxiliary(cuda_batch)
        loss = logits.float().sum() + (aux if aux is not None else 0)
    loss.backward()
    assert torch.isfinite(logits).all()
    assert (model.attention(cuda_batch)[~cuda_batch["mask"]] == 0).all()


# -- export -----------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")
@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
@pytest.mark.parametrize("name", NAMES)
def test_onnx_export_with_dynamic_batch_and_history(name):
    """The project's exporter (`attention_ctr.onnx_export`), run at other shapes than traced."""
    model = make(name, use_behavior=False).eval()
    session = onnx_session(export_onnx(model), threads=1)
    for batch_size, length in [(4, MAX_HISTORY), (3, 2), (1, 1), (5, MAX_HISTORY - 1)]:
        b = batch(batch_size=batch_size, length=length, seed=batch_size + length)
        (logits,) = session.run(None, onnx_feed(session, b))
        with torch.no_grad():
            expected = model(b).numpy()
        assert logits.shape == (batch_size,)
        assert abs(logits - expected).max() <= 1e-5, (batch_size, length)
