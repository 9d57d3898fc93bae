"""The training pipeline through real Kedro runs on a small synthetic log."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import PROJECT_ROOT, SMALL_SYNTHETIC
from sandbox import make_project_copy, run_pipeline

from attention_ctr.models import FEATURE_KEYS, MODELS, build_model
from attention_ctr.sequences import SampleTensors
from attention_ctr.training import (
    TrainingConfig,
    blend_toward_category,
    fit,
    has_cxx_compiler,
    predict,
    seed_everything,
)

FAST_TRAINING = {
    **SMALL_SYNTHETIC,
    "training.epochs": 2,
    "training.progress_bar": False,
    "feature_engineering.max_history": 20,
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    project = make_project_copy(tmp_path_factory.mktemp("train") / "project", source=PROJECT_ROOT)
    catalog = run_pipeline(
        project, params=FAST_TRAINING, pipelines=["ingestion", "feature_engineering", "training"]
    )
    return project, catalog


def split_tensors(catalog, *splits: str) -> list[SampleTensors]:
    """`SampleTensors` of the named splits (`train`, `validation`, `test`) of a run."""
    spec, events = catalog.load("feature_spec"), catalog.load("events@pandas")
    return [
        SampleTensors(catalog.load(f"{split}_samples@pandas"), events, spec) for split in splits
    ]


@pytest.mark.parametrize("name", list(MODELS))
def test_every_model_is_a_versioned_state_dict_that_reloads(trained, name):
    project, catalog = trained
    versions = list((project / "data" / "06_models" / name / "model.pt").iterdir())
    assert len(versions) == 1 and (versions[0] / "model.pt").is_file()
    artifact = torch.load(versions[0] / "model.pt", weights_only=True)
    assert artifact["model"] == name and isinstance(artifact["config"], dict)
    assert all(isinstance(v, torch.Tensor) for v in artifact["state_dict"].values())

    model = catalog.load(f"{name}.model")
    (test,) = split_tensors(catalog, "test")
    probabilities = predict(model, test, 512)
    assert probabilities.shape == (len(test),) and np.isfinite(probabilities).all()
    history = catalog.load(f"{name}.training_history")
    assert history["epoch"].tolist() == [1, 2]
    assert {"train_loss", "validation_auc", "train_samples_per_second"} <= set(history.columns)


def test_cold_start_blend_is_the_shrinkage_with_the_k_validation_chose(trained):
    _, catalog = trained
    cold = catalog.load("cold_start_items")
    weights = catalog.load("cold_start_weights")
    frequency = catalog.load("item_frequency").set_index("item")
    for name in MODELS:
        trained_rows = catalog.load(f"{name}.trained_model").item_embedding.weight.detach()
        table = catalog.load(f"{name}.model").item_embedding.weight.detach()
        blend = catalog.load(f"{name}.cold_start_blend")
        k = blend["k"]
        grid = {row["k"]: row["validation_auc"] for row in blend["grid"]}
        assert 0.0 in grid and k in grid
        # the chosen k never lowers validation AUC against no blend
        assert grid[k] == max(grid.values()) >= grid[0.0] == blend["validation_auc_without_blend"]
        for category, group in weights.groupby("category"):
            average = (
                trained_rows[torch.tensor(group["item"].to_numpy())]
                * torch.as_tensor(group["weight"].to_numpy(np.float32))[:, None]
            ).sum(0)
            # items no training sample had: the category's frequency-weighted average
            cold_here = cold.loc[cold["category"] == category, "item"].to_numpy()
            if len(cold_here):
                torch.testing.assert_close(table[cold_here], average.expand(len(cold_here), -1))
            # trained items: (n * own + k * average) / (n + k)
            seen = group["item"].to_numpy()
            n = torch.tensor(frequency.loc[seen, "train_count"].to_numpy(np.float32))[:, None]
            expected = (n * trained_rows[seen] + k * average) / (n + k)
            torch.testing.assert_close(table[seen], expected)


def test_blend_with_k_zero_changes_only_untrained_rows(trained):
    _, catalog = trained
    cold = catalog.load("cold_start_items")
    frequency, weights = catalog.load("item_frequency"), catalog.load("cold_start_weights")
    model = catalog.load("din.trained_model")
    unblended = blend_toward_category(model, frequency, cold, weights, 0.0)
    before, after = model.item_embedding.weight, unblended.item_embedding.weight
    untouched = ~torch.isin(torch.arange(len(before)), torch.as_tensor(cold["item"].to_numpy()))
    torch.testing.assert_close(after[untouched], before[untouched], rtol=0, atol=0)
    for name, value in model.state_dict().items():
        if "item_embedding" not in name:
            torch.testing.assert_close(unblended.state_dict()[name], value, rtol=0, atol=0)
    with pytest.raises(ValueError, match="blend_grid"):
        blend_toward_category(model, frequency, cold, weights, -1.0)


def test_one_model_trains_alone_and_runs_are_deterministic(trained, tmp_path):
    _, catalog = trained
    project = make_project_copy(tmp_path / "project", source=PROJECT_ROOT)
    run_pipeline(project, params=FAST_TRAINING, pipelines=["ingestion", "feature_engineering"])
    alone = run_pipeline(project, "training", FAST_TRAINING, namespaces=["din"])
    assert not (project / "data" / "06_models" / "bst").exists()
    first = catalog.load("din.training_history")
    again = alone.load("din.training_history")
    np.testing.assert_allclose(
        again[["train_loss", "validation_auc"]].to_numpy(),
        first[["train_loss", "validation_auc"]].to_numpy(),
        rtol=0,
        atol=1e-6,
    )
    # a model's own `training:` block (conf/base/parameters_training.yml) overrides the shared
    # settings in its branch: one epoch here against the shared two
    override = run_pipeline(
        project, "training", {**FAST_TRAINING, "din.training.epochs": 1}, namespaces=["din"]
    )
    assert override.load("din.training_history")["epoch"].tolist() == [1]


@pytest.mark.skipif(not has_cxx_compiler(), reason="torch.compile on the CPU needs a C++ compiler")
def test_compiled_bf16_training_learns_like_eager_float32(trained):
    """`training.compile` + `bf16_on_cpu` (the fast CPU path) reach eager float32's AUC."""
    _, catalog = trained
    spec = catalog.load("feature_spec")
    train, validation = split_tensors(catalog, "train", "validation")
    seed_everything(2024)
    model = build_model("din", **{key: spec[key] for key in FEATURE_KEYS})
    config = TrainingConfig(epochs=2, progress_bar=False, compile=True, bf16_on_cpu=True)
    _, history = fit(model, train, validation, config)
    eager = catalog.load("din.training_history")  # the pipeline's float32 DIN, same data
    assert np.isfinite(history["train_loss"]).all()
    assert history["validation_auc"].iloc[-1] > 0.6
    assert abs(history["validation_auc"].iloc[-1] - eager["validation_auc"].iloc[-1]) < 0.03


def test_length_windows_cover_every_sample_once_with_less_padding(trained):
    """`training.length_window`: each epoch still sees every sample once, in seeded order."""
    _, catalog = trained
    (train,) = split_tensors(catalog, "train")

    def epoch(window: int) -> list[torch.Tensor]:
        generator = torch.Generator().manual_seed(7)
        return train.batch_indices(32, shuffle=True, generator=generator, length_window=window)

    windowed, plain = epoch(8), epoch(0)
    assert torch.equal(torch.cat(windowed).sort().values, torch.arange(len(train)))
    assert all(torch.equal(a, b) for a, b in zip(windowed, epoch(8)))  # same seed, same order
    assert len(windowed) == len(plain) and sum(len(i) < 32 for i in windowed) <= 1

    def padded_cells(batches: list[torch.Tensor]) -> int:
        return sum(len(i) * int(train.hist_len[i].max()) for i in batches)

    assert padded_cells(windowed) < 0.9 * padded_cells(plain)
    # the order of the batches is shuffled too, not one sorted sweep per window
    widths = [int(train.hist_len[i].max()) for i in windowed]
    assert widths != sorted(widths)


def test_predict_keeps_the_splits_order(trained):
    """`predict` batches by history length but returns scores in the split's own order."""
    _, catalog = trained
    (test,) = split_tensors(catalog, "test")
    model = catalog.load("din.model").eval()
    with torch.no_grad():
        one_by_one = torch.cat(
            [torch.sigmoid(model(test.batch(torch.tensor([row])))) for row in range(len(test))]
        )
    np.testing.assert_allclose(predict(model, test, 16), one_by_one.numpy(), rtol=0, atol=1e-6)


def test_length_windowed_training_learns_like_plain_shuffling(trained):
    """BST's length windows (its parameters turn them on) reach a plain shuffle's AUC."""
    _, catalog = trained
    spec = catalog.load("feature_spec")
    train, validation = split_tensors(catalog, "train", "validation")
    aucs = []
    for window in (0, 64):
        seed_everything(2024)
        model = build_model("bst", **{key: spec[key] for key in FEATURE_KEYS})
        config = TrainingConfig(epochs=2, progress_bar=False, length_window=window)
        aucs.append(fit(model, train, validation, config)[1]["validation_auc"].iloc[-1])
    assert aucs[1] > 0.6
    assert abs(aucs[1] - aucs[0]) < 0.03


def test_lazy_adam_learns_like_dense_adam(trained):
    """Lazy Adam on every table (`training.lazy_embedding_rows: 1`) reaches dense Adam's AUC,
    with DIN's mini-batch aware L2 on, and hands back a model as built (dense lookups)."""
    _, catalog = trained
    spec = catalog.load("feature_spec")
    train, validation = split_tensors(catalog, "train", "validation")
    frequency = torch.ones(spec["n_items"] + 1)
    aucs = []
    for lazy_rows in (None, 1):
        seed_everything(2024)
        model = build_model("din", **{key: spec[key] for key in FEATURE_KEYS}, l2_weight=0.01)
        before = model.item_embedding.weight.detach().clone()
        config = TrainingConfig(epochs=2, progress_bar=False, lazy_embedding_rows=lazy_rows)
        model, history = fit(model, train, validation, config, frequency)
        aucs.append(history["validation_auc"].iloc[-1])
        assert not any(m.sparse for m in model.modules() if isinstance(m, torch.nn.Embedding))
        # the optimiser of the item table stepped: exactly the rows training looked up moved
        moved = (model.item_embedding.weight.detach() != before).any(1)
        every = train.batch(torch.arange(len(train)))
        looked_up = torch.zeros_like(moved)
        looked_up[every["target_item"]] = True
        looked_up[every["hist_item"][every["mask"]]] = True
        looked_up[0] = False  # padding
        assert torch.equal(moved, looked_up)
    assert aucs[1] > 0.6
    assert abs(aucs[1] - aucs[0]) < 0.03
