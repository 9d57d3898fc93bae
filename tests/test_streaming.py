"""Training's splits read from parquet in chunks (`SampleStream`) against the in-memory path."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import PROJECT_ROOT, SMALL_SYNTHETIC
from sandbox import make_project_copy, run_pipeline

from attention_ctr.datasets import ParquetTable
from attention_ctr.models import build_model
from attention_ctr.sequences import SampleStream, SampleTensors, split_tensors
from attention_ctr.training import predict

PARAMS = {
    **SMALL_SYNTHETIC,
    "ingestion.synthetic.events": 20000,
    "feature_engineering.max_history": 20,
    "training.epochs": 3,
    "training.patience": 3,
    "training.progress_bar": False,
}
# Small enough that both splits stream here, in several chunks each.
TINY_BUDGET_MB = 0.5
# Chunk order and in-chunk shuffles replace one shuffle of the split (23 chunks of ~1,700
# user-ordered samples here, so a batch mixes fewer users). On this log (300 validation
# samples) DIN's validation AUC moved by at most 0.013 per epoch (pooling and DIEN: 0.027 in
# the first epoch, under 0.015 by the third).
AUC_TOLERANCE = 0.02


@pytest.fixture(scope="module")
def features(tmp_path_factory):
    project = make_project_copy(tmp_path_factory.mktemp("stream") / "project", source=PROJECT_ROOT)
    catalog = run_pipeline(project, pipelines=["ingestion", "feature_engineering"], params=PARAMS)
    return project, catalog


def _tables(catalog):
    return [catalog.load(f"{name}@parquet") for name in ("train_samples", "events")]


def test_read_rows_reads_any_range_across_row_groups(tmp_path):
    frame = pd.DataFrame({"a": np.arange(1000), "b": np.arange(1000) * 2})
    pq.write_table(pa.Table.from_pandas(frame), tmp_path / "t.parquet", row_group_size=64)
    table = ParquetTable(tmp_path / "t.parquet")
    assert len(table) == 1000
    for start, stop in [(0, 1000), (0, 1), (63, 65), (64, 128), (100, 777), (990, 2000), (5, 5)]:
        got = table.read_rows(start, stop)
        expected = frame.iloc[start:stop].reset_index(drop=True)
        pd.testing.assert_frame_equal(got, expected)


def test_every_chunk_gathers_the_histories_the_whole_split_does(features):
    _, catalog = features
    samples, events = _tables(catalog)
    spec = catalog.load("feature_spec")
    whole = SampleTensors(samples.read(), events.read(), spec)
    stream = SampleStream(samples, events, spec, "cpu", chunk_rows=97)
    assert len(stream.starts) > 3
    start_of = iter(stream.starts)
    covered = 0
    for chunk in stream.chunks():
        start = next(start_of)
        rows = torch.arange(start, start + len(chunk))
        mine, theirs = chunk.batch(torch.arange(len(chunk))), whole.batch(rows)
        assert mine.keys() == theirs.keys()
        for key in mine:
            torch.testing.assert_close(mine[key], theirs[key], rtol=0, atol=0, msg=key)
        torch.testing.assert_close(chunk.label, whole.label[rows])
        covered += len(chunk)
    assert covered == len(whole)
    # a shuffled epoch reads every chunk once
    shuffled = [len(c) for c in stream.chunks(True, torch.Generator().manual_seed(1))]
    assert sum(shuffled) == len(whole) and len(shuffled) == len(stream.starts)


def test_predictions_are_the_same_streamed_or_whole(features):
    _, catalog = features
    samples, events = _tables(catalog)
    spec = catalog.load("feature_spec")
    sizes = {k: spec[k] for k in ("n_items", "n_categories", "n_time_gap_buckets", "max_history")}
    torch.manual_seed(0)
    model = build_model("din", **sizes, n_behaviors=spec["n_behaviors"], embedding_dim=8)
    whole = predict(model, SampleTensors(samples.read(), events.read(), spec), 128)
    streamed = predict(model, SampleStream(samples, events, spec, "cpu", 97), 128)
    np.testing.assert_allclose(streamed, whole, rtol=1e-6, atol=1e-7)


def test_the_budget_decides_whole_or_streamed(features):
    _, catalog = features
    samples, events = _tables(catalog)
    spec = catalog.load("feature_spec")
    assert isinstance(split_tensors(samples, events, spec, "cpu", 1024), SampleTensors)
    stream = split_tensors(samples, events, spec, "cpu", TINY_BUDGET_MB)
    assert isinstance(stream, SampleStream) and len(stream.starts) > 1


@pytest.mark.slow
def test_training_streamed_learns_what_training_in_memory_does(features):
    project, _ = features
    histories = {}
    for budget in (8192, TINY_BUDGET_MB):
        catalog = run_pipeline(
            project,
            pipeline="training",
            namespaces=["din"],
            params={**PARAMS, "training.memory_budget_mb": budget},
        )
        histories[budget] = catalog.load("din.training_history")
    whole, streamed = histories[8192], histories[TINY_BUDGET_MB]
    train_count = len(catalog.load("train_samples@pandas"))
    seen = (streamed["train_samples_per_second"] * streamed["train_seconds"]).round()
    assert (seen == train_count).all()  # every sample once an epoch
    gaps = (whole["validation_auc"] - streamed["validation_auc"]).abs()
    assert gaps.max() <= AUC_TOLERANCE, (whole["validation_auc"], streamed["validation_auc"])
    assert streamed["validation_auc"].iloc[-1] > 0.6
