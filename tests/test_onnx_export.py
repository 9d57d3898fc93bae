"""Both exported graphs of every model against eager torch, at several shapes and options."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attention_ctr.models import build_model, random_batch
from attention_ctr.models.activations import Dice
from attention_ctr.onnx_export import export_onnx, export_request_onnx, onnx_feed, onnx_session

MAX_HISTORY = 6
SIZES = {
    "n_items": 40,
    "n_categories": 5,
    "n_behaviors": 4,
    "n_time_gap_buckets": 7,
    "max_history": MAX_HISTORY,
    "embedding_dim": 8,
    "mlp_hidden": [16, 8],
}
VARIANTS = [
    ("pooling", {}),
    ("pooling", {"use_behavior": True, "pooling": "sum"}),
    ("din", {"attention_hidden": [8, 4]}),
    ("din", {"attention_hidden": [8], "activation": "prelu", "normalization": "softmax"}),
    ("din", {"use_pooled_history": True, "use_behavior": True}),
    ("dien", {"aux_hidden": [8, 4]}),
    ("dien", {"use_behavior": True, "hidden_size": 12}),
    ("bst", {"n_heads": 2}),
    ("bst", {"n_heads": 2, "n_layers": 2, "feedforward_dim": 12}),
    ("bst", {"n_heads": 2, "position": "index", "output": "mean", "use_behavior": True}),
]


def _trained_like(name: str, options: dict) -> torch.nn.Module:
    """A model in eval mode whose Dice units have non-trivial statistics and slopes."""
    torch.manual_seed(0)
    model = build_model(name, **SIZES, **options).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, Dice):
                module.running_mean.normal_()
                module.running_var.uniform_(0.5, 2.0)
                module.alpha.uniform_(-0.5, 0.5)
    return model


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
@pytest.mark.parametrize(
    ("name", "options"), VARIANTS, ids=[f"{n}-{i}" for i, (n, _) in enumerate(VARIANTS)]
)
def test_batch_and_request_graphs_match_eager_torch(name, options):
    model = _trained_like(name, options)
    batch_session = onnx_session(export_onnx(model), 1)
    request_session = onnx_session(export_request_onnx(model), 1)
    for candidates, length in [(1, 1), (5, 3), (7, MAX_HISTORY), (2, MAX_HISTORY - 1)]:
        batch = random_batch(candidates, length, **SIZES, seed=candidates + length)
        with torch.inference_mode():
            expected = model(batch).numpy()
        (logits,) = batch_session.run(None, onnx_feed(batch_session, batch))
        np.testing.assert_allclose(logits, expected, rtol=0, atol=1e-5)

        # one user's history (row 0, possibly padded) against every row's target
        request = {key: value[:1] if value.dim() == 2 else value for key, value in batch.items()}
        tiled = {
            key: value.expand(candidates, -1) if value.dim() == 2 else value
            for key, value in request.items()
        }
        with torch.inference_mode():
            expected = model(tiled).numpy()
        (logits,) = request_session.run(None, onnx_feed(request_session, request))
        assert logits.shape == (candidates,)
        np.testing.assert_allclose(logits, expected, rtol=0, atol=1e-5)
