"""One row per model of the comparison table, and the table as JSON and markdown."""

from __future__ import annotations

import math

import pandas as pd

from attention_ctr.evaluation import ATTENTION_TYPES
from attention_ctr.evaluation.candidates import CANDIDATE_DISTRIBUTIONS
from attention_ctr.evaluation.metrics import FREQUENCY_BUCKETS, finite_or_none

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


def evaluation_summary(
    name: str,
    parameters: int,
    test_metrics: dict,
    ranking_metrics: dict,
    cold_start_blend: dict,
    inference_latency: dict,
    training_history: pd.DataFrame,
) -> dict:
    """Model `name`'s row of the comparison (`parameters`: its parameter count), plus its
    per-epoch training curve for the plots."""
    needed = {"epoch", "train_loss", "validation_auc", "train_seconds"}
    missing = needed - set(training_history.columns)
    if missing:
        raise ValueError(
            f"{name}.training_history lacks column(s) {sorted(missing)}; "
            "run the training pipeline again"
        )
    ranking = {
        f"{distribution}_{key}": ranking_metrics.get(distribution, {}).get(key)
        for distribution in CANDIDATE_DISTRIBUTIONS
        for key in (*RANKING_COLUMNS, "history_shuffled_auc")
    }
    return {
        "model": name,
        "attention": ATTENTION_TYPES.get(name, "unknown"),
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
        "parameters": int(parameters),
        # Training time is the sum of the epochs' training passes (validation not included).
        "training_seconds": float(training_history["train_seconds"].sum()),
        "epochs_trained": len(training_history),
        "best_validation_auc": finite_or_none(training_history["validation_auc"].max()),
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
