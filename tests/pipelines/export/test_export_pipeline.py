"""The export pipeline through real Kedro runs on a small synthetic log (one shared run)."""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import pandas as pd
import pytest
import torch
from conftest import EXPORT_RUN
from kedro.io.core import generate_timestamp
from onnx import numpy_helper
from sandbox import run_pipeline

from attention_ctr.bundle import add_cold_start_rows
from attention_ctr.models import MODELS, build_model
from attention_ctr.onnx_export import onnx_feed, onnx_session
from attention_ctr.pipelines.export.nodes import ParityError
from attention_ctr.sequences import SampleTensors
from attention_ctr.serving import Scorer


def _versions(project, name: str) -> list[str]:
    folder = project / "data" / "06_models" / name / "serving" / "model.onnx"
    return sorted(path.name for path in folder.iterdir())


@pytest.mark.parametrize("name", list(MODELS))
def test_every_model_exports_a_versioned_graph_that_matches_the_trained_model(exported_run, name):
    project, catalog = exported_run
    (version,) = _versions(project, name)
    folder = project / "data" / "06_models" / name / "serving"
    parts = ("model.onnx", "request_model.onnx", "metadata.json", "items.parquet")
    for part in (*parts, "categories.parquet"):
        assert (folder / part / version / part).is_file(), part

    report = catalog.load(f"{name}.export_report")
    parity = report["parity"]
    assert report["model"] == name and parity["max_abs_diff"] <= 1e-5
    for graph in ("batch", "request"):
        checks = [check for check in parity["checks"] if check["graph"] == graph]
        shapes = {(check["batch_size"], check["history_length"]) for check in checks}
        assert {(1, 1), (7, 1), (64, 1), (1, 12), (64, 12)} <= shapes  # 12 = max_history
        assert any(check["targets"] == "cold_start_rows" for check in checks)
        assert report["latency"][f"onnxruntime_{graph}_ms_per_1000"] > 0
        assert report["latency"][f"torch_{graph}_ms_per_1000"] > 0

    # Independently of the gate: the exported_run graph against the trained model, whole test split.
    session = onnx_session(catalog.load(f"{name}.onnx_model"))
    model = catalog.load(f"{name}.model")
    test = SampleTensors(
        catalog.load("test_samples@pandas"),
        catalog.load("events@pandas"),
        catalog.load("feature_spec"),
    )
    with torch.inference_mode():
        for batch, _ in test.batches(256):
            expected = torch.sigmoid(model(batch))
            (logits,) = session.run(None, onnx_feed(session, batch))
            assert (torch.sigmoid(torch.from_numpy(logits)) - expected).abs().max() <= 1e-5


def test_graph_item_table_holds_each_categorys_cold_start_vector(exported_run):
    _, catalog = exported_run
    model = catalog.load("din.model")
    n_items, n_categories = model.config["n_items"], model.config["n_categories"]
    graph = onnx.load_from_string(catalog.load("din.onnx_model"))
    (table,) = [
        numpy_helper.to_array(tensor)
        for tensor in graph.graph.initializer
        if tuple(tensor.dims) == (n_items + 1 + n_categories, model.config["embedding_dim"])
    ]
    trained = model.item_embedding.weight.detach().numpy()
    np.testing.assert_array_equal(table[: n_items + 1], trained)
    cold, weights = catalog.load("cold_start_items"), catalog.load("cold_start_weights")
    cold = cold[cold["category"].isin(weights["category"])]
    assert len(cold), "the small log should have cold items in categories with warm items"
    # training gave cold items their category's average: the graph's row n_items + c is it
    np.testing.assert_allclose(
        table[n_items + cold["category"].to_numpy()], trained[cold["item"].to_numpy()], atol=0
    )


def test_a_perturbed_graph_fails_the_parity_gate_naming_model_shape_and_difference(exported_run):
    project, catalog = exported_run
    graph = onnx.load_from_string(catalog.load("din.onnx_model"))
    (bias,) = [t for t in graph.graph.initializer if t.name.endswith("mlp.output.bias")]
    bias.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(bias) + 0.5, bias.name))
    version = generate_timestamp()
    folder = project / "data" / "06_models" / "din" / "serving" / "model.onnx" / version
    folder.mkdir(parents=True)
    (folder / "model.onnx").write_bytes(graph.SerializeToString())
    try:
        with pytest.raises(ParityError, match=r"of din .* by 0\.\d+ at batch \d+ x history \d+"):
            run_pipeline(
                project,
                "export",
                EXPORT_RUN,
                node_names=["din.add_cold_start_rows", "din.check_parity"],
                load_versions={"din.onnx_model": version},
            )
    finally:
        shutil.rmtree(folder)


def test_a_second_export_adds_a_version_and_the_first_still_loads(exported_run):
    project, _ = exported_run
    (first,) = _versions(project, "din")
    catalog = run_pipeline(project, "export", EXPORT_RUN, namespaces=["din"])
    versions = _versions(project, "din")
    assert len(versions) == 2 and versions[0] == first
    assert len(_versions(project, "bst")) == 1

    old = Scorer.from_project(project, "din", version=first)
    new = Scorer.from_project(project, "din")
    assert new.metadata == catalog.load("din.serving_metadata")
    assert (
        old.metadata["onnx_sha256"]
        == catalog.load("din.serving_metadata", version=first)["onnx_sha256"]
    )
    items = catalog.load("din.serving_items", version=first)["raw_id"].to_numpy()
    np.testing.assert_allclose(old.score(items[:5], items[5:9]), new.score(items[:5], items[5:9]))


def test_export_refuses_a_model_trained_on_other_features():
    model = build_model("din", n_items=10, n_categories=3, max_history=4, embedding_dim=4)
    item_ids = pd.DataFrame({"raw_id": range(9), "item": range(1, 10), "category": [1] * 9})
    weights = pd.DataFrame({"category": [1], "item": [1], "weight": [1.0]})
    with pytest.raises(ValueError, match="trained on 10 items .* 9 items .* retrain"):
        add_cold_start_rows(model, model, item_ids, weights)
