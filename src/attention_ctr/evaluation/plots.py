"""The evaluation's figures.

Figures are built on `matplotlib.figure.Figure` with an Agg canvas, never through pyplot, so no
global figure state is created and nothing stays open after the catalog has saved a figure.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from sklearn.metrics import roc_curve

from attention_ctr.evaluation.candidates import CANDIDATE_DISTRIBUTIONS
from attention_ctr.evaluation.comparison import RANKING_COLUMNS
from attention_ctr.training import score


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
