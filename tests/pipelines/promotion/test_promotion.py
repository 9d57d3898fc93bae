"""The promotion gate: real retraining runs on a small synthetic log, and the gate's rules."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import EXPORT_RUN
from sandbox import run_pipeline

from attention_ctr.datasets import JsonPointerDataset, ServingMetadataDataset
from attention_ctr.models import MODELS
from attention_ctr.pipelines.promotion.nodes import (
    decide_promotion,
    move_promotion_pointer,
    report_promotion,
)
from attention_ctr.serving import Scorer

TOLERANCE = {"tolerance": 0.005}


def test_first_retraining_promotes_every_model_and_points_at_its_bundle(exported_run):
    project, catalog = exported_run
    pointer = json.loads((project / "data" / "06_models" / "promoted_models.json").read_text())
    assert sorted(pointer) == sorted(MODELS)
    report = catalog.load("promotion_report")
    assert report["promoted"] == sorted(MODELS) and report["kept_out"] == []
    for name in MODELS:
        entry = pointer[name]
        # Other tests export again into this shared project: read the promoted version itself.
        metadata = catalog.load(f"{name}.serving_metadata", version=entry["version"])
        metrics = catalog.load(f"{name}.test_metrics", version=entry["version"])
        assert entry["version"] == metadata["version"] == report["serving"][name]
        for digest in ("metadata_sha256", "request_onnx_sha256", "onnx_sha256", "items_sha256"):
            assert entry[digest] == metadata[digest]
        assert entry["model_sha256"] == metrics["model_sha256"] == metadata["model_sha256"]
        assert entry["test_auc"] == metrics["test"]["auc"]
        assert report["decisions"][name]["reason"] == "nothing of this model was promoted before"


def _copy(exported_run, tmp_path):
    project, _ = exported_run
    copy = tmp_path / "project"
    shutil.copytree(project, copy)
    return copy


def _retrain_din(project, **params):
    """A second scheduled run for DIN only: its branch, then the pointer."""
    return run_pipeline(
        project,
        pipeline="retraining",
        params={**EXPORT_RUN, **params},
        namespaces=["din", "promotion"],
    )


def test_a_worse_candidate_stays_versioned_but_the_promoted_version_keeps_serving(
    exported_run, tmp_path
):
    project = _copy(exported_run, tmp_path)
    bundles = project / "data" / "06_models" / "din" / "serving" / "model.onnx"
    before = {path.name for path in bundles.iterdir()}  # other tests may have exported again
    pointer_file = project / "data" / "06_models" / "promoted_models.json"
    pointer = json.loads(pointer_file.read_text())
    first = pointer["din"]["version"]
    pointer["din"]["test_auc"] = 1.0  # an incumbent no retrained model can match
    pointer_file.write_text(json.dumps(pointer))

    catalog = _retrain_din(project)

    decision = catalog.load("din_promotion_decision")
    second = decision["candidate"]["version"]
    assert second != first and not decision["promoted"]
    assert "< the promoted version's 1.0000" in decision["reason"]
    after = json.loads(pointer_file.read_text())
    assert after["din"] == pointer["din"]  # untouched
    assert {name: after[name] for name in MODELS if name != "din"} == {
        name: pointer[name] for name in MODELS if name != "din"
    }
    report = catalog.load("promotion_report")
    assert "din" in report["kept_out"] and report["serving"]["din"] == first

    # Both bundles stay; serving follows the pointer, not the newest export.
    assert {path.name for path in bundles.iterdir()} == before | {second} and first in before
    promoted = Scorer.from_project(project, "din", version="promoted")
    newest = Scorer.from_project(project, "din")
    assert promoted.metadata["request_onnx_sha256"] == pointer["din"]["request_onnx_sha256"]
    assert newest.metadata["request_onnx_sha256"] == decision["candidate"]["request_onnx_sha256"]


def test_a_candidate_within_the_tolerance_replaces_the_promoted_version(exported_run, tmp_path):
    project = _copy(exported_run, tmp_path)
    pointer_file = project / "data" / "06_models" / "promoted_models.json"
    first = json.loads(pointer_file.read_text())["din"]["version"]

    catalog = _retrain_din(project, **{"promotion.tolerance": 1.0})

    decision = catalog.load("din_promotion_decision")
    assert decision["promoted"] and decision["incumbent"]["version"] == first
    after = json.loads(pointer_file.read_text())["din"]
    assert after["version"] == decision["candidate"]["version"] != first
    assert after["replaced_version"] == first
    scorer = Scorer.from_project(project, "din", version="promoted")
    assert scorer.metadata["version"] == after["version"]
    assert np.isfinite(scorer.score([1, 2, 3], [1, 2]).astype(float)).all()


# ---------------------------------------------------------------- the gate's rules, one by one
def _metadata(version="2026-01-02T00.00.00.000Z", difference=1e-7, sha="m1"):
    return {
        "model": "din",
        "version": version,
        "model_sha256": sha,
        "metadata_sha256": "s",
        "request_onnx_sha256": "r",
        "onnx_sha256": "b",
        "items_sha256": "i",
        "categories_sha256": "c",
        "parity_max_abs_diff": difference,
        "parity_tolerance": 1e-5,
    }


def _metrics(auc=0.80, sha="m1"):
    return {"model_sha256": sha, "test": {"auc": auc, "gauc": auc, "logloss": 0.5, "samples": 10}}


def _incumbent(auc):
    return {"din": {"version": "2026-01-01T00.00.00.000Z", "test_auc": auc}}


@pytest.mark.parametrize(
    ("incumbent_auc", "promoted"),
    [(0.804, True), (0.805, True), (0.8051, False), (0.70, True)],
)
def test_the_auc_may_fall_by_at_most_the_tolerance(incumbent_auc, promoted):
    decision = decide_promotion(_metadata(), _metrics(0.80), _incumbent(incumbent_auc), TOLERANCE)
    assert decision["promoted"] is promoted


@pytest.mark.parametrize(
    ("metadata", "metrics", "reason"),
    [
        (_metadata(difference=2e-5), _metrics(), "ONNX parity failed"),
        (_metadata(difference=None), _metrics(), "ONNX parity failed"),
        (_metadata(sha="m2"), _metrics(), "of another model"),
        (_metadata(), _metrics(auc=None), "test AUC is undefined"),
        ({**_metadata(), "model_sha256": None}, _metrics(), "export this model again"),
        ({**_metadata(), "metadata_sha256": None}, _metrics(), "predates sealed bundles"),
    ],
)
def test_a_candidate_that_failed_parity_or_has_no_comparable_metrics_is_kept_out(
    metadata, metrics, reason
):
    for pointer in ({}, _incumbent(0.5)):  # even when nothing serves yet
        decision = decide_promotion(metadata, metrics, pointer, TOLERANCE)
        assert not decision["promoted"] and reason in decision["reason"]
    pointer = move_promotion_pointer(_incumbent(0.5), din=decision)
    assert pointer == _incumbent(0.5)
    assert report_promotion(dict(pointer), din=decision)["kept_out"] == ["din"]


def test_a_negative_tolerance_is_an_error_naming_the_parameter():
    with pytest.raises(ValueError, match="promotion.tolerance"):
        decide_promotion(_metadata(), _metrics(), {}, {"tolerance": -0.1})


# ---------------------------------------------------------------- the datasets behind the pointer
def test_the_pointer_reads_as_empty_before_the_first_promotion_and_is_replaced_whole(tmp_path):
    path = tmp_path / "models" / "promoted_models.json"
    dataset = JsonPointerDataset(filepath=str(path))
    assert dataset.load() == {} and not dataset.exists()
    dataset.save({"din": {"version": "v1"}})
    dataset.save({"din": {"version": "v2"}})
    assert dataset.load() == {"din": {"version": "v2"}}
    assert [p.name for p in path.parent.iterdir()] == ["promoted_models.json"]  # no temp left
    path.write_text("[1, 2]")
    with pytest.raises(Exception, match="promoted_models.json must hold a JSON object"):
        dataset.load()


def test_serving_metadata_loads_with_the_version_it_was_saved_under(tmp_path):
    from kedro.io import Version

    path = str(tmp_path / "metadata.json")
    saved = ServingMetadataDataset(filepath=path, version=Version(None, "2026-05-06T07.08.09.000Z"))
    saved.save({"model": "din", "version": "ignored"})
    loaded = ServingMetadataDataset(filepath=path, version=Version(None, None)).load()
    assert loaded == {"model": "din", "version": "2026-05-06T07.08.09.000Z"}
    stored = tmp_path / "metadata.json" / "2026-05-06T07.08.09.000Z" / "metadata.json"
    assert json.loads(stored.read_text()) == {"model": "din"}


# ---------------------------------------------------------------- malformed pointer, racing runs
@pytest.mark.parametrize(
    ("entry", "problem"),
    [
        ({"test_auc": 0.8}, "no 'version'"),
        ({"version": "v1"}, "no numeric 'test_auc'"),
        ("v1", "not an object"),
    ],
)
def test_a_malformed_pointer_entry_is_a_one_line_error_naming_it(entry, problem):
    with pytest.raises(ValueError) as caught:
        decide_promotion(_metadata(), _metrics(), {"din": entry}, TOLERANCE)
    message = str(caught.value)
    assert "\n" not in message
    assert "promoted_models.json" in message and "'din'" in message and problem in message


def _decision(version, auc, pointer):
    return decide_promotion(_metadata(version=version), _metrics(auc), pointer, TOLERANCE)


def test_two_runs_moving_the_pointer_at_once_lose_no_promotion(tmp_path):
    """Both runs gate against v1; the second to save decides again against the first's."""
    path = tmp_path / "promoted_models.json"
    JsonPointerDataset(filepath=str(path)).save(_incumbent(0.80))
    first_run, second_run = (JsonPointerDataset(filepath=str(path)) for _ in range(2))
    base = first_run.load()
    assert second_run.load() == base

    pointer_a = move_promotion_pointer(base, din=_decision("v2", 0.82, base))
    pointer_b = move_promotion_pointer(base, din=_decision("v3", 0.818, base))
    first_run.save(pointer_a)
    second_run.save(pointer_b)  # 0.818 is within the tolerance of v2's 0.82
    din = json.loads(path.read_text())["din"]
    assert din["version"] == "v3" and din["replaced_version"] == "v2"

    # A candidate worse than what the other run promoted meanwhile is kept out after all.
    base = first_run.load()
    decision_b = _decision("v5", 0.82, base)  # passes its own gate against v3
    assert decision_b["promoted"]
    pointer_a = move_promotion_pointer(base, din=_decision("v4", 0.90, base))
    pointer_b = move_promotion_pointer(base, din=decision_b)
    first_run.save(pointer_a)
    second_run.save(pointer_b)
    din = json.loads(path.read_text())["din"]
    assert din["version"] == "v4" and din["replaced_version"] == "v3"
    # and the second run's report, read from what was written, says so
    report = report_promotion(second_run.load(), din=decision_b)
    assert report["promoted"] == [] and report["kept_out_by_another_run"] == ["din"]
    assert report["serving"]["din"] == "v4"


def test_the_pointer_save_waits_for_the_lock(tmp_path):
    import threading

    from filelock import FileLock

    path = tmp_path / "promoted_models.json"
    dataset = JsonPointerDataset(filepath=str(path))
    update = move_promotion_pointer({}, din=_decision("v1", 0.8, {}))
    with FileLock(f"{path}.lock"):
        saver = threading.Thread(target=dataset.save, args=(update,))
        saver.start()
        saver.join(timeout=0.5)
        assert saver.is_alive() and not path.exists(), "saved while another run held the lock"
    saver.join(timeout=10)
    assert json.loads(path.read_text())["din"]["version"] == "v1"
