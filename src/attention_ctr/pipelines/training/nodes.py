"""Training nodes: build a model from the feature spec, fit it, apply the cold-start fallback."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import torch
from torch import nn

from attention_ctr.datasets import ParquetTable
from attention_ctr.distributed import fit_distributed
from attention_ctr.models import build_model
from attention_ctr.sequences import split_tensors
from attention_ctr.training import (
    TrainingConfig,
    blend_toward_category,
    choose_blend,
    fit,
    pick_device,
    seed_everything,
)

logger = logging.getLogger(__name__)


def training_config(training: dict, model_block: dict) -> TrainingConfig:
    """Shared training parameters, overridden by the model's own `training` block (the model's
    parameter block is `{"model": ..., "training": ...}`, e.g. `params:bst`)."""
    return TrainingConfig.from_params({**training, **(model_block.get("training") or {})})


def initialise_model(feature_spec: dict, model_block: dict, training: dict) -> nn.Module:
    """A freshly initialised, seeded model sized by the feature spec."""
    config = training_config(training, model_block)
    seed_everything(config.seed)
    sizes = {
        "n_items": feature_spec["n_items"],
        "n_categories": feature_spec["n_categories"],
        "n_behaviors": feature_spec["n_behaviors"],
        "n_time_gap_buckets": feature_spec["n_time_gap_buckets"],
        "max_history": feature_spec["max_history"],
    }
    model_params = model_block["model"]
    model = build_model(model_params["name"], **sizes, **model_params.get("options", {}))
    parameters = sum(p.numel() for p in model.parameters())
    logger.info("Built %s with %s parameters", model.name, f"{parameters:,}")
    return model


def _split(samples: ParquetTable, events: ParquetTable, feature_spec: dict, device, config):
    """A split whole or streamed, within half the memory budget (training holds two splits)."""
    return split_tensors(samples, events, feature_spec, device, config.memory_budget_mb / 2)


def fit_model(
    model: nn.Module,
    train_samples: ParquetTable,
    validation_samples: ParquetTable,
    events: ParquetTable,
    feature_spec: dict,
    item_frequency: pd.DataFrame,
    model_block: dict,
    training: dict,
) -> tuple[nn.Module, pd.DataFrame]:
    """Train on the training split with early stopping on validation AUC. The splits are read
    whole when they fit `training.memory_budget_mb`, else streamed in chunks; with
    `training.distributed`, in several processes (DistributedDataParallel; the node still runs
    once)."""
    config = training_config(training, model_block)
    seed_everything(config.seed)
    frequency = torch.as_tensor(np.concatenate([[1], item_frequency["train_count"].to_numpy()]))
    if config.distributed.enabled:
        return fit_distributed(
            model, train_samples, validation_samples, events, feature_spec, frequency, config
        )
    device = pick_device(config.device)
    logger.info("Training %s on %s", model.name, device)
    train = _split(train_samples, events, feature_spec, device, config)
    validation = _split(validation_samples, events, feature_spec, device, config)
    return fit(model, train, validation, config, frequency.to(device))


def choose_cold_start_blend(
    trained_model: nn.Module,
    validation_samples: ParquetTable,
    events: ParquetTable,
    feature_spec: dict,
    item_frequency: pd.DataFrame,
    cold_start_items: pd.DataFrame,
    cold_start_weights: pd.DataFrame,
    model_block: dict,
    training: dict,
    cold_start: dict,
) -> dict:
    """Choose the blend of rare items toward their category's average by validation AUC."""
    config = training_config(training, model_block)
    device = pick_device(config.device)
    validation = _split(validation_samples, events, feature_spec, device, config)
    choice = choose_blend(
        trained_model,
        validation,
        item_frequency,
        cold_start_items,
        cold_start_weights,
        list(cold_start["blend_grid"]),
        config.eval_batch_size,
    )
    choice["model"] = trained_model.name
    logger.info(
        "%s: cold-start blend k = %g (validation AUC %.4f; without blend %.4f)",
        trained_model.name,
        choice["k"],
        choice["validation_auc"],
        choice["validation_auc_without_blend"],
    )
    return choice


def apply_cold_start(
    trained_model: nn.Module,
    item_frequency: pd.DataFrame,
    cold_start_items: pd.DataFrame,
    cold_start_weights: pd.DataFrame,
    cold_start_blend: dict,
) -> nn.Module:
    """Items never trained take their category's average; rare ones the chosen blend."""
    return blend_toward_category(
        trained_model,
        item_frequency,
        cold_start_items,
        cold_start_weights,
        float(cold_start_blend["k"]),
    )
