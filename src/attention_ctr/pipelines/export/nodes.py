"""Export nodes: ONNX graph with cold-start rows, parity gate, latency, serving bundle."""

from __future__ import annotations

import copy
import hashlib
import logging
import time

import numpy as np
import onnx
import pandas as pd
import torch
from torch import nn

from attention_ctr.models.layers import pad_positions
from attention_ctr.onnx_export import OPSET, onnx_feed, onnx_session
from attention_ctr.sequences import SampleTensors, gather_history
from attention_ctr.training import category_average

logger = logging.getLogger(__name__)


class ParityError(ValueError):
    """The ONNX graph and eager torch disagree by more than the tolerance."""


def add_cold_start_rows(
    model: nn.Module, item_ids: pd.DataFrame, cold_start_weights: pd.DataFrame
) -> nn.Module:
    """A copy of the model whose item table gains row `n_items + c` per category c (cold start).

    The row holds category c's frequency-weighted average over its warm items, the vector that
    training gave the category's cold items, so the exported graph can score an item it has
    never seen from its category alone. A category without warm items gets the plain mean of
    its items' rows. Known rows are untouched.
    """
    n_items, n_categories = int(model.config["n_items"]), int(model.config["n_categories"])
    top_category = int(item_ids["category"].to_numpy().max(initial=0))
    if len(item_ids) != n_items or top_category > n_categories:
        raise ValueError(
            f"{model.name}.model was trained on {n_items} items and {n_categories} categories, "
            f"but item_ids has {len(item_ids)} items (categories up to {top_category}): "
            "retrain after feature engineering"
        )
    table = model.item_embedding.weight.detach().cpu()
    average, has_warm = category_average(table, cold_start_weights, n_categories)
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


def _padded_batch(tensors: SampleTensors, index: torch.Tensor, length: int) -> dict:
    """Held-out samples `index`, their most recent <= `length` behaviours padded to `length`."""
    batch = gather_history(
        tensors.events,
        tensors.hist_end[index],
        tensors.hist_len[index].clamp(max=length),
        length,
        tensors.timestamp[index],
        tensors.time_gap_edges,
    )
    batch = {key: pad_positions(value, length) for key, value in batch.items()}
    batch["target_item"] = tensors.target_item[index]
    batch["target_category"] = tensors.target_category[index]
    return batch


def _history_lengths(params: dict, samples: pd.DataFrame, max_history: int) -> list[int]:
    """Parameter `history_lengths` with "median" (of the held-out split) and "max" resolved."""
    named = {
        "median": int(np.median(samples["hist_len"])) if len(samples) else 1,
        "max": max_history,
    }
    lengths = []
    for value in params["history_lengths"]:
        length = named.get(value, value)
        if not isinstance(length, int) or not 1 <= length <= max_history:
            raise ValueError(
                f"Parameter export.parity.history_lengths holds {value!r}; expected integers in "
                f"1 .. max_history ({max_history}), 'median' or 'max'"
            )
        lengths.append(length)
    return sorted(set(lengths))


@torch.inference_mode()
def check_parity(
    onnx_model: bytes,
    serving_model: nn.Module,
    test_samples: pd.DataFrame,
    events: pd.DataFrame,
    feature_spec: dict,
    params: dict,
) -> dict:
    """Max |p_onnx - p_torch| on held-out batches of several shapes; above the tolerance, fail.

    Shapes: every `batch_sizes` x `history_lengths` (1, the median history of the test split
    and `max_history` by default), plus the median-length batch with every target replaced by
    its category's cold-start row.
    """
    parity = params["parity"]
    tolerance = float(parity["tolerance"])
    name = serving_model.name
    if not len(test_samples):
        raise ValueError(f"{name}: test_samples is empty, there is nothing to check parity on")
    session = onnx_session(onnx_model, int(params["threads"]))
    model = serving_model.cpu().eval()
    max_history = int(feature_spec["max_history"])
    lengths = _history_lengths(parity, test_samples, max_history)
    sizes = sorted({int(size) for size in parity["batch_sizes"]})
    rng = np.random.default_rng(int(parity["seed"]))
    rows = rng.choice(len(test_samples), max(sizes), replace=len(test_samples) < max(sizes))
    tensors = SampleTensors(test_samples.iloc[np.sort(rows)], events, feature_spec)

    def compare(batch: dict) -> float:
        (logits,) = session.run(None, onnx_feed(session, batch))
        difference = torch.sigmoid(torch.from_numpy(logits)) - torch.sigmoid(model(batch))
        return float(difference.abs().max())

    checks = []
    for length in lengths:
        for size in sizes:
            batch = _padded_batch(tensors, torch.arange(size), length)
            checks.append({"batch_size": size, "history_length": length, "targets": "held_out"})
            checks[-1]["max_abs_diff"] = compare(batch)
    cold = _padded_batch(tensors, torch.arange(max(sizes)), lengths[len(lengths) // 2])
    cold["target_item"] = cold["target_category"] + int(model.config["n_items"])
    checks.append({"batch_size": max(sizes), "history_length": lengths[len(lengths) // 2]})
    checks[-1].update(targets="cold_start_rows", max_abs_diff=compare(cold))

    worst = max(checks, key=lambda check: check["max_abs_diff"])
    logger.info(
        "%s: ONNX parity max abs diff %.2e (tolerance %.0e)", name, worst["max_abs_diff"], tolerance
    )
    if not worst["max_abs_diff"] <= tolerance:  # also catches NaN
        raise ParityError(
            f"ONNX export of {name} fails the parity gate: probabilities differ from eager torch "
            f"by {worst['max_abs_diff']:.3g} at batch {worst['batch_size']} x history "
            f"{worst['history_length']} ({worst['targets']} targets), above the tolerance "
            f"{tolerance:g} (parameter export.parity.tolerance)"
        )
    return {
        "model": name,
        "tolerance": tolerance,
        "max_abs_diff": worst["max_abs_diff"],
        "checks": checks,
    }


def _median_seconds(run, batches: list, repeats: int) -> float:
    run(batches[0])  # warm-up: allocations, lazy initialisation
    totals = []
    for _ in range(repeats):
        started = time.perf_counter()
        for batch in batches:
            run(batch)
        totals.append(time.perf_counter() - started)
    return float(np.median(totals))


@torch.inference_mode()
def measure_latency(
    onnx_model: bytes,
    serving_model: nn.Module,
    test_samples: pd.DataFrame,
    events: pd.DataFrame,
    feature_spec: dict,
    params: dict,
) -> dict:
    """Milliseconds per 1,000 held-out samples on the CPU: eager torch vs onnxruntime."""
    latency = params["latency"]
    threads, batch_size = int(params["threads"]), int(latency["batch_size"])
    count = int(latency["samples"])
    rows = np.arange(count) % max(len(test_samples), 1)
    tensors = SampleTensors(test_samples.iloc[rows], events, feature_spec)
    batches = [tensors.batch(index) for index in torch.arange(count).split(batch_size)]
    session = onnx_session(onnx_model, threads)
    feeds = [onnx_feed(session, batch) for batch in batches]
    model = serving_model.cpu().eval()

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch_seconds = _median_seconds(model, batches, int(latency["repeats"]))
    finally:
        torch.set_num_threads(previous_threads)
    onnx_seconds = _median_seconds(
        lambda feed: session.run(None, feed), feeds, int(latency["repeats"])
    )
    per_thousand = 1000.0 / count * 1000.0
    result = {
        "threads": threads,
        "batch_size": batch_size,
        "samples": count,
        "torch_ms_per_1000": torch_seconds * per_thousand,
        "onnxruntime_ms_per_1000": onnx_seconds * per_thousand,
        "onnxruntime_speedup": torch_seconds / onnx_seconds,
    }
    logger.info(
        "%s: %.1f ms (torch) vs %.1f ms (onnxruntime) per 1,000 samples",
        serving_model.name,
        result["torch_ms_per_1000"],
        result["onnxruntime_ms_per_1000"],
    )
    return result


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


def describe_serving(
    onnx_model: bytes, serving_model: nn.Module, feature_spec: dict, parity: dict
) -> dict:
    """What a scorer needs beside the graph and the id tables (written once parity passed)."""
    session = onnx_session(onnx_model, 1)
    config = serving_model.config
    inputs = [item.name for item in session.get_inputs()]
    return {
        "model": serving_model.name,
        "config": config,
        "onnx_sha256": hashlib.sha256(onnx_model).hexdigest(),
        "inputs": inputs,
        "output": session.get_outputs()[0].name,
        "output_is": "logits (apply a sigmoid for probabilities)",
        "max_history": int(feature_spec["max_history"]),
        "time_gap_edges": [int(edge) for edge in feature_spec["time_gap_edges"]],
        "behaviors": list(feature_spec["behaviors"]),
        "n_items": int(config["n_items"]),
        "n_categories": int(config["n_categories"]),
        "cold_start_row_offset": int(config["n_items"]),
        "padding_id": 0,
        "parity_max_abs_diff": parity["max_abs_diff"],
    }


def build_export_report(onnx_model: bytes, parity: dict, latency: dict) -> dict:
    """The export report: graph size, opset, parity per shape and latency."""
    graph = onnx.load_from_string(onnx_model)
    return {
        "model": parity["model"],
        "onnx_bytes": len(onnx_model),
        "onnx_sha256": hashlib.sha256(onnx_model).hexdigest(),
        "opset": OPSET,
        "nodes": len(graph.graph.node),
        "parity": parity,
        "latency": latency,
    }
