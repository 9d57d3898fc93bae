"""Data-parallel training (`training.distributed`): 2 CPU processes against 1, through Kedro."""

from __future__ import annotations

import pytest
from conftest import PROJECT_ROOT, SMALL_SYNTHETIC
from sandbox import make_project_copy, run_pipeline

from attention_ctr.distributed import DistributedConfig, fit_distributed, shard_rows
from attention_ctr.errors import InputError
from attention_ctr.training import TrainingConfig

# The same global batch in both runs; what differs is which rank draws which samples, Dice's
# batch statistics (over each rank's half batch) and dropout's streams. On this log (300
# validation samples) the largest gap over 3 epochs was 0.006 for DIN (0.017 for pooling, whose
# AUC moves more from epoch to epoch here).
AUC_TOLERANCE = 0.02


def test_shards_cover_every_row_and_are_equal():
    for count, world in [(10, 2), (11, 2), (7, 3), (2, 4)]:
        shards = [shard_rows(count, rank, world, seed=7).tolist() for rank in range(world)]
        assert {len(shard) for shard in shards} == {-(-count // world)}
        assert set().union(*shards) == set(range(count))
    # a split's alternating rows (positive, negative, ...) are dealt to both ranks alike
    labels = [1, 0] * 500
    for rank in (0, 1):
        share = sum(labels[i] for i in shard_rows(1000, rank, 2, seed=7)) / 500
        assert 0.4 < share < 0.6


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"processes": 0}, "training.distributed.processes must be an integer >= 1"),
        ({"nodes": "2"}, "training.distributed.nodes must be an integer >= 1"),
        ({"workers": 2}, r"Unknown parameter\(s\) training.distributed.\['workers'\]"),
        ({"backend": "mpi"}, "backend must be auto, gloo or nccl"),
        ({"nodes": 2}, "run_id and rendezvous_endpoint"),
    ],
)
def test_bad_distributed_parameters_are_named(params, message):
    with pytest.raises(InputError, match=message):
        TrainingConfig.from_params({"distributed": params})


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"device": "cpu", "distributed": {"backend": "nccl", "processes": 2}}, "needs GPUs"),
        ({"batch_size": 255, "distributed": {"processes": 2}}, "multiple of the 2 training"),
    ],
)
def test_settings_that_cannot_run_fail_before_any_process_starts(params, message):
    config = TrainingConfig.from_params(params)
    with pytest.raises(InputError, match=message):
        fit_distributed(None, None, None, None, {}, None, config)


def test_a_memory_budget_must_be_positive():
    with pytest.raises(InputError, match="training.memory_budget_mb is 0"):
        TrainingConfig.from_params({"memory_budget_mb": 0})


def test_one_process_is_plain_training():
    assert not TrainingConfig.from_params({}).distributed.enabled
    assert DistributedConfig.from_params({"processes": 2}).enabled


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """DIN trained by the training pipeline in 1 and in 2 processes on the same features."""
    params = {
        **SMALL_SYNTHETIC,
        "ingestion.synthetic.events": 20000,
        "feature_engineering.max_history": 20,
        "training.epochs": 3,
        "training.patience": 1,  # so the shared early-stopping decision runs too
        "training.progress_bar": False,
    }
    project = make_project_copy(tmp_path_factory.mktemp("ddp") / "project", source=PROJECT_ROOT)
    run_pipeline(project, pipelines=["ingestion", "feature_engineering"], params=params)
    result = {}
    for processes in (1, 2):
        catalog = run_pipeline(
            project,
            pipeline="training",
            namespaces=["din"],
            params={**params, "training.distributed.processes": processes},
        )
        result[processes] = {
            "history": catalog.load("din.training_history"),
            "train_samples": len(catalog.load("train_samples@pandas")),
            "versions": sorted((project / "data" / "06_models" / "din" / "model.pt").iterdir()),
        }
    return result


@pytest.mark.slow
def test_two_processes_learn_what_one_does(runs):
    # (the run itself fails unless every rank ends with the same parameters)
    one, two = runs[1]["history"], runs[2]["history"]
    common = min(len(one), len(two))
    assert common >= 1
    gaps = (one["validation_auc"] - two["validation_auc"]).abs()[:common]
    assert gaps.max() <= AUC_TOLERANCE, (one["validation_auc"].tolist(), two["validation_auc"])
    assert two["validation_auc"].iloc[-1] > 0.6  # it learned, not only agreed


@pytest.mark.slow
def test_the_node_runs_once_and_every_sample_is_seen(runs):
    # one new model version per run: rank 0's result written once through the catalog
    assert len(runs[1]["versions"]) == 1 and len(runs[2]["versions"]) == 2
    history = runs[2]["history"]
    seen = history["train_samples_per_second"] * history["train_seconds"]
    count = runs[2]["train_samples"]
    # both ranks' samples: the split, plus at most one wrapped row to even the shards
    assert ((seen.round() >= count) & (seen.round() <= count + 1)).all()
