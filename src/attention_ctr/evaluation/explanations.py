"""Why items rank high: each chosen user's top candidates with the behaviours that carried most
attention, in words."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from torch import nn

from attention_ctr.evaluation import ATTENTION_TYPES, WITHOUT_ATTENTION
from attention_ctr.evaluation.ids import decoder, plain
from attention_ctr.sequences import SampleTensors

# Behaviour codes of the supported logs, as the noun an explanation uses.
BEHAVIOUR_NOUNS = {"pv": "view", "cart": "cart addition", "fav": "favourite", "buy": "purchase"}


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


def strongest_behaviours(
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
    candidates: pd.DataFrame,
    events: pd.DataFrame,
    feature_spec: dict,
    item_ids: pd.DataFrame,
    category_ids: pd.DataFrame,
    behavior_ids: pd.DataFrame,
    user_ids: pd.DataFrame,
    top_candidates: int,
    top_behaviours: int,
) -> dict:
    """Each user's `top_candidates` best-ranked candidates, each with its `top_behaviours`
    strongest behaviours. Items, categories and users are named by their raw ids."""
    model = model.cpu().eval()
    candidates = candidates.reset_index(drop=True)
    tensors = SampleTensors(candidates, events, feature_spec, "cpu")
    batch = tensors.batch(torch.arange(len(tensors)))
    candidates["probability"] = torch.sigmoid(model(batch).float()).numpy()
    candidates["rank"] = (
        candidates.groupby("user")["probability"].rank(ascending=False, method="first").astype(int)
    )
    has_attention = model.name not in WITHOUT_ATTENTION
    strongest = strongest_behaviours(
        candidates,
        events,
        model.attention(batch).float().numpy(),
        batch["mask"].numpy(),
        top_behaviours,
    )
    raw_item, raw_category = decoder(item_ids, "item"), decoder(category_ids, "category")
    raw_behavior = decoder(behavior_ids, "code", "behavior")
    reasons_of = {
        row: [
            {
                "item": plain(raw_item[reason.item]),
                "category": plain(raw_category[reason.category]),
                "behavior": str(raw_behavior[reason.behavior]),
                "count": int(reason.count),
                "seconds_before": int(reason.seconds_before),
                "attention_share": float(reason.attention_share),
            }
            for reason in reasons.itertuples()
        ]
        for row, reasons in strongest.groupby("row")
    }

    raw_user = decoder(user_ids, "user")
    users = []
    for user, rows in candidates.groupby("user", sort=False):  # the handful of chosen users
        recommendations = []
        for row in rows.sort_values("rank").head(top_candidates).itertuples():
            recommendation = {
                "rank": int(row.rank),
                "item": plain(raw_item[row.item]),
                "category": plain(raw_category[row.category]),
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
                "user": plain(raw_user[user]),
                "history_length": int(rows["hist_len"].iloc[0]),
                "test_item": plain(raw_item[test_item.iloc[0]]) if len(test_item) else None,
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
