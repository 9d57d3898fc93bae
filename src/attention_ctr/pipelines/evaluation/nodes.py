"""Evaluation nodes: test and cold-start metrics, latency, attention reports, explanations, plots.

Every node is a pure function of tables, models and parameters. Figures are built on
`matplotlib.figure.Figure` with an Agg canvas, never through pyplot, so no global figure state
is created and nothing stays open after the catalog has saved a figure.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable

import numpy as np
import pandas as pd
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from sklearn.metrics import roc_curve
from torch import nn

from attention_ctr.models import fingerprint
from attention_ctr.onnx_export import (
    OUTPUT_NAME,
    export_onnx,
    export_request_onnx,
    onnx_feed,
    onnx_session,
)
from attention_ctr.pipelines.export.nodes import (
    add_cold_start_rows,
    build_serving_tables,
    request_metadata,
)
from attention_ctr.pipelines.feature_engineering.nodes import SAMPLE_COLUMNS
from attention_ctr.ranking import (
    derangement,
    draw_distinct_unseen,
    popularity_sampler,
    ranking_quality,
    uniform_sampler,
)
from attention_ctr.sequences import SampleTensors
from attention_ctr.serving import Scorer
from attention_ctr.training import blend_toward_category, predict, score

logger = logging.getLogger(__name__)

# The measured counterpart of the design brief's "cosine / single head / multi-head /
# self-attention" table: which kind of attention each model puts over the history.
ATTENTION_TYPES = {
    "pooling": "none (mean pooling)",
    "din": "target attention (MLP activation unit)",
    "dien": "attention-gated GRU (AUGRU)",
    "bst": "multi-head self-attention (Transformer)",
}
WITHOUT_ATTENTION = {"pooling"}

# Behaviour codes of the supported logs, as the noun an explanation uses.
BEHAVIOUR_NOUNS = {"pv": "view", "cart": "cart addition", "fav": "favourite", "buy": "purchase"}

# comparison column -> (markdown header, number format)
COMPARISON_COLUMNS = {
    "model": ("model", "{}"),
    "attention": ("attention", "{}"),
    "test_auc": ("AUC", "{:.4f}"),
    "test_gauc": ("GAUC", "{:.4f}"),
    "test_logloss": ("logloss", "{:.4f}"),
    "cold_start_blend_k": ("blend k", "{:g}"),
    "uniform_auc": ("rank AUC (uniform)", "{:.4f}"),
    "uniform_history_shuffled_auc": ("shuffled AUC (uniform)", "{:.4f}"),
    "uniform_hr@10": ("HR@10 (uniform)", "{:.4f}"),
    "uniform_ndcg@10": ("NDCG@10 (uniform)", "{:.4f}"),
    "uniform_mrr": ("MRR (uniform)", "{:.4f}"),
    "popularity_auc": ("rank AUC (popularity)", "{:.4f}"),
    "popularity_history_shuffled_auc": ("shuffled AUC (popularity)", "{:.4f}"),
    "popularity_hr@10": ("HR@10 (popularity)", "{:.4f}"),
    "parameters": ("parameters", "{:,}"),
    "training_seconds": ("training s", "{:.1f}"),
    "torch_ms_per_1000": ("torch ms/1k", "{:.2f}"),
    "onnxruntime_ms_per_1000": ("ORT ms/1k", "{:.2f}"),
}
RANKING_COLUMNS = ("auc", "gauc", "hr@1", "hr@5", "hr@10", "ndcg@5", "ndcg@10", "mrr")


# ---------------------------------------------------------------- metrics
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


def group_auc(users: np.ndarray, labels: np.ndarray, scores: np.ndarray) -> tuple[float, int]:
    """GAUC: per-user AUC averaged with impression weights over users with both classes.

    Per-user AUC is the Mann-Whitney statistic from within-user average ranks (ties count
    one half, as in scikit-learn). Returns (GAUC, users counted); NaN when no user counts.
    """
    frame = pd.DataFrame(
        {
            "user": np.asarray(users),
            "label": np.asarray(labels, dtype=np.int64),
            "score": np.asarray(scores, dtype=np.float64),
        }
    )
    frame["rank"] = frame.groupby("user")["score"].rank()
    frame["positive_rank"] = frame["rank"] * frame["label"]
    per_user = frame.groupby("user").agg(
        impressions=("label", "size"),
        positives=("label", "sum"),
        positive_rank=("positive_rank", "sum"),
    )
    negatives = per_user["impressions"] - per_user["positives"]
    counted = per_user[(per_user["positives"] > 0) & (negatives > 0)]
    if counted.empty:
        return math.nan, 0
    positives = counted["positives"]
    auc = (counted["positive_rank"] - positives * (positives + 1) / 2) / (
        positives * (counted["impressions"] - positives)
    )
    weights = counted["impressions"]
    return float((auc * weights).sum() / weights.sum()), len(counted)


def _finite_or_none(value: float) -> float | None:
    """JSON has no NaN: an undefined metric is written as null."""
    return None if value is None or not math.isfinite(value) else float(value)


def ranking_metrics(users: np.ndarray, labels: np.ndarray, probabilities: np.ndarray) -> dict:
    """AUC, GAUC and logloss of one slice of samples (null where undefined)."""
    labels = np.asarray(labels)
    if not len(labels):
        return {
            "samples": 0,
            "positives": 0,
            "auc": None,
            "gauc": None,
            "gauc_users": 0,
            "logloss": None,
        }
    auc_and_logloss = score(labels, probabilities)
    gauc, gauc_users = group_auc(users, labels, probabilities)
    return {
        "samples": len(labels),
        "positives": int(labels.sum()),
        "auc": _finite_or_none(auc_and_logloss["auc"]),
        "gauc": _finite_or_none(gauc),
        "gauc_users": gauc_users,
        "logloss": auc_and_logloss["logloss"],
    }


# Buckets of the target item's training behaviours: (label, lowest count, highest count).
FREQUENCY_BUCKETS = (("0", 0, 0), ("1-4", 1, 4), ("5-19", 5, 19), ("20+", 20, math.inf))


def compute_test_metrics(test_predictions: pd.DataFrame, model: nn.Module) -> dict:
    """Metrics on the test split, with the cold-start blend and without it, overall and per
    training-frequency bucket of the target item, and on the never-trained (cold) items.

    `model_sha256` names the weights measured, so a promotion gate can check that the metrics
    and an exported graph are about the same model.
    """

    def metrics(rows: pd.DataFrame, column: str) -> dict:
        return ranking_metrics(
            rows["user"].to_numpy(), rows["label"].to_numpy(), rows[column].to_numpy()
        )

    def both(rows: pd.DataFrame) -> dict:
        return {
            "with_blend": metrics(rows, "probability"),
            "without_blend": metrics(rows, "probability_without_blend"),
        }

    count = test_predictions["item_train_count"]
    buckets = {
        label: both(test_predictions[(count >= low) & (count <= high)])
        for label, low, high in FREQUENCY_BUCKETS
    }
    return {
        "model_sha256": fingerprint(model),
        "test": metrics(test_predictions, "probability"),
        "test_without_blend": metrics(test_predictions, "probability_without_blend"),
        "by_item_frequency": buckets,
        "cold_items": metrics(test_predictions[test_predictions["cold_item"]], "probability"),
    }


# ---------------------------------------------------------------- ranking protocol
CANDIDATE_DISTRIBUTIONS = ("uniform", "popularity")


def draw_ranking_candidates(
    test_samples: pd.DataFrame, events: pd.DataFrame, item_frequency: pd.DataFrame, params: dict
) -> pd.DataFrame:
    """Each test user's held-out behaviour plus `candidates` distinct items the user never had,
    per distribution (`uniform` over all items, `popularity` by training behaviours).

    Rows share the user's test sample pointers, so every candidate is scored for the moment
    the test sample describes. Seeded: every model ranks the same lists.
    """
    distributions = list(params["distributions"])
    unknown = sorted(set(distributions) - set(CANDIDATE_DISTRIBUTIONS))
    if unknown or not distributions:
        raise ValueError(
            f"Parameter evaluation.ranking.distributions is {distributions}; expected some of "
            f"{list(CANDIDATE_DISTRIBUTIONS)}"
        )
    per_user = int(params["candidates"])
    if per_user < 1:
        raise ValueError(f"Parameter evaluation.ranking.candidates must be >= 1, got {per_user}")
    positives = test_samples[test_samples["label"] == 1].sort_values("user", kind="stable")
    items = item_frequency["item"].to_numpy(np.int64)
    stride = len(items) + 1
    seen = np.unique(events["user"].to_numpy(np.int64) * stride + events["item"].to_numpy())
    item_category = np.zeros(stride, dtype=np.int64)
    item_category[items] = item_frequency["category"].to_numpy()
    samplers = {
        "uniform": uniform_sampler(items),
        "popularity": popularity_sampler(items, item_frequency["train_count"].to_numpy()),
    }
    frames = []
    for distribution in distributions:
        rng = np.random.default_rng(
            [int(params["seed"]), CANDIDATE_DISTRIBUTIONS.index(distribution)]
        )
        drawn = draw_distinct_unseen(
            positives["user"].to_numpy(),
            per_user,
            seen,
            stride,
            samplers[distribution],
            rng,
            int(params["max_rounds"]),
        )
        lists = np.concatenate([positives["item"].to_numpy(np.int64)[:, None], drawn], axis=1)
        rows = positives.loc[positives.index.repeat(lists.shape[1])].reset_index(drop=True)
        rows["item"] = lists.reshape(-1)
        rows["category"] = item_category[rows["item"].to_numpy()]
        rows["label"] = (np.arange(len(rows)) % lists.shape[1] == 0).astype(np.int8)
        rows = rows[rows["item"] > 0]  # slots no unseen item was found for
        frames.append(rows[SAMPLE_COLUMNS].assign(distribution=distribution))
    return pd.concat(frames, ignore_index=True)


def _typed_decoder(ids: pd.DataFrame, code_column: str, raw_column: str = "raw_id") -> np.ndarray:
    """Encoded id (its index) -> raw id, keeping the raw ids' dtype as a caller passes them
    (index 0, padding, repeats the first raw id: it is never looked up)."""
    codes = ids[code_column].to_numpy(np.int64)
    raw = ids[raw_column].to_numpy()
    decoded = np.empty(int(codes.max(initial=0)) + 1, dtype=raw.dtype)
    decoded[0] = raw[0] if len(raw) else decoded[0]
    decoded[codes] = raw
    return decoded


def _request_histories(positives: pd.DataFrame, events: pd.DataFrame, decode: dict) -> list:
    """Each positive's history in raw ids, as a server receives it (oldest first)."""
    arrays = {name: events[name].to_numpy() for name in ("item", "category", "behavior")}
    stamps = events["timestamp"].to_numpy(np.int64)
    histories = []
    for end, length, now in positives[["hist_end", "hist_len", "timestamp"]].itertuples(
        index=False
    ):
        window = slice(int(end) - int(length), int(end))
        histories.append(
            {
                "history_items": decode["item"][arrays["item"][window]],
                "history_categories": decode["category"][arrays["category"][window]],
                "history_behaviors": decode["behavior"][arrays["behavior"][window]],
                "history_timestamps": stamps[window],
                "now": int(now),
            }
        )
    return histories


def _score_lists(scorer: Scorer, rows: pd.DataFrame, histories: list, donor: np.ndarray, decode):
    """Scores of every candidate list (one request per user), with user i's list scored
    against the history of user `donor[i]`."""
    user = rows["user"].to_numpy()
    starts = np.flatnonzero(np.r_[True, user[1:] != user[:-1]])
    stops = np.r_[starts[1:], len(rows)]
    items = decode["item"][rows["item"].to_numpy()]
    categories = decode["category"][rows["category"].to_numpy()]
    scores = np.empty(len(rows), dtype=np.float64)
    for user, (start, stop) in enumerate(zip(starts, stops)):
        scores[start:stop] = scorer.score(
            candidate_items=items[start:stop],
            candidate_categories=categories[start:stop],
            **histories[donor[user]],
        )
    return scores


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
    (every user's candidates scored against another user's history, a derangement): a model
    that loses nothing there does not use the history.
    """
    serving_model = add_cold_start_rows(
        model.cpu().eval(), trained_model, item_ids, cold_start_weights
    )
    graph = export_request_onnx(serving_model)
    items, categories = build_serving_tables(
        item_ids, category_ids, item_frequency, cold_start_items, cold_start_weights
    )
    scorer = Scorer(
        graph,
        request_metadata(graph, serving_model, model, feature_spec),
        items,
        categories,
        threads=int(params["threads"]),
        cache_size=0,
    )
    decode = {
        "item": _typed_decoder(item_ids, "item"),
        "category": _typed_decoder(category_ids, "category"),
        "behavior": _typed_decoder(behavior_ids, "code", "behavior").astype(str),
    }
    result = {
        "model": model.name,
        "model_sha256": fingerprint(model),
        "candidates": int(params["candidates"]),
        "seed": int(params["seed"]),
    }
    for distribution, rows in ranking_candidates.groupby("distribution", sort=False):
        rows = rows.reset_index(drop=True)
        positives = rows[rows["label"] == 1]
        histories = _request_histories(positives, events, decode)
        own = np.arange(len(positives))
        shuffle = derangement(len(positives), np.random.default_rng(int(params["seed"])))
        scores = _score_lists(scorer, rows, histories, own, decode)
        shuffled = _score_lists(scorer, rows, histories, shuffle, decode)
        quality = ranking_quality(rows["user"], rows["label"], scores)
        shuffled_quality = ranking_quality(rows["user"], rows["label"], shuffled)
        quality["history_shuffled_auc"] = shuffled_quality["auc"]
        quality["history_shuffled_gauc"] = shuffled_quality["gauc"]
        result[str(distribution)] = quality
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
    return result


# ---------------------------------------------------------------- latency
def _seconds(run: Callable[[], object]) -> float:
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


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
    model = model.cpu().eval()
    session = onnx_session(export_onnx(model), threads)
    feeds = [onnx_feed(session, batch) for batch in batches]  # conversion is not timed

    def run_torch() -> list[torch.Tensor]:
        return [model(batch) for batch in batches]

    def run_onnx() -> list[np.ndarray]:
        return [session.run([OUTPUT_NAME], feed)[0] for feed in feeds]

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            # Untimed first passes: warm-up, and the outputs for the parity figure.
            torch_logits = torch.cat(run_torch()).numpy()
            onnx_logits = np.concatenate(run_onnx())
            # Interleaved passes, best of each: on a shared host noise only ever adds time,
            # and interleaving exposes both runtimes to the same load.
            timings = [(_seconds(run_torch), _seconds(run_onnx)) for _ in range(repeats)]
    finally:
        torch.set_num_threads(previous_threads)
    torch_seconds, onnx_seconds = np.min(timings, axis=0)
    to_ms_per_1000 = 1e6 / len(samples)
    result = {
        "samples": len(samples),
        "batch_size": batch_size,
        "threads": threads,
        "repeats": repeats,
        "torch_ms_per_1000": float(torch_seconds * to_ms_per_1000),
        "onnxruntime_ms_per_1000": float(onnx_seconds * to_ms_per_1000),
        "onnx_max_abs_diff": float(np.abs(onnx_logits - torch_logits).max()),
    }
    logger.info(
        "%s latency per 1,000 samples: torch %.2f ms, onnxruntime %.2f ms (max abs diff %.2g)",
        model.name,
        result["torch_ms_per_1000"],
        result["onnxruntime_ms_per_1000"],
        result["onnx_max_abs_diff"],
    )
    return result


# ---------------------------------------------------------------- comparison
def summarise_evaluation(
    model: nn.Module,
    test_metrics: dict,
    ranking_metrics: dict,
    cold_start_blend: dict,
    inference_latency: dict,
    training_history: pd.DataFrame,
) -> dict:
    """One model's row of the comparison, plus its per-epoch training curve for the plots."""
    needed = {"epoch", "train_loss", "validation_auc", "train_seconds"}
    missing = needed - set(training_history.columns)
    if missing:
        raise ValueError(
            f"{model.name}.training_history lacks column(s) {sorted(missing)}; "
            "run the training pipeline again"
        )
    ranking = {
        f"{distribution}_{key}": ranking_metrics.get(distribution, {}).get(key)
        for distribution in CANDIDATE_DISTRIBUTIONS
        for key in (*RANKING_COLUMNS, "history_shuffled_auc")
    }
    return {
        "model": model.name,
        "attention": ATTENTION_TYPES.get(model.name, "unknown"),
        "test_auc": test_metrics["test"]["auc"],
        "test_gauc": test_metrics["test"]["gauc"],
        "test_logloss": test_metrics["test"]["logloss"],
        "test_auc_without_blend": test_metrics["test_without_blend"]["auc"],
        "cold_start_blend_k": cold_start_blend["k"],
        "cold_start_blend_grid": cold_start_blend["grid"],
        "by_item_frequency": {
            bucket: {kind: values["auc"] for kind, values in both.items()}
            for bucket, both in test_metrics["by_item_frequency"].items()
        },
        "by_item_frequency_samples": {
            bucket: both["with_blend"]["samples"]
            for bucket, both in test_metrics["by_item_frequency"].items()
        },
        **ranking,
        "ranking_candidates": ranking_metrics.get("candidates"),
        "parameters": int(sum(p.numel() for p in model.parameters())),
        # Training time is the sum of the epochs' training passes (validation not included).
        "training_seconds": float(training_history["train_seconds"].sum()),
        "epochs_trained": len(training_history),
        "best_validation_auc": _finite_or_none(training_history["validation_auc"].max()),
        **{
            key: inference_latency[key]
            for key in ("torch_ms_per_1000", "onnxruntime_ms_per_1000", "onnx_max_abs_diff")
        },
        "latency_setup": {
            key: inference_latency[key] for key in ("samples", "batch_size", "threads", "repeats")
        },
        "training_curve": {
            column: training_history[column].astype(float).tolist()
            for column in ("epoch", "train_loss", "validation_auc")
        },
    }


def _cell(value: object, number_format: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return number_format.format(value)


def compare_models(**summaries: dict) -> tuple[dict, str]:
    """The comparison table of every model, as JSON and as markdown."""
    rows = [
        {
            **{column: summary[column] for column in COMPARISON_COLUMNS},
            **{
                f"{distribution}_{key}": summary[f"{distribution}_{key}"]
                for distribution in CANDIDATE_DISTRIBUTIONS
                for key in RANKING_COLUMNS
            },
            "test_auc_without_blend": summary["test_auc_without_blend"],
            "cold_start_blend_grid": summary["cold_start_blend_grid"],
            "by_item_frequency": summary["by_item_frequency"],
            "by_item_frequency_samples": summary["by_item_frequency_samples"],
            "epochs_trained": summary["epochs_trained"],
            "best_validation_auc": summary["best_validation_auc"],
            "onnx_max_abs_diff": summary["onnx_max_abs_diff"],
        }
        for summary in summaries.values()
    ]
    first = next(iter(summaries.values()), {})
    setup = first.get("latency_setup", {})
    note = (
        "AUC, GAUC, logloss: the test split (each user's last behaviour and its sampled "
        "negatives). Rank: each test user's last behaviour against "
        f"{first.get('ranking_candidates')} items the user never had, drawn uniformly or by "
        "training popularity, scored through the exported request graph behind `Scorer` in "
        "raw ids; shuffled AUC: the same lists scored against another user's history. "
        "Blend k: the cold-start shrinkage chosen on "
        f"validation (0: none). Latency: eager torch and onnxruntime on the CPU, "
        f"{setup.get('threads')} threads, batches of {setup.get('batch_size')}, best of "
        f"{setup.get('repeats')} interleaved passes over {setup.get('samples')} test samples; "
        "ms per 1,000 samples. Training s: sum of the epochs' training passes."
    )
    headers = [header for header, _ in COMPARISON_COLUMNS.values()]
    lines = [
        "# Model comparison",
        "",
        "| " + " | ".join(headers) + " |",
        "|" + "|".join(" --- " for _ in headers) + "|",
    ]
    for row in rows:
        cells = [_cell(row[key], fmt) for key, (_, fmt) in COMPARISON_COLUMNS.items()]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", note, ""]
    buckets = [label for label, _, _ in FREQUENCY_BUCKETS]
    samples = first.get("by_item_frequency_samples", {})
    lines += [
        "## Test AUC by the target item's training behaviours (with / without the blend)",
        "",
        "| model | " + " | ".join(f"{b} ({samples.get(b, 0)} samples)" for b in buckets) + " |",
        "|" + "|".join(" --- " for _ in range(len(buckets) + 1)) + "|",
    ]
    for row in rows:
        cells = [
            f"{_cell(row['by_item_frequency'][b]['with_blend'], '{:.4f}')} / "
            f"{_cell(row['by_item_frequency'][b]['without_blend'], '{:.4f}')}"
            for b in buckets
        ]
        lines.append(f"| {row['model']} | " + " | ".join(cells) + " |")
    lines.append("")
    return {"columns": list(COMPARISON_COLUMNS), "rows": rows, "note": note}, "\n".join(lines)


# ---------------------------------------------------------------- attention profile
def _pad_columns(values: np.ndarray, width: int, fill: float | bool) -> np.ndarray:
    padded = np.full((values.shape[0], width), fill, dtype=values.dtype)
    padded[:, : values.shape[1]] = values
    return padded


def _decoder(ids: pd.DataFrame, code_column: str, raw_column: str = "raw_id") -> np.ndarray:
    """Array mapping an encoded id (its index) to its raw id; index 0 (padding) maps to None."""
    codes = ids[code_column].to_numpy(np.int64)
    raw = np.full(int(codes.max(initial=0)) + 1, None, dtype=object)
    raw[codes] = ids[raw_column].to_numpy()
    return raw


def _plain(value: object) -> object:
    """A numpy scalar as the Python value JSON can hold."""
    return value.item() if isinstance(value, np.generic) else value


@torch.no_grad()
def _attention_arrays(
    model: nn.Module, tensors: SampleTensors, batch_size: int, width: int
) -> dict[str, np.ndarray]:
    """Attention `[N, width]` over each sample's history, with mask and same-category flags."""
    model.eval()
    parts: dict[str, list[np.ndarray]] = {"weight": [], "mask": [], "same_category": []}
    for batch, _ in tensors.batches(batch_size):
        mask = batch["mask"]
        same = (batch["hist_category"] == batch["target_category"][:, None]) & mask
        parts["weight"].append(_pad_columns(model.attention(batch).float().cpu().numpy(), width, 0))
        parts["mask"].append(_pad_columns(mask.cpu().numpy(), width, False))
        parts["same_category"].append(_pad_columns(same.cpu().numpy(), width, False))
    return {key: np.concatenate(value) for key, value in parts.items()}


def _mean_or_none(values: np.ndarray) -> float | None:
    return _finite_or_none(float(values.mean())) if values.size else None


def profile_attention(
    model: nn.Module,
    test_samples: pd.DataFrame,
    events: pd.DataFrame,
    feature_spec: dict,
    user_ids: pd.DataFrame,
    params: dict,
) -> dict:
    """How a model spreads attention over the history: by recency, by category, per user.

    Weights are compared as shares of the history's total absolute weight (DIN's raw scores
    are unnormalised and may be negative), and as relative weight = share * history length,
    where 1 is what uniform pooling gives every behaviour.
    """
    settings = params["attention"]
    positives = test_samples[test_samples["label"] == 1].head(int(settings["samples"]))
    width = int(feature_spec["max_history"])
    tensors = SampleTensors(positives, events, feature_spec, _device(params["device"]))
    arrays = _attention_arrays(model, tensors, int(params["batch_size"]), width)
    magnitude = np.abs(arrays["weight"]) * arrays["mask"]
    total = magnitude.sum(1)
    usable = total > 0  # an all-zero row has no distribution to report
    mask, same = arrays["mask"][usable], arrays["same_category"][usable]
    length = mask.sum(1)
    share = magnitude[usable] / total[usable, None]
    relative = share * length[:, None]
    other = mask & ~same
    mixed = same.any(1) & other.any(1)  # histories holding both kinds of behaviour

    # back[i, p]: how many behaviours position p lies before sample i's target (0 = latest).
    back = length[:, None] - 1 - np.arange(width)[None, :]
    counts = np.bincount(back[mask], minlength=width)
    sums = np.bincount(back[mask], weights=relative[mask], minlength=width)
    recency = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)

    # Heat map rows: the longest histories; column j holds the behaviour j before the target.
    chosen = np.argsort(-length, kind="stable")[: int(settings["heatmap_users"])]
    position = back[chosen]  # the same formula maps "j back" to its position
    real = position >= 0
    position = np.clip(position, 0, None)
    heat = np.where(real, np.take_along_axis(share[chosen], position, 1), np.nan)
    heat_same = real & np.take_along_axis(same[chosen], position, 1)
    raw_user = _decoder(user_ids, "user")
    heat_users = positives["user"].to_numpy()[usable][chosen]
    return {
        "model": model.name,
        "attention": ATTENTION_TYPES.get(model.name, "unknown"),
        "has_attention": model.name not in WITHOUT_ATTENTION,
        "samples": int(usable.sum()),
        "recency_relative_weight": [_finite_or_none(value) for value in recency],
        "recency_samples": counts.tolist(),
        "same_category_relative_weight": _mean_or_none(relative[same]),
        "other_category_relative_weight": _mean_or_none(relative[other]),
        "same_category_attention_share": _mean_or_none((share * same).sum(1)[mixed]),
        "same_category_history_share": _mean_or_none((same.sum(1) / length)[mixed]),
        "heatmap": {
            "users": [_plain(raw_user[user]) for user in heat_users],
            "share": [[_finite_or_none(value) for value in row] for row in heat],
            "same_category": heat_same.tolist(),
        },
    }


def report_attention_distribution(**attention_profiles: dict) -> dict:
    """Every model's attention distribution (recency, same category vs other) as one report."""
    return {
        name: {key: value for key, value in profile.items() if key != "heatmap"}
        for name, profile in attention_profiles.items()
    }


# ---------------------------------------------------------------- explanations
def draw_explanation_candidates(
    test_samples: pd.DataFrame, item_ids: pd.DataFrame, params: dict
) -> pd.DataFrame:
    """Candidate samples for a few seeded users: their test item plus distinct sampled items.

    Every candidate shares the user's test history (same pointers into `events`), so the
    models rank them for the same moment the test sample describes.
    """
    positives = test_samples[test_samples["label"] == 1]
    rng = np.random.default_rng(int(params["seed"]))
    n_users = min(int(params["users"]), len(positives))
    chosen = positives.iloc[np.sort(rng.choice(len(positives), n_users, replace=False))]
    n_items = len(item_ids)
    sampled_count = min(int(params["candidates"]) - 1, n_items - 1)
    if sampled_count < 0:
        raise ValueError("Parameter evaluation.explanations.candidates must be at least 1")
    target = chosen["item"].to_numpy(np.int64)
    # Codes 1 .. n_items - 1 without repeats, shifted past the target: never the target itself.
    drawn = np.stack(
        [rng.choice(n_items - 1, sampled_count, replace=False) + 1 for _ in range(n_users)]
    ).reshape(n_users, sampled_count)
    items = np.concatenate([target[:, None], drawn + (drawn >= target[:, None])], axis=1)
    item_category = np.zeros(n_items + 1, dtype=np.int64)
    item_category[item_ids["item"].to_numpy()] = item_ids["category"].to_numpy()
    candidates = chosen.loc[chosen.index.repeat(items.shape[1])].reset_index(drop=True)
    candidates["item"] = items.reshape(-1)
    candidates["category"] = item_category[candidates["item"].to_numpy()]
    candidates["label"] = (np.arange(len(candidates)) % items.shape[1] == 0).astype(np.int8)
    return candidates[SAMPLE_COLUMNS]


def _time_before(seconds: int) -> str:
    """`seconds` as the largest whole unit, e.g. "2 hours before"."""
    for unit, size in (("week", 604800), ("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size:
            count = int(seconds // size)
            return f"{count} {unit}{'s' if count != 1 else ''} before"
    return "moments before"


def _ordinal(number: int) -> str:
    suffix = (
        "th" if 10 <= number % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(number % 10, "th")
    )
    return f"{number}{suffix}"


def _reason(reason: dict) -> str:
    """E.g. "your 2 views of item 88 (category 17, last 2 hours before; 31% of the attention)"."""
    noun = BEHAVIOUR_NOUNS.get(reason["behavior"], reason["behavior"])
    count = reason["count"]
    what = f"{count} {noun}s" if count > 1 else noun
    when = ("last " if count > 1 else "") + _time_before(reason["seconds_before"])
    return (
        f"your {what} of item {reason['item']} (category {reason['category']}, {when}; "
        f"{reason['attention_share']:.0%} of the attention)"
    )


def _explanation(
    recommendation: dict, candidates: int, history_length: int, attention: bool
) -> str:
    head = (
        f"Item {recommendation['item']} (category {recommendation['category']}) ranks "
        f"{_ordinal(recommendation['rank'])} of {candidates} candidates "
        f"(click probability {recommendation['probability']:.2f})"
    )
    if not attention:
        return (
            f"{head}. The pooling baseline has no attention: it weighs all {history_length} "
            "behaviours of your history equally, so no single behaviour explains this rank."
        )
    reasons = " and ".join(_reason(reason) for reason in recommendation["because"])
    return f"{head} mainly because of {reasons}."


def _strongest_behaviours(
    candidates: pd.DataFrame, events: pd.DataFrame, weight: np.ndarray, mask: np.ndarray, top: int
) -> pd.DataFrame:
    """Per candidate row, its `top` (item, behaviour) pairs of the history by summed weight.

    Repeats of one behaviour on one item are one reason (count, latest time, summed share).
    Ranked by the signed weight (DIN's raw weights can be negative); the share is of the
    history's total absolute weight.
    """
    row, position = np.nonzero(mask)
    event = (candidates["hist_end"] - candidates["hist_len"]).to_numpy()[row] + position
    magnitude = np.abs(weight) * mask
    share = magnitude / np.maximum(magnitude.sum(1, keepdims=True), np.finfo(np.float32).tiny)
    behaviours = pd.DataFrame(
        {
            "row": row,
            "item": events["item"].to_numpy()[event],
            "category": events["category"].to_numpy()[event],
            "behavior": events["behavior"].to_numpy()[event],
            "timestamp": events["timestamp"].to_numpy()[event],
            "weight": weight[row, position],
            "share": share[row, position],
        }
    )
    reasons = behaviours.groupby(["row", "item", "category", "behavior"], as_index=False).agg(
        weight=("weight", "sum"),
        attention_share=("share", "sum"),
        count=("weight", "size"),
        latest=("timestamp", "max"),
    )
    reasons["seconds_before"] = (
        candidates["timestamp"].to_numpy()[reasons["row"].to_numpy()] - reasons["latest"]
    )
    reasons = reasons.sort_values(["row", "weight"], ascending=[True, False], kind="stable")
    return reasons.groupby("row").head(top)


@torch.no_grad()
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
    model = model.cpu().eval()
    candidates = explanation_candidates.reset_index(drop=True)
    tensors = SampleTensors(candidates, events, feature_spec, "cpu")
    batch = tensors.batch(torch.arange(len(tensors)))
    candidates["probability"] = torch.sigmoid(model(batch).float()).numpy()
    candidates["rank"] = (
        candidates.groupby("user")["probability"].rank(ascending=False, method="first").astype(int)
    )
    has_attention = model.name not in WITHOUT_ATTENTION
    strongest = _strongest_behaviours(
        candidates,
        events,
        model.attention(batch).float().numpy(),
        batch["mask"].numpy(),
        int(settings["top_behaviours"]),
    )
    raw_item, raw_category = _decoder(item_ids, "item"), _decoder(category_ids, "category")
    raw_behavior = _decoder(behavior_ids, "code", "behavior")
    reasons_of = {
        row: [
            {
                "item": _plain(raw_item[reason.item]),
                "category": _plain(raw_category[reason.category]),
                "behavior": str(raw_behavior[reason.behavior]),
                "count": int(reason.count),
                "seconds_before": int(reason.seconds_before),
                "attention_share": float(reason.attention_share),
            }
            for reason in reasons.itertuples()
        ]
        for row, reasons in strongest.groupby("row")
    }

    raw_user = _decoder(user_ids, "user")
    users = []
    for user, rows in candidates.groupby("user", sort=False):  # the handful of chosen users
        recommendations = []
        for row in rows.sort_values("rank").head(int(settings["top_candidates"])).itertuples():
            recommendation = {
                "rank": int(row.rank),
                "item": _plain(raw_item[row.item]),
                "category": _plain(raw_category[row.category]),
                "probability": float(row.probability),
                "is_test_item": bool(row.label),
                "because": reasons_of.get(row.Index, []) if has_attention else [],
            }
            recommendation["explanation"] = _explanation(
                recommendation, len(rows), int(row.hist_len), has_attention
            )
            recommendations.append(recommendation)
        test_item = rows.loc[rows["label"] == 1, "item"]
        users.append(
            {
                "user": _plain(raw_user[user]),
                "history_length": int(rows["hist_len"].iloc[0]),
                "test_item": _plain(raw_item[test_item.iloc[0]]) if len(test_item) else None,
                "candidates": len(rows),
                "recommendations": recommendations,
            }
        )
    return {
        "model": model.name,
        "attention": ATTENTION_TYPES.get(model.name, "unknown"),
        "has_attention": has_attention,
        "users": users,
    }


def collect_explanations(**explanations: dict) -> tuple[dict, str]:
    """Every model's explanations as one JSON and one markdown report grouped by user."""
    lines = ["# Why these items rank high", ""]
    first = next(iter(explanations.values()), {"users": []})
    for position, user in enumerate(first["users"]):
        lines += [
            f"## User {user['user']}",
            "",
            f"{user['history_length']} behaviours of history; {user['candidates']} candidates: "
            f"the item actually chosen next ({user['test_item']}) and randomly sampled items.",
            "",
        ]
        for name, report in explanations.items():
            lines += [f"### {name}: {report['attention']}", ""]
            for recommendation in report["users"][position]["recommendations"]:
                marker = (
                    " *(the item actually chosen next)*" if recommendation["is_test_item"] else ""
                )
                lines.append(f"- {recommendation['explanation']}{marker}")
            lines.append("")
    return explanations, "\n".join(lines)


# ---------------------------------------------------------------- plots
def _figure(columns: int = 1, rows: int = 1, size: tuple[float, float] = (6.0, 4.5)):
    """A figure on an Agg canvas (no pyplot), with a grid of axes."""
    figure = Figure(figsize=(size[0] * columns, size[1] * rows), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows, columns, squeeze=False)
    return figure, axes


def plot_roc_curves(**test_predictions: pd.DataFrame) -> Figure:
    """ROC curves of every model on the test split, on one figure."""
    figure, axes = _figure()
    ax = axes[0, 0]
    for name, predictions in test_predictions.items():
        labels = predictions["label"].to_numpy()
        if len(np.unique(labels)) < 2:
            continue  # no ROC curve without both classes
        fpr, tpr, _ = roc_curve(labels, predictions["probability"].to_numpy())
        auc = score(labels, predictions["probability"].to_numpy())["auc"]
        ax.plot(fpr, tpr, label=f"{name} (AUC {auc:.3f})")
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label="chance")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC, test split")
    ax.legend(loc="lower right")
    return figure


def plot_training_curves(**evaluation_summaries: dict) -> Figure:
    """Per-epoch training loss and validation AUC of every model."""
    figure, axes = _figure(columns=2)
    for name, summary in evaluation_summaries.items():
        curve = summary["training_curve"]
        axes[0, 0].plot(curve["epoch"], curve["train_loss"], marker="o", label=name)
        axes[0, 1].plot(curve["epoch"], curve["validation_auc"], marker="o", label=name)
    axes[0, 0].set(xlabel="epoch", ylabel="training loss (BCE)", title="Training loss")
    axes[0, 1].set(xlabel="epoch", ylabel="AUC", title="Validation AUC")
    for ax in axes[0]:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend()
    return figure


def plot_ranking_metrics(**evaluation_summaries: dict) -> Figure:
    """The ranking protocol per candidate distribution: every model's HR@K, NDCG@K, MRR and
    AUC, beside its AUC with shuffled histories (hatched)."""
    keys = (*RANKING_COLUMNS[2:], "auc", "history_shuffled_auc")
    labels = ("HR@1", "HR@5", "HR@10", "NDCG@5", "NDCG@10", "MRR", "AUC", "shuffled AUC")
    figure, axes = _figure(columns=len(CANDIDATE_DISTRIBUTIONS), size=(7.0, 4.5))
    width = 0.8 / max(len(evaluation_summaries), 1)
    for ax, distribution in zip(axes[0], CANDIDATE_DISTRIBUTIONS):
        for index, (name, summary) in enumerate(evaluation_summaries.items()):
            values = [summary.get(f"{distribution}_{key}") for key in keys]
            values = [math.nan if value is None else value for value in values]
            bars = ax.bar(np.arange(len(keys)) + index * width, values, width, label=name)
            bars[-1].set_hatch("//")
        candidates = next(iter(evaluation_summaries.values()), {}).get("ranking_candidates")
        ax.set_xticks(np.arange(len(keys)) + 0.4 - width / 2, labels, rotation=30)
        ax.set(ylim=(0, 1), title=f"Last behaviour vs {candidates} {distribution} candidates")
        ax.legend(fontsize=8)
    return figure


def plot_attention_heatmap(**attention_profiles: dict) -> Figure:
    """Users x history positions: each model's share of attention per behaviour.

    Column 0 is the behaviour just before the target; dots mark behaviours in the target's
    category.
    """
    figure, axes = _figure(columns=len(attention_profiles) or 1, size=(4.5, 4.0))
    for ax, (name, profile) in zip(axes[0], attention_profiles.items()):
        heat = np.array(profile["heatmap"]["share"], dtype=float).reshape(
            len(profile["heatmap"]["users"]), -1
        )
        image = ax.imshow(np.ma.masked_invalid(heat), aspect="auto", cmap="viridis")
        rows, columns = np.nonzero(np.array(profile["heatmap"]["same_category"], dtype=bool))
        ax.scatter(columns, rows, s=6, color="white", label="target's category")
        ax.set_yticks(range(len(heat)), [f"user {user}" for user in profile["heatmap"]["users"]])
        ax.set(xlabel="behaviours before the target", title=f"{name}: {profile['attention']}")
        ax.title.set_fontsize(9)
        figure.colorbar(image, ax=ax, label="share of attention")
    return figure


def plot_attention_distribution(**attention_profiles: dict) -> Figure:
    """Relative attention (1 = uniform) by recency, and on same-category vs other behaviours."""
    figure, axes = _figure(columns=2)
    recency_ax, category_ax = axes[0]
    names = list(attention_profiles)
    for name, profile in attention_profiles.items():
        recency = np.array(profile["recency_relative_weight"], dtype=float)
        recency_ax.plot(np.arange(len(recency)), recency, marker=".", label=name)
    recency_ax.axhline(1.0, color="grey", linestyle="--", linewidth=1)
    recency_ax.set(
        xlabel="behaviours before the target",
        ylabel="relative weight (1 = uniform)",
        title="Attention by recency",
    )
    recency_ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    recency_ax.legend()
    x = np.arange(len(names))
    for offset, key, label in (
        (-0.2, "same_category_relative_weight", "target's category"),
        (0.2, "other_category_relative_weight", "other categories"),
    ):
        values = [attention_profiles[name][key] for name in names]
        category_ax.bar(x + offset, [np.nan if v is None else v for v in values], 0.4, label=label)
    category_ax.axhline(1.0, color="grey", linestyle="--", linewidth=1)
    category_ax.set_xticks(x, names)
    category_ax.set(ylabel="mean relative weight", title="Attention by category")
    category_ax.legend()
    return figure
