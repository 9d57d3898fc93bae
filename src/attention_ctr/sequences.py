"""Behaviour sequences stored flat, and the one gather that turns samples into batches.

Feature engineering writes every user's behaviours once, time-ordered, in flat arrays
(`events`), and each sample only points into them: `hist_end` (exclusive index of its last
history behaviour) and `hist_len` (at most `max_history`, the most recent ones). A batch of
padded `[B, L]` history tensors is a single fancy-index gather, so no sample holds a copy of
its history on disk or in memory, and a whole split can live on the GPU as a few flat tensors.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import numpy as np
import pandas as pd
import torch

logger = logging.getLogger(__name__)

# The columns of a sample table (train/validation/test_samples): pointers into `events`.
SAMPLE_COLUMNS = ["user", "item", "category", "label", "timestamp", "hist_end", "hist_len"]

# events.parquet column -> batch key of the gathered [B, L] tensor
HISTORY_KEYS = {
    "item": "hist_item",
    "category": "hist_category",
    "behavior": "hist_behavior",
    "neg_item": "neg_item",
    "neg_category": "neg_category",
}


def time_gap_bucket(gap_seconds: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    """Bucket ids of time gaps: 1 + number of edges <= gap (0 is kept for padding)."""
    return torch.bucketize(gap_seconds, edges, right=True) + 1


def gather_history(
    events: dict[str, torch.Tensor],
    hist_end: torch.Tensor,
    hist_len: torch.Tensor,
    max_length: int,
    sample_timestamp: torch.Tensor | None = None,
    time_gap_edges: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Padded `[B, L]` histories, oldest first and padding (0) at the end; `L` = longest row.

    `events` maps events.parquet columns to flat tensors. With `sample_timestamp` and
    `time_gap_edges` the result also holds `hist_timestamp` and BST's `time_gap` buckets of
    `sample time - behaviour time`.
    """
    length = max(1, min(max_length, int(hist_len.max()) if len(hist_len) else 1))
    offsets = torch.arange(length, device=hist_end.device)
    mask = offsets[None, :] < hist_len[:, None]
    index = torch.where(mask, (hist_end - hist_len)[:, None] + offsets[None, :], 0)
    batch = {"mask": mask}
    for column, key in HISTORY_KEYS.items():
        if column in events:
            batch[key] = torch.where(mask, events[column][index], 0)
    if sample_timestamp is not None:
        times = torch.where(mask, events["timestamp"][index], 0)
        batch["hist_timestamp"] = times
        if time_gap_edges is not None:
            gaps = sample_timestamp[:, None] - times
            batch["time_gap"] = torch.where(mask, time_gap_bucket(gaps, time_gap_edges), 0)
    return batch


def _tensor(values: pd.Series | np.ndarray, device: torch.device) -> torch.Tensor:
    # A copy: parquet-backed arrays are read-only, and tensors must own writable memory.
    return torch.from_numpy(np.array(values, dtype=np.int64)).to(device)


class SampleTensors:
    """A split's samples and the behaviours they point into, pre-tensorised on one device.

    `batch(index)` builds the model batch (see `attention_ctr.models`) for sample rows
    `index`; `batches()` iterates over the split in (optionally shuffled) batches.
    """

    def __init__(
        self,
        samples: pd.DataFrame,
        events: pd.DataFrame,
        spec: dict,
        device: torch.device | str = "cpu",
    ) -> None:
        device = torch.device(device)
        self.device = device
        self.max_history = int(spec["max_history"])
        self.time_gap_edges = _tensor(spec["time_gap_edges"], device)
        self.events = {
            column: _tensor(events[column], device)
            for column in (*HISTORY_KEYS, "timestamp")
            if column in events
        }
        self.user = _tensor(samples["user"], device)
        self.target_item = _tensor(samples["item"], device)
        self.target_category = _tensor(samples["category"], device)
        self.timestamp = _tensor(samples["timestamp"], device)
        self.hist_end = _tensor(samples["hist_end"], device)
        self.hist_len = _tensor(samples["hist_len"], device)
        self.label = torch.as_tensor(samples["label"].to_numpy(dtype=np.float32), device=device)

    def __len__(self) -> int:
        return len(self.label)

    def batch(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        batch = gather_history(
            self.events,
            self.hist_end[index],
            self.hist_len[index],
            self.max_history,
            self.timestamp[index],
            self.time_gap_edges,
        )
        batch["target_item"] = self.target_item[index]
        batch["target_category"] = self.target_category[index]
        return batch

    def batch_indices(
        self,
        batch_size: int,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
        length_window: int = 0,
    ) -> list[torch.Tensor]:
        """The sample rows of each batch; together they cover every sample once.

        `length_window` > 1 groups samples of similar history length (bucketing, as in
        sequence-to-sequence training): the (shuffled) order is cut into windows of
        `length_window` batches, each window is sorted by history length (ties keep the
        shuffled order) and cut into batches, and, with `shuffle`, the batches are shuffled.
        A batch is as wide as its longest history, so this removes most of the padding that
        recurrences and attention run over; a window of many batches keeps them well mixed.
        It also makes each batch's statistics (Dice's) unlike the whole split's: training
        leaves it off for models that have them.
        """
        count = len(self)
        if shuffle:
            order = torch.randperm(count, generator=generator).to(self.device)
        else:
            order = torch.arange(count, device=self.device)
        starts = torch.arange(0, count, batch_size)
        if length_window > 1 and count:
            window = torch.arange(count, device=self.device) // (length_window * batch_size)
            key = window * (self.max_history + 1) + self.hist_len[order]
            order = order[torch.sort(key, stable=True).indices]
            if shuffle:
                starts = starts[torch.randperm(len(starts), generator=generator)]
        return [order[start : start + batch_size] for start in starts.tolist()]

    def batches(
        self,
        batch_size: int,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
        length_window: int = 0,
    ) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
        """(batch, labels) pairs over `batch_indices(...)` (same arguments)."""
        for index in self.batch_indices(batch_size, shuffle, generator, length_window):
            yield self.batch(index), self.label[index]

    def chunks(
        self, shuffle: bool = False, generator: torch.Generator | None = None
    ) -> Iterator[SampleTensors]:
        """The split as one chunk (the interface of `SampleStream`)."""
        yield self


# Bytes a sample and a behaviour take once tensorised: 6 int64 columns + a float32 label, and
# up to 6 int64 columns of events.parquet.
SAMPLE_BYTES, EVENT_BYTES = 6 * 8 + 4, 6 * 8


class SampleStream:
    """A split too large to tensorise at once, read from parquet in chunks of `chunk_rows`
    consecutive samples. A split's samples come in user order, so a chunk points into one
    contiguous range of events: only those rows are read, and the chunk is a `SampleTensors`
    of its own (`hist_end` shifted to the range). Same batches, chunk by chunk.

    `samples` and `events` are tables with `num_rows`, `read(columns)` and
    `read_rows(start, stop)` (`attention_ctr.datasets.ParquetTable`).
    """

    def __init__(self, samples, events, spec: dict, device: torch.device | str, chunk_rows: int):
        self.samples, self.events, self.spec = samples, events, spec
        self.device = torch.device(device)
        self.chunk_rows = max(1, int(chunk_rows))
        self.starts = list(range(0, samples.num_rows, self.chunk_rows))

    def __len__(self) -> int:
        return self.samples.num_rows

    @property
    def label(self) -> torch.Tensor:
        labels = self.samples.read(["label"])["label"].to_numpy(dtype=np.float32)
        return torch.as_tensor(labels)

    def chunk(self, start: int) -> SampleTensors:
        rows = self.samples.read_rows(start, start + self.chunk_rows)
        first = int((rows["hist_end"] - rows["hist_len"]).min())
        events = self.events.read_rows(first, int(rows["hist_end"].max()))
        rows = rows.assign(hist_end=rows["hist_end"] - first)
        return SampleTensors(rows, events, self.spec, self.device)

    def chunks(
        self, shuffle: bool = False, generator: torch.Generator | None = None
    ) -> Iterator[SampleTensors]:
        """The chunks in order, or (`shuffle`) in a random order; each reads its rows anew."""
        count = len(self.starts)
        order = torch.randperm(count, generator=generator).tolist() if shuffle else range(count)
        for position in order:
            yield self.chunk(self.starts[position])


def split_tensors(
    samples, events, spec: dict, device: torch.device | str, memory_budget_mb: float
) -> SampleTensors | SampleStream:
    """A split in memory when its samples and events fit `memory_budget_mb` once tensorised,
    else a `SampleStream` whose chunks take about half of it. `samples` and `events` are
    tables as `SampleStream` takes them."""
    budget = float(memory_budget_mb) * 2**20
    need = SAMPLE_BYTES * samples.num_rows + EVENT_BYTES * events.num_rows
    if need <= budget:
        return SampleTensors(samples.read(), events.read(), spec, device)
    events_per_sample = events.num_rows / max(samples.num_rows, 1)
    chunk_rows = int(budget / 2 / (SAMPLE_BYTES + EVENT_BYTES * events_per_sample))
    stream = SampleStream(samples, events, spec, device, chunk_rows)
    logger.info(
        "%s: %.0f MB tensorised is over the %.0f MB budget (training.memory_budget_mb): "
        "streamed in %d chunks of %d samples",
        getattr(samples, "path", "samples"),
        need / 2**20,
        budget / 2**20,
        len(stream.starts),
        stream.chunk_rows,
    )
    return stream
