"""Evaluation nodes: test and cold-start metrics, latency, attention reports, explanations.

Thin wrappers that read parameters, pick the device and prepare tensors; the evaluation itself
lives in `attention_ctr.evaluation` (the cross-model reports and plots are wired straight from
there, see `pipeline.py`).
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import torch
from torch import nn

from attention_ctr.bundle import request_scorer
from attention_ctr.evaluation import attention, candidates, comparison, explanations, metrics
from attention_ctr.evaluation.latency import compare_runtimes
from attention_ctr.evaluation.served_ranking import rank_through_scorer, raw_id_decoders
from attention_ctr.models import fingerprint
from attention_ctr.sequences import SampleTensors
from attention_ctr.training import blend_toward_category, predict

logger = logging.getLogger(__name__)


def _device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise ValueError("Parameter evaluation.device is 'cuda' but no CUDA device is available")
    return torch.device(requested)


def predict_test_split(
    model: nn.Module,
    trained_model: nn.Module,
    test_samples: pd.DataFrame,
    events: pd.DataFrame,
    feature_spec: dict,
    item_frequency: pd.DataFrame,
    cold_start_items: pd.DataFrame,
    cold_start_weights: pd.DataFrame,
    params: dict,
) -> pd.DataFrame:
    """Test-split click probabilities with the chosen cold-start blend and without it (k = 0:
    only items no training sample had take their category's average)."""
    device = _device(params["device"])
    tensors = SampleTensors(test_samples, events, feature_spec, device)
    batch_size = int(params["batch_size"])
    unblended = blend_toward_category(
        trained_model, item_frequency, cold_start_items, cold_start_weights, 0.0
    )
    counts = np.zeros(int(item_frequency["item"].to_numpy().max(initial=0)) + 1, dtype=np.int64)
    counts[item_frequency["item"].to_numpy()] = item_frequency["train_count"].to_numpy()
    return pd.DataFrame(
        {
            "user": test_samples["user"].to_numpy(),
            "item": test_samples["item"].to_numpy(),
            "label": test_samples["label"].to_numpy(np.int8),
            "item_train_count": counts[test_samples["item"].to_numpy()],
            "cold_item": test_samples["item"].isin(cold_start_items["item"]).to_numpy(),
            "probability": predict(model.to(device), tensors, batch_size),
            "probability_without_blend": predict(unblended.to(device), tensors, batch_size),
        }
    )


def compute_test_metrics(test_predictions: pd.DataFrame, model: nn.Module) -> dict:
    """`attention_ctr.evaluation.metrics.test_metrics`, with `model_sha256` naming the weights
    measured, so a promotion gate can check that the metrics and an exported graph are about
    the same model."""
    return {"model_sha256": fingerprint(model), **metrics.test_metrics(test_predictions)}


def draw_ranking_candidates(
    test_samples: pd.DataFrame, events: pd.DataFrame, item_frequency: pd.DataFrame, params: dict
) -> pd.DataFrame:
    """Each test user's held-out behaviour plus `candidates` distinct items the user never had,
    per distribution (`uniform` over all items, `popularity` by training behaviours).

    Rows share the user's test sample pointers, so every candidate is scored for the moment
    the test sample describes. Seeded: every model ranks the same lists.
    """
    distributions = list(params["distributions"])
    unknown = sorted(set(distributions) - set(candidates.CANDIDATE_DISTRIBUTIONS))
    if unknown or not distributions:
        raise ValueError(
            f"Parameter evaluation.ranking.distributions is {distributions}; expected some of "
            f"{list(candidates.CANDIDATE_DISTRIBUTIONS)}"
        )
    per_user = int(params["candidates"])
    if per_user < 1:
        raise ValueError(f"Parameter evaluation.ranking.candidates must be >= 1, got {per_user}")
    return candidates.ranking_candidates(
        test_samples,
        events,
        item_frequency,
        distributions,
        per_user,
        seed=int(params["seed"]),
        max_rounds=int(params["max_rounds"]),
    )


def rank_test_users(
    model: nn.Module,
    trained_model: nn.Module,
    ranking_candidates: pd.DataFrame,
    events: pd.DataFrame,
    item_ids: pd.DataFrame,
    category_ids: pd.DataFrame,
    behavior_ids: pd.DataFrame,
    item_frequency: pd.DataFrame,
    cold_start_items: pd.DataFrame,
    cold_start_weights: pd.DataFrame,
    feature_spec: dict,
    params: dict,
) -> dict:
    """The ranking protocol, scored as a server would: the model's request graph (exported
    here as the export pipeline does) behind `Scorer`, one request per user, raw ids in.

    Per candidate distribution: HR@K, NDCG@K, MRR, GAUC and AUC, and the history-shuffled AUC
    (see `attention_ctr.evaluation.served_ranking`).
    """
    scorer = request_scorer(
        model,
        trained_model,
        item_ids,
        category_ids,
        item_frequency,
        cold_start_items,
        cold_start_weights,
        feature_spec,
        threads=int(params["threads"]),
        cache_size=0,
    )
    decode = raw_id_decoders(item_ids, category_ids, behavior_ids)
    per_distribution = rank_through_scorer(
        scorer, ranking_candidates, events, decode, int(params["seed"])
    )
    for distribution, quality in per_distribution.items():
        logger.info(
            "%s ranking (%s, %d candidates): AUC %.4f, HR@10 %.4f, NDCG@10 %.4f, MRR %.4f, "
            "history-shuffled AUC %.4f",
            model.name,
            distribution,
            params["candidates"],
            quality["auc"],
            quality["hr@10"],
            quality["ndcg@10"],
            quality["mrr"],
            quality["history_shuffled_auc"],
        )
    return {
        "model": model.name,
        "model_sha256": fingerprint(model),
        "candidates": int(params["candidates"]),
        "seed": int(params["seed"]),
        **per_distribution,
    }


def time_inference(
    model: nn.Module,
    test_samples: pd.DataFrame,
    events: pd.DataFrame,
    feature_spec: dict,
    params: dict,
) -> dict:
    """Eager torch vs onnxruntime on the same CPU test batches, in ms per 1,000 samples.

    The model is exported in memory with `export_onnx`; both runtimes use `threads` threads,
    and the max abs difference of their logits is reported beside the timings.
    """
    threads, batch_size = int(params["threads"]), int(params["batch_size"])
    repeats = max(int(params["repeats"]), 1)
    samples = test_samples.iloc[: int(params["samples"])]
    if samples.empty:
        raise ValueError("evaluation.latency: the test split (test_samples) has no samples to time")
    tensors = SampleTensors(samples, events, feature_spec, "cpu")
    batches = [batch for batch, _ in tensors.batches(batch_size)]
    timed = compare_runtimes(model, batches, threads, repeats)
    to_ms_per_1000 = 1e6 / len(samples)
    result = {
        "samples": len(samples),
        "batch_size": batch_size,
        "threads": threads,
        "repeats": repeats,
        "torch_ms_per_1000": timed["torch_seconds"] * to_ms_per_1000,
        "onnxruntime_ms_per_1000": timed["onnxruntime_seconds"] * to_ms_per_1000,
        "onnx_max_abs_diff": timed["onnx_max_abs_diff"],
    }
    logger.info(
        "%s latency per 1,000 samples: torch %.2f ms, onnxruntime %.2f ms (max abs diff %.2g)",
        model.name,
        result["torch_ms_per_1000"],
        result["onnxruntime_ms_per_1000"],
        result["onnx_max_abs_diff"],
    )
    return result


def summarise_evaluation(
    model: nn.Module,
    test_metrics: dict,
    ranking_metrics: dict,
    cold_start_blend: dict,
    inference_latency: dict,
    training_history: pd.DataFrame,
) -> dict:
    """One model's row of the comparison, plus its per-epoch training curve for the plots."""
    return comparison.evaluation_summary(
        model.name,
        sum(parameter.numel() for parameter in model.parameters()),
        test_metrics,
        ranking_metrics,
        cold_start_blend,
        inference_latency,
        training_history,
    )


def profile_attention(
    model: nn.Module,
    test_samples: pd.DataFrame,
    events: pd.DataFrame,
    feature_spec: dict,
    user_ids: pd.DataFrame,
    params: dict,
) -> dict:
    """How a model spreads attention over the history of the first `attention.samples` test
    positives: by recency, by category, per user (see `attention_ctr.evaluation.attention`)."""
    settings = params["attention"]
    positives = test_samples[test_samples["label"] == 1].head(int(settings["samples"]))
    tensors = SampleTensors(positives, events, feature_spec, _device(params["device"]))
    arrays = attention.attention_arrays(
        model, tensors, int(params["batch_size"]), int(feature_spec["max_history"])
    )
    return attention.attention_profile(
        model.name,
        arrays,
        positives["user"].to_numpy(),
        user_ids,
        int(settings["heatmap_users"]),
    )


def draw_explanation_candidates(
    test_samples: pd.DataFrame, item_ids: pd.DataFrame, params: dict
) -> pd.DataFrame:
    """Candidate samples for a few seeded users: their test item plus distinct sampled items.

    Every candidate shares the user's test history (same pointers into `events`), so the
    models rank them for the same moment the test sample describes.
    """
    return candidates.explanation_candidates(
        test_samples,
        item_ids,
        users=int(params["users"]),
        per_user=int(params["candidates"]),
        seed=int(params["seed"]),
    )


def explain_rankings(
    model: nn.Module,
    explanation_candidates: pd.DataFrame,
    events: pd.DataFrame,
    feature_spec: dict,
    item_ids: pd.DataFrame,
    category_ids: pd.DataFrame,
    behavior_ids: pd.DataFrame,
    user_ids: pd.DataFrame,
    params: dict,
) -> dict:
    """Each chosen user's top-ranked candidates, with the behaviours that carried most attention.

    Items, categories and users are named by their raw ids.
    """
    settings = params["explanations"]
    return explanations.explain_rankings(
        model,
        explanation_candidates,
        events,
        feature_spec,
        item_ids,
        category_ids,
        behavior_ids,
        user_ids,
        top_candidates=int(settings["top_candidates"]),
        top_behaviours=int(settings["top_behaviours"]),
    )
