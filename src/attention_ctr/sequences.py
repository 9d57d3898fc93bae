"""Behaviour sequences stored flat, and the vectorised gather that turns samples into batches.

Feature engineering writes every user's behaviours once, time-ordered, in flat arrays
(`events`), and each sample only points into them: `hist_end` (exclusive index of its last
history behaviour) and `hist_len` (at most `max_history`, the most recent ones). A batch of
padded `[B, L]` history matrices is a single fancy-index gather, so no sample ever holds a copy
of its history on disk or in memory.
"""

from __future__ import annotations

import numpy as np

HISTORY_COLUMNS = ("item", "category", "behavior", "neg_item", "neg_category")


def time_gap_bucket(gap_seconds: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Bucket ids for time gaps: 1 + number of edges <= gap (0 is kept for padding)."""
    return (np.searchsorted(np.asarray(edges), gap_seconds, side="right") + 1).astype(np.int64)


def gather_history(
    events: dict[str, np.ndarray],
    hist_end: np.ndarray,
    hist_len: np.ndarray,
    max_length: int,
    sample_timestamp: np.ndarray | None = None,
    time_gap_edges: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Padded `[B, L]` history arrays for samples, oldest first, padding (0) at the end.

    `events` maps column names to flat per-behaviour arrays (see HISTORY_COLUMNS plus
    `timestamp`). With `sample_timestamp` and `time_gap_edges`, also returns BST's
    `time_gap` buckets of `sample time - behaviour time`.
    """
    length = int(min(max_length, hist_len.max(initial=0))) or 1
    offsets = np.arange(length)
    mask = offsets[None, :] < hist_len[:, None]
    index = np.where(mask, (hist_end - hist_len)[:, None] + offsets[None, :], 0)
    batch = {"mask": mask}
    for name in HISTORY_COLUMNS:
        if name in events:
            batch[name] = np.where(mask, events[name][index], 0)
    if sample_timestamp is not None:
        times = events["timestamp"][index]
        batch["timestamp"] = np.where(mask, times, 0)
        if time_gap_edges is not None:
            gaps = sample_timestamp[:, None] - times
            batch["time_gap"] = np.where(mask, time_gap_bucket(gaps, time_gap_edges), 0)
    return batch
