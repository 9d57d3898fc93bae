"""The ranking protocol scored as a server would: `Scorer` over the request graph, one
request per user, raw ids in.

Per candidate distribution: HR@K, NDCG@K, MRR, GAUC and AUC, and the history-shuffled AUC
(every user's candidates scored against another user's history, a derangement): a model that
loses nothing there does not use the history.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from attention_ctr.evaluation.ids import decoder
from attention_ctr.ranking import derangement, ranking_quality
from attention_ctr.serving import Scorer


def raw_id_decoders(
    item_ids: pd.DataFrame, category_ids: pd.DataFrame, behavior_ids: pd.DataFrame
) -> dict[str, np.ndarray]:
    """Encoded item, category and behaviour -> raw id, in the dtypes a caller passes."""
    return {
        "item": decoder(item_ids, "item", keep_dtype=True),
        "category": decoder(category_ids, "category", keep_dtype=True),
        "behavior": decoder(behavior_ids, "code", "behavior", keep_dtype=True).astype(str),
    }


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


def rank_through_scorer(
    scorer: Scorer,
    ranking_candidates: pd.DataFrame,
    events: pd.DataFrame,
    decode: dict[str, np.ndarray],
    seed: int,
) -> dict[str, dict]:
    """Ranking quality per candidate distribution, with the history-shuffled AUC and GAUC."""
    result = {}
    for distribution, rows in ranking_candidates.groupby("distribution", sort=False):
        rows = rows.reset_index(drop=True)
        positives = rows[rows["label"] == 1]
        histories = _request_histories(positives, events, decode)
        own = np.arange(len(positives))
        shuffle = derangement(len(positives), np.random.default_rng(seed))
        scores = _score_lists(scorer, rows, histories, own, decode)
        shuffled = _score_lists(scorer, rows, histories, shuffle, decode)
        quality = ranking_quality(rows["user"], rows["label"], scores)
        shuffled_quality = ranking_quality(rows["user"], rows["label"], shuffled)
        quality["history_shuffled_auc"] = shuffled_quality["auc"]
        quality["history_shuffled_gauc"] = shuffled_quality["gauc"]
        result[str(distribution)] = quality
    return result
