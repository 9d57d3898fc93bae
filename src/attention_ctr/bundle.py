"""The serving bundle of a trained model: the graph's extra cold-start rows, the raw-id tables
and the request graph's metadata, as the export pipeline writes them and `attention_ctr.serving`
reads them back.

Shared by the export pipeline (which writes the bundle after its parity gate) and the
evaluation pipeline (which ranks through the same bundle in memory, `request_scorer`).
"""

from __future__ import annotations

import copy
import hashlib

import numpy as np
import pandas as pd
import torch
from torch import nn

from attention_ctr.models import fingerprint
from attention_ctr.onnx_export import export_request_onnx
from attention_ctr.runtime import onnx_session
from attention_ctr.serving import Scorer, seal, table_sha256
from attention_ctr.training import category_average


def add_cold_start_rows(
    model: nn.Module,
    trained_model: nn.Module,
    item_ids: pd.DataFrame,
    cold_start_weights: pd.DataFrame,
) -> nn.Module:
    """A copy of the model whose item table gains row `n_items + c` per category c (cold start).

    The row holds category c's frequency-weighted average over the rows training left
    (`trained_model`, before the cold-start blend): the vector the category's never-trained
    items were given, so the exported graph scores an item it has never seen from its
    category alone. A category without trained items gets the plain mean of its items' rows.
    Known rows are `model`'s, untouched.
    """
    n_items, n_categories = int(model.config["n_items"]), int(model.config["n_categories"])
    top_category = int(item_ids["category"].to_numpy().max(initial=0))
    if len(item_ids) != n_items or top_category > n_categories:
        raise ValueError(
            f"{model.name}.model was trained on {n_items} items and {n_categories} categories, "
            f"but item_ids has {len(item_ids)} items (categories up to {top_category}): "
            "retrain after feature engineering"
        )
    if trained_model.item_embedding.weight.shape != model.item_embedding.weight.shape:
        raise ValueError(
            f"{model.name}.trained_model and {model.name}.model have item tables of different "
            "shapes: they come from different training runs"
        )
    table = model.item_embedding.weight.detach().cpu()
    trained = trained_model.item_embedding.weight.detach().cpu()
    average, has_warm = category_average(trained, cold_start_weights, n_categories)
    category = torch.as_tensor(item_ids["category"].to_numpy(np.int64))
    item = torch.as_tensor(item_ids["item"].to_numpy(np.int64))
    counts = torch.bincount(category, minlength=n_categories + 1).clamp_min(1)
    mean = torch.zeros_like(average).index_add_(0, category, table[item]) / counts[:, None]
    rows = torch.where(has_warm[:, None], average, mean)[1:]  # categories 1 .. n_categories

    serving = copy.deepcopy(model).cpu().eval()
    serving.embedding.item_embedding = nn.Embedding.from_pretrained(
        torch.cat([table, rows]), freeze=True, padding_idx=0
    )
    return serving


def build_serving_tables(
    item_ids: pd.DataFrame,
    category_ids: pd.DataFrame,
    item_frequency: pd.DataFrame,
    cold_start_items: pd.DataFrame,
    cold_start_weights: pd.DataFrame,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Raw -> encoded id tables for serving: items (with category and cold flag), categories.

    `serving_items`: raw_id, item (its row in the graph's item table), category (encoded),
    train_count, cold. `serving_categories`: raw_id, category, cold_start_row (the item-table
    row an unknown item of this category maps to), cold_start_source (`warm_average`, or
    `item_mean` for a category without warm items).
    """
    n_items = len(item_ids)
    counts = item_frequency.set_index("item")["train_count"]
    items = pd.DataFrame(
        {
            "raw_id": item_ids["raw_id"].to_numpy(),
            "item": item_ids["item"].to_numpy(np.int64),
            "category": item_ids["category"].to_numpy(np.int64),
            "train_count": counts.reindex(item_ids["item"]).fillna(0).to_numpy(np.int64),
            "cold": item_ids["item"].isin(cold_start_items["item"]).to_numpy(),
        }
    )
    category = category_ids["category"].to_numpy(np.int64)
    warm = np.isin(category, cold_start_weights["category"].to_numpy())
    categories = pd.DataFrame(
        {
            "raw_id": category_ids["raw_id"].to_numpy(),
            "category": category,
            "cold_start_row": n_items + category,
            "cold_start_source": np.where(warm, "warm_average", "item_mean"),
        }
    )
    return items, categories


def request_metadata(
    onnx_request_model: bytes,
    serving_model: nn.Module,
    model: nn.Module,
    feature_spec: dict,
    items: pd.DataFrame,
    categories: pd.DataFrame,
) -> dict:
    """What `attention_ctr.serving.Scorer` needs beside the request graph and the id tables,
    with the digests of the graph and of the tables (`items`, `categories`: the serving tables
    as `Scorer` will load them). Not sealed yet: `seal` it once every field is in.

    `model_sha256` is the trained model's fingerprint (before the cold-start rows were added),
    the same one its test metrics carry.
    """
    session = onnx_session(onnx_request_model, 1)
    config = serving_model.config
    return {
        "model": serving_model.name,
        "model_sha256": fingerprint(model),
        "config": config,
        "request_onnx_sha256": hashlib.sha256(onnx_request_model).hexdigest(),
        "items_sha256": table_sha256(items),
        "categories_sha256": table_sha256(categories),
        "inputs": [item.name for item in session.get_inputs()],
        "output": session.get_outputs()[0].name,
        "output_is": "logits (apply a sigmoid for probabilities)",
        "max_history": int(feature_spec["max_history"]),
        "time_gap_edges": [int(edge) for edge in feature_spec["time_gap_edges"]],
        "behaviors": list(feature_spec["behaviors"]),
        "n_items": int(config["n_items"]),
        "n_categories": int(config["n_categories"]),
        "cold_start_row_offset": int(config["n_items"]),
        "padding_id": 0,
    }


def request_scorer(
    model: nn.Module,
    trained_model: nn.Module,
    item_ids: pd.DataFrame,
    category_ids: pd.DataFrame,
    item_frequency: pd.DataFrame,
    cold_start_items: pd.DataFrame,
    cold_start_weights: pd.DataFrame,
    feature_spec: dict,
    **options,
) -> Scorer:
    """`Scorer` over the bundle the export pipeline would write for `model`, built in memory:
    the request graph with cold-start rows, the raw-id tables and the metadata (`options` go
    to `Scorer`, e.g. `threads`, `cache_size`)."""
    serving_model = add_cold_start_rows(
        model.cpu().eval(), trained_model, item_ids, cold_start_weights
    )
    graph = export_request_onnx(serving_model)
    items, categories = build_serving_tables(
        item_ids, category_ids, item_frequency, cold_start_items, cold_start_weights
    )
    metadata = seal(request_metadata(graph, serving_model, model, feature_spec, items, categories))
    return Scorer(graph, metadata, items, categories, **options)
