"""Export nodes: parity gate, latency, serving metadata and report (the bundle's parts:
`attention_ctr.bundle`)."""

from __future__ import annotations

import hashlib
import logging
import time

import numpy as np
import onnx
import pandas as pd
import torch
from torch import nn

from attention_ctr.bundle import request_metadata
from attention_ctr.models.base import pad_positions
from attention_ctr.onnx_export import OPSET, onnx_feed
from attention_ctr.runtime import onnx_session
from attention_ctr.sequences import SampleTensors, gather_history
from attention_ctr.serving import seal

logger = logging.getLogger(__name__)


class ParityError(ValueError):
    """The ONNX graph and eager torch disagree by more than the tolerance."""


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


def as_request(batch: dict) -> tuple[dict, dict]:
    """Row 0's history against every row's target: the request graph's inputs (history
    `[1, L]`) and the same request as a batch for eager torch (history expanded to `[K, L]`)."""
    candidates = len(batch["target_item"])
    request = {key: value[:1] if value.dim() == 2 else value for key, value in batch.items()}
    tiled = {
        key: value.expand(candidates, -1) if value.dim() == 2 else value
        for key, value in request.items()
    }
    return request, tiled


@torch.inference_mode()
def check_parity(
    onnx_model: bytes,
    onnx_request_model: bytes,
    serving_model: nn.Module,
    test_samples: pd.DataFrame,
    events: pd.DataFrame,
    feature_spec: dict,
    params: dict,
) -> dict:
    """Max |p_onnx - p_torch| of both graphs on held-out batches; above the tolerance, fail.

    Shapes: every `batch_sizes` x `history_lengths` (1, the median history of the test split
    and `max_history` by default), plus the median-length batch with every target replaced by
    its category's cold-start row. The request graph gets the same targets, all against the
    first sample's history.
    """
    parity = params["parity"]
    tolerance = float(parity["tolerance"])
    name = serving_model.name
    if not len(test_samples):
        raise ValueError(f"{name}: test_samples is empty, there is nothing to check parity on")
    threads = int(params["threads"])
    sessions = {
        "batch": onnx_session(onnx_model, threads),
        "request": onnx_session(onnx_request_model, threads),
    }
    model = serving_model.cpu().eval()
    max_history = int(feature_spec["max_history"])
    lengths = _history_lengths(parity, test_samples, max_history)
    sizes = sorted({int(size) for size in parity["batch_sizes"]})
    rng = np.random.default_rng(int(parity["seed"]))
    rows = rng.choice(len(test_samples), max(sizes), replace=len(test_samples) < max(sizes))
    tensors = SampleTensors(test_samples.iloc[np.sort(rows)], events, feature_spec)

    def compare(graph: str, batch: dict) -> float:
        inputs, reference = as_request(batch) if graph == "request" else (batch, batch)
        session = sessions[graph]
        (logits,) = session.run(None, onnx_feed(session, inputs))
        difference = torch.sigmoid(torch.from_numpy(logits)) - torch.sigmoid(model(reference))
        return float(difference.abs().max())

    shapes = [(size, length, "held_out") for length in lengths for size in sizes]
    shapes.append((max(sizes), lengths[len(lengths) // 2], "cold_start_rows"))
    checks = []
    for size, length, targets in shapes:
        batch = _padded_batch(tensors, torch.arange(size), length)
        if targets == "cold_start_rows":
            batch["target_item"] = batch["target_category"] + int(model.config["n_items"])
        for graph in sessions:
            checks.append(
                {
                    "graph": graph,
                    "batch_size": size,
                    "history_length": length,
                    "targets": targets,
                    "max_abs_diff": compare(graph, batch),
                }
            )

    worst = max(checks, key=lambda check: check["max_abs_diff"])
    logger.info(
        "%s: ONNX parity max abs diff %.2e (tolerance %.0e)", name, worst["max_abs_diff"], tolerance
    )
    if not worst["max_abs_diff"] <= tolerance:  # also catches NaN
        raise ParityError(
            f"ONNX export of {name} fails the parity gate: the {worst['graph']} graph's "
            f"probabilities differ from eager torch by {worst['max_abs_diff']:.3g} at batch "
            f"{worst['batch_size']} x history {worst['history_length']} ({worst['targets']} "
            f"targets), above the tolerance {tolerance:g} (parameter export.parity.tolerance)"
        )
    return {
        "model": name,
        "tolerance": tolerance,
        "max_abs_diff": worst["max_abs_diff"],
        "checks": checks,
    }


def _median_seconds(run, inputs: list, repeats: int) -> float:
    run(inputs[0])  # warm-up: allocations, lazy initialisation
    totals = []
    for _ in range(repeats):
        started = time.perf_counter()
        for item in inputs:
            run(item)
        totals.append(time.perf_counter() - started)
    return float(np.median(totals))


@torch.inference_mode()
def measure_latency(
    onnx_model: bytes,
    onnx_request_model: bytes,
    serving_model: nn.Module,
    test_samples: pd.DataFrame,
    events: pd.DataFrame,
    feature_spec: dict,
    params: dict,
) -> dict:
    """Milliseconds per 1,000 held-out samples on the CPU, eager torch vs onnxruntime.

    `batch`: batches of `batch_size` samples, each with its own history; `request`: requests
    of `batch_size` candidates sharing one history (torch scores them as a tiled batch).
    """
    latency = params["latency"]
    threads, batch_size = int(params["threads"]), int(latency["batch_size"])
    count, repeats = int(latency["samples"]), int(latency["repeats"])
    rows = np.arange(count) % max(len(test_samples), 1)
    tensors = SampleTensors(test_samples.iloc[rows], events, feature_spec)
    batches = [tensors.batch(index) for index in torch.arange(count).split(batch_size)]
    requests = [as_request(batch) for batch in batches]
    model = serving_model.cpu().eval()
    batch_session = onnx_session(onnx_model, threads)
    request_session = onnx_session(onnx_request_model, threads)

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        seconds = {
            "torch_batch": _median_seconds(model, batches, repeats),
            "torch_request": _median_seconds(model, [tiled for _, tiled in requests], repeats),
        }
    finally:
        torch.set_num_threads(previous_threads)
    for graph, session, inputs in (
        ("batch", batch_session, batches),
        ("request", request_session, [request for request, _ in requests]),
    ):
        feeds = [onnx_feed(session, item) for item in inputs]
        seconds[f"onnxruntime_{graph}"] = _median_seconds(
            lambda feed, session=session: session.run(None, feed), feeds, repeats
        )
    result = {"threads": threads, "batch_size": batch_size, "samples": count}
    result.update({f"{key}_ms_per_1000": value * 1e6 / count for key, value in seconds.items()})
    for graph in ("batch", "request"):
        result[f"{graph}_speedup"] = seconds[f"torch_{graph}"] / seconds[f"onnxruntime_{graph}"]
    logger.info(
        "%s per 1,000 samples: batches %.1f ms (torch) vs %.1f ms (onnxruntime), requests of "
        "%d candidates %.1f ms vs %.1f ms",
        serving_model.name,
        result["torch_batch_ms_per_1000"],
        result["onnxruntime_batch_ms_per_1000"],
        batch_size,
        result["torch_request_ms_per_1000"],
        result["onnxruntime_request_ms_per_1000"],
    )
    return result


def describe_serving(
    onnx_model: bytes,
    onnx_request_model: bytes,
    serving_model: nn.Module,
    model: nn.Module,
    feature_spec: dict,
    parity: dict,
    serving_items: pd.DataFrame,
    serving_categories: pd.DataFrame,
) -> dict:
    """The serving metadata, written once parity passed and sealing the bundle: the request
    graph's, the sha256 of both graphs and of both tables, the parity figures and
    `metadata_sha256` (see "Bundle integrity" in `attention_ctr.serving`)."""
    metadata = request_metadata(
        onnx_request_model, serving_model, model, feature_spec, serving_items, serving_categories
    )
    return seal(
        {
            **metadata,
            "onnx_sha256": hashlib.sha256(onnx_model).hexdigest(),
            "parity_max_abs_diff": parity["max_abs_diff"],
            "parity_tolerance": parity["tolerance"],
        }
    )


def build_export_report(
    onnx_model: bytes, onnx_request_model: bytes, parity: dict, latency: dict
) -> dict:
    """The export report: graph sizes, opset, parity per graph and shape, latency."""
    graphs = {"batch": onnx_model, "request": onnx_request_model}
    return {
        "model": parity["model"],
        "opset": OPSET,
        "graphs": {
            name: {
                "bytes": len(graph),
                "sha256": hashlib.sha256(graph).hexdigest(),
                "nodes": len(onnx.load_from_string(graph).graph.node),
            }
            for name, graph in graphs.items()
        },
        "parity": parity,
        "latency": latency,
    }
