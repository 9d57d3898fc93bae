"""attention_ctr.serving end to end: raw ids in, probabilities out, from exported files."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import onnx
import onnx.numpy_helper
import pandas as pd
import pytest
import torch
from sandbox import make_project_copy

from attention_ctr.models import MODELS
from attention_ctr.sequences import SampleTensors
from attention_ctr.serving import (
    COLD_START,
    DIGESTS,
    KNOWN,
    UNKNOWN,
    Scorer,
    seal,
    table_sha256,
)


@pytest.fixture(scope="module")
def served(exported_run):
    project, catalog = exported_run
    data = {
        name.partition("@")[0]: catalog.load(name)
        for name in (
            "test_samples@pandas",
            "events@pandas",
            "feature_spec",
            "item_ids",
            "category_ids",
            "cold_start_items",
            "cold_start_weights",
        )
    }
    scorers = {name: Scorer.from_project(project, name, threads=1) for name in MODELS}
    return project, catalog, data, scorers


def _raw(data: dict, table: str, codes: np.ndarray) -> np.ndarray:
    ids = data[table].set_index(table.removesuffix("_ids"))["raw_id"]
    return ids.loc[codes].to_numpy()


def _user_request(data: dict, user: int) -> tuple[dict, np.ndarray]:
    """A test user's history and candidates in raw ids, and its test-sample rows."""
    samples = data["test_samples"]
    rows = np.flatnonzero(samples["user"].to_numpy() == user)
    first = samples.iloc[rows[0]]
    window = data["events"].iloc[first["hist_end"] - first["hist_len"] : first["hist_end"]]
    request = {
        "history_items": _raw(data, "item_ids", window["item"].to_numpy()),
        "history_categories": _raw(data, "category_ids", window["category"].to_numpy()),
        "history_timestamps": window["timestamp"].to_numpy(),
        "now": int(first["timestamp"]),
        "candidate_items": _raw(data, "item_ids", samples["item"].to_numpy()[rows]),
    }
    return request, rows


def _eager(catalog, data: dict, name: str, rows: np.ndarray, **targets) -> np.ndarray:
    tensors = SampleTensors(data["test_samples"].iloc[rows], data["events"], data["feature_spec"])
    batch = tensors.batch(torch.arange(len(rows)))
    batch.update({key: torch.full_like(batch[key], value) for key, value in targets.items()})
    with torch.inference_mode():
        return torch.sigmoid(catalog.load(f"{name}.model")(batch)).numpy()


def _cold_item_and_category(data: dict) -> tuple[int, int]:
    """A cold item (raw id) of a category with warm items, and that category (raw id)."""
    cold, weights = data["cold_start_items"], data["cold_start_weights"]
    cold = cold[cold["category"].isin(weights["category"])].iloc[0]
    return (
        _raw(data, "item_ids", np.array([cold["item"]]))[0],
        _raw(data, "category_ids", np.array([cold["category"]]))[0],
    )


@pytest.mark.parametrize("name", list(MODELS))
def test_raw_ids_score_like_the_trained_model(served, name):
    _, catalog, data, scorers = served
    for user in data["test_samples"]["user"].unique()[:4]:
        request, rows = _user_request(data, user)
        scores = scorers[name].score(**request)
        expected = _eager(catalog, data, name, rows)
        assert scores.shape == expected.shape
        np.testing.assert_allclose(scores, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", list(MODELS))
def test_unknown_item_of_a_known_category_takes_its_categorys_cold_start_vector(served, name):
    _, _, data, scorers = served
    request, _ = _user_request(data, data["test_samples"]["user"].iloc[0])
    cold_item, category = _cold_item_and_category(data)
    unknown = int(data["item_ids"]["raw_id"].max()) + 1000
    request.update(candidate_items=[cold_item, unknown], candidate_categories=[category, category])
    mapped = scorers[name].resolve(request["candidate_items"], request["candidate_categories"])
    assert mapped["source"].tolist() == [KNOWN, COLD_START]
    assert mapped["item"].iloc[1] == scorers[name].n_items + mapped["category"].iloc[1]
    # training gave the cold item its category's average: the unseen item scores the same
    scores = scorers[name].score(**request)
    assert scores[0] == pytest.approx(scores[1], abs=1e-6)


@pytest.mark.parametrize("name", list(MODELS))
def test_unknown_category_falls_back_to_the_padding_ids(served, name):
    _, catalog, data, scorers = served
    request, rows = _user_request(data, data["test_samples"]["user"].iloc[0])
    unknown_item = int(data["item_ids"]["raw_id"].max()) + 1000
    unknown_category = int(data["category_ids"]["raw_id"].max()) + 1000
    request.update(candidate_items=[unknown_item], candidate_categories=[unknown_category])
    mapped = scorers[name].resolve([unknown_item], [unknown_category])
    assert mapped[["item", "category", "source"]].values.tolist() == [[0, 0, UNKNOWN]]
    expected = _eager(catalog, data, name, rows[:1], target_item=0, target_category=0)
    np.testing.assert_allclose(scorers[name].score(**request), expected, rtol=0, atol=1e-5)

    # a behaviour with neither a known item nor a known category is left out of the history
    longer = dict(request)
    longer["history_items"] = [*request["history_items"], unknown_item]
    longer["history_categories"] = [*request["history_categories"], unknown_category]
    longer["history_timestamps"] = [*request["history_timestamps"], request["now"]]
    assert scorers[name].score(**longer) == pytest.approx(scorers[name].score(**request))


def test_history_order_batches_empty_history_and_explicit_files(served):
    project, catalog, data, scorers = served
    scorer = scorers["bst"]
    request, _ = _user_request(data, data["test_samples"]["user"].unique()[1])
    scores = scorer.score(**request)
    shuffled = np.random.default_rng(0).permutation(len(request["history_items"]))
    reordered = {
        **request,
        **{key: request[key][shuffled] for key in ("history_items", "history_categories")},
        "history_timestamps": request["history_timestamps"][shuffled],
    }
    np.testing.assert_allclose(scorer.score(**reordered), scores, atol=1e-6)

    version = catalog.get("bst.serving_metadata").resolve_load_version()
    folder = project / "data" / "06_models" / "bst" / "serving"
    files = ("request_model.onnx", "metadata.json", "items.parquet", "categories.parquet")
    chunked = Scorer.from_files(
        *(folder / name / version / name for name in files),
        max_batch=1,
        cache_size=0,
    )
    np.testing.assert_allclose(chunked.score(**request), scores, atol=1e-6)

    empty = scorer.score([], request["candidate_items"], history_timestamps=[], now=request["now"])
    assert empty.shape == scores.shape and np.all((empty > 0) & (empty < 1))


def test_repeated_requests_come_from_the_lru_cache(served):
    project, _, data, _ = served
    scorer = Scorer.from_project(project, "din", threads=1, cache_size=2)
    users = data["test_samples"]["user"].unique()
    first, _ = _user_request(data, users[0])
    second, _ = _user_request(data, users[1])
    scores = scorer.score(**first)
    scores[:] = -1  # callers get copies: the cache is not theirs to change
    again = scorer.score(**first)
    assert (scorer.cache_hits, scorer.cache_misses) == (1, 1) and np.all(again >= 0)
    scorer.score(**second)
    scorer.score(**{**first, "candidate_items": first["candidate_items"][::-1]})
    scorer.score(**first)  # evicted by the two requests since its last use
    assert (scorer.cache_hits, scorer.cache_misses) == (1, 4)


def test_bad_input_gives_clear_errors(served):
    project, catalog, data, scorers = served
    request, _ = _user_request(data, data["test_samples"]["user"].iloc[0])
    din, bst = scorers["din"], scorers["bst"]
    history, candidates = request["history_items"], request["candidate_items"]
    with pytest.raises(ValueError, match="candidate_items is empty"):
        din.score(history, [])
    with pytest.raises(ValueError, match="candidate_categories has 1 entries but candidate_items"):
        din.score(history, candidates, candidate_categories=[1])
    with pytest.raises(ValueError, match="history_items must hold integer raw item ids"):
        din.score(["a", "b"], candidates)
    with pytest.raises(ValueError, match="candidate_items must be a 1-D sequence"):
        din.score(history, [candidates])
    with pytest.raises(ValueError, match="bst uses the time gap .* pass history_timestamps"):
        bst.score(history, candidates)
    with pytest.raises(ValueError, match="after now"):
        bst.score(**{**request, "now": int(request["history_timestamps"].max()) - 1})
    with pytest.raises(ValueError, match="history_timestamps must be integer seconds"):
        bst.score(**{**request, "history_timestamps": request["history_timestamps"] + 0.5})
    with pytest.raises(ValueError, match=r"history_behaviors holds \['click'\]"):
        din.score(history[:1], candidates, history_behaviors=["click"])
    with pytest.raises(ValueError, match="different export runs"):
        Scorer(
            catalog.load("din.onnx_request_model"),
            catalog.load("bst.serving_metadata"),
            catalog.load("din.serving_items"),
            catalog.load("din.serving_categories"),
        )
    with pytest.raises(ValueError, match=r"unknown model 'wide_and_deep'; expected one of \["):
        Scorer.from_project(project, "wide_and_deep")


@pytest.mark.parametrize(
    ("argument", "value"),
    [
        ("history_items", 5),
        ("history_items", "1040"),
        ("candidate_items", 7),
        ("candidate_items", "3091"),
        ("history_categories", "12"),
        ("candidate_categories", 12),
        ("history_timestamps", 1511540000),
        ("history_behaviors", "pv"),
    ],
)
def test_a_scalar_or_a_string_where_a_list_is_expected_is_a_value_error(served, argument, value):
    _, _, data, scorers = served
    request, _ = _user_request(data, data["test_samples"]["user"].iloc[0])
    request[argument] = value
    with pytest.raises(ValueError, match=f"^{argument} must be a 1-D sequence"):
        scorers["bst"].score(**request)
    if argument.startswith("candidate"):
        with pytest.raises(ValueError, match=f"^{argument} must be a 1-D sequence"):
            scorers["bst"].resolve(**{"candidate_items": [1], argument: value})


def test_millisecond_timestamps_and_an_implausible_default_now_are_refused(served):
    _, _, data, scorers = served
    bst, din = scorers["bst"], scorers["din"]
    request, _ = _user_request(data, data["test_samples"]["user"].iloc[0])
    milliseconds = request["history_timestamps"] * 1000
    with pytest.raises(ValueError, match="^history_timestamps holds .* looks like milliseconds"):
        bst.score(**{**request, "history_timestamps": milliseconds})
    with pytest.raises(ValueError, match="^history_timestamps holds .* looks like milliseconds"):
        din.score(**{**request, "history_timestamps": milliseconds, "now": None})
    with pytest.raises(ValueError, match="^now is .* looks like milliseconds"):
        bst.score(**{**request, "now": request["now"] * 1000})
    with pytest.raises(ValueError, match="^now must be a number of seconds"):
        bst.score(**{**request, "now": str(request["now"])})

    # `now` left to the wall clock: the history must be on the same clock (within 365 days)
    clock = int(time.time())
    shift = clock - int(request["history_timestamps"].max())
    old = request["history_timestamps"] + shift - 2 * 365 * 86400
    recent = request["history_timestamps"] + shift - 60
    with pytest.raises(ValueError, match=r"days before the wall clock .* pass now"):
        bst.score(**{**request, "history_timestamps": old, "now": None})
    assert np.isfinite(bst.score(**{**request, "history_timestamps": recent, "now": None})).all()
    # a model without time gaps only orders the history by its timestamps: no `now` needed
    assert np.isfinite(din.score(**{**request, "history_timestamps": old, "now": None})).all()


@pytest.mark.parametrize("env", ["..", "../conf", "/tmp", "base/../..", "nowhere", ""])
def test_env_must_name_an_environment_of_the_projects_conf(served, env):
    project, _, _, _ = served
    with pytest.raises(ValueError, match=r"^env must be the name of an environment in .*conf"):
        Scorer.from_project(project, "din", env=env)


def test_a_plain_environment_name_loads(served):
    project, _, _, scorers = served
    scorer = Scorer.from_project(project, "din", env="local", threads=1)
    assert scorer.metadata == scorers["din"].metadata


# -------------------------------------------------------------------------- bundle integrity
BUNDLE = (
    "request_model.onnx",
    "model.onnx",
    "metadata.json",
    "items.parquet",
    "categories.parquet",
)
HEX = "[0-9a-f]{64}"


@pytest.fixture
def sealed(exported_run, tmp_path):
    """A project holding a copy of BST's promoted bundle and of the pointer, to alter."""
    source, _ = exported_run
    project = make_project_copy(tmp_path / "project", source=source)
    pointer_file = Path("data") / "06_models" / "promoted_models.json"
    pointer = json.loads((source / pointer_file).read_text())
    version = pointer["bst"]["version"]
    folder = Path("data") / "06_models" / "bst" / "serving"
    files = {}
    for name in BUNDLE:
        files[name] = project / folder / name / version / name
        files[name].parent.mkdir(parents=True)
        shutil.copy2(source / folder / name / version / name, files[name])
    (project / pointer_file).write_text(json.dumps(pointer))
    return project, files, project / pointer_file


def _nudge_a_weight(path: Path) -> None:
    """A valid graph that scores differently: one weight of the graph moved by 1e-3."""
    graph = onnx.load(path)
    initializer = next(
        item
        for item in graph.graph.initializer
        if item.data_type == onnx.TensorProto.FLOAT and np.prod(item.dims) > 1
    )
    values = onnx.numpy_helper.to_array(initializer).copy()
    values.flat[0] += 1e-3
    initializer.CopyFrom(onnx.numpy_helper.from_array(values, initializer.name))
    onnx.save(graph, path)


def _reverse_raw_ids(path: Path) -> None:
    table = pd.read_parquet(path)
    table["raw_id"] = table["raw_id"].to_numpy()[::-1]
    table.to_parquet(path)


def _edit_metadata(path: Path, reseal: bool = False, **fields) -> None:
    metadata = {**json.loads(path.read_text()), **fields}
    metadata = {key: value for key, value in metadata.items() if value is not None}
    if reseal:
        metadata = seal(metadata)
    path.write_text(json.dumps(metadata, indent=2))


def test_the_sealed_copy_loads_and_scores_like_the_export(served, sealed):
    source, _, data, _ = served
    project, files, _ = sealed
    request, _ = _user_request(data, data["test_samples"]["user"].iloc[0])
    promoted = Scorer.from_project(project, "bst", version="promoted", threads=1)
    assert set(promoted.digests) == set(BUNDLE)
    original = Scorer.from_project(source, "bst", version=promoted.version, threads=1)
    explicit = Scorer.from_files(
        *(files[name] for name in BUNDLE if name != "model.onnx"),
        onnx_path=files["model.onnx"],
        threads=1,
    )
    for scorer in (promoted, explicit):
        np.testing.assert_array_equal(scorer.score(**request), original.score(**request))


@pytest.mark.parametrize(
    ("file", "alter"),
    [
        ("request_model.onnx", _nudge_a_weight),
        ("model.onnx", _nudge_a_weight),
        ("items.parquet", _reverse_raw_ids),
        ("categories.parquet", _reverse_raw_ids),
        ("metadata.json", partial(_edit_metadata, max_history=2)),
        ("metadata.json", partial(_edit_metadata, time_gap_edges=[60, 3600])),
    ],
    ids=["request_graph", "batch_graph", "items", "categories", "max_history", "edges"],
)
def test_an_altered_file_of_a_sealed_bundle_is_a_one_line_error_naming_it(sealed, file, alter):
    project, files, _ = sealed
    alter(files[file])
    pattern = rf"^{re.escape(file)} of bst \(version .*\) does not match .*{HEX} != {HEX}"
    for version in (None, "promoted"):
        with pytest.raises(ValueError, match=pattern) as caught:
            Scorer.from_project(project, "bst", version=version, threads=1)
        assert "\n" not in str(caught.value)
    arguments = [files[name] for name in BUNDLE if name != "model.onnx"]
    with pytest.raises(ValueError, match=rf"^{re.escape(file)} of bst does not match"):
        Scorer.from_files(*arguments, onnx_path=files["model.onnx"], threads=1)


def test_a_metadata_edited_and_resealed_after_promotion_is_caught_by_the_pointer(sealed):
    project, files, _ = sealed
    _edit_metadata(files["metadata.json"], reseal=True, max_history=2)
    pattern = rf"^metadata.json of bst .* promoted_models.json: sha256 {HEX} != {HEX}"
    with pytest.raises(ValueError, match=pattern):
        Scorer.from_project(project, "bst", version="promoted", threads=1)


@pytest.mark.parametrize("key", ["metadata_sha256", "items_sha256", "onnx_sha256"])
def test_an_altered_pointer_is_a_one_line_error_naming_the_file(sealed, key):
    project, _, pointer_file = sealed
    pointer = json.loads(pointer_file.read_text())
    pointer["bst"][key] = "0" * 64
    pointer_file.write_text(json.dumps(pointer))
    file = {value: name for name, value in DIGESTS.items()}[key]
    pattern = rf"^{re.escape(file)} of bst .* promoted_models.json: sha256 {HEX} != 0{{64}}"
    with pytest.raises(ValueError, match=pattern):
        Scorer.from_project(project, "bst", version="promoted", threads=1)
    Scorer.from_project(project, "bst", threads=1)  # the bundle itself is intact


def test_bundles_and_pointers_from_before_the_digests_say_to_export_again(sealed):
    project, files, pointer_file = sealed
    pointer = json.loads(pointer_file.read_text())
    del pointer["bst"]["metadata_sha256"]
    pointer_file.write_text(json.dumps(pointer))
    with pytest.raises(ValueError, match="records no metadata_sha256: .* promote again"):
        Scorer.from_project(project, "bst", version="promoted", threads=1)
    old = {"metadata_sha256": None, "items_sha256": None, "categories_sha256": None}
    _edit_metadata(files["metadata.json"], **old)
    with pytest.raises(ValueError, match="^metadata.json of bst has no metadata_sha256: .* again"):
        Scorer.from_project(project, "bst", threads=1)


def test_table_digests_follow_the_content_not_the_dtype_flavour_or_the_file(tmp_path):
    table = pd.DataFrame(
        {
            "raw_id": pd.Series(["a", "bc", ""], dtype=object),
            "item": np.arange(1, 4),
            "cold": [True, False, True],
        }
    )
    digest = table_sha256(table)
    assert table_sha256(table.astype({"raw_id": "string"})) == digest
    table.to_parquet(tmp_path / "items.parquet")
    assert table_sha256(pd.read_parquet(tmp_path / "items.parquet")) == digest
    assert table_sha256(table.set_index("item", drop=False)) == digest  # the index is ignored
    # the same bytes split differently between strings must not collide
    assert table_sha256(table.assign(raw_id=["ab", "c", ""])) != digest
    assert table_sha256(table.assign(raw_id=["a", "b", "c"])) != digest
    assert table_sha256(table.iloc[::-1]) != digest


# Run in a fresh interpreter where the training stack cannot be imported at all, as on a server
# that installed only the serving dependencies.
_WITHOUT_TRAINING_STACK = """
import importlib.abc, json, sys

class Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"torch", "kedro", "kedro_datasets", "sklearn", "onnx"}:
            raise ImportError(f"{name} is not installed on this server")

sys.meta_path.insert(0, Blocked())
from attention_ctr.serving import Scorer

files, request = json.loads(sys.stdin.read())
scorer = Scorer.from_files(*files, threads=1)
print(json.dumps(scorer.score(**request).tolist()))
"""


def test_a_server_without_torch_scores_the_exported_files_alike(served):
    project, catalog, data, scorers = served
    request, _ = _user_request(data, data["test_samples"]["user"].unique()[2])
    version = catalog.get("bst.serving_metadata").resolve_load_version()
    folder = project / "data" / "06_models" / "bst" / "serving"
    names = ("request_model.onnx", "metadata.json", "items.parquet", "categories.parquet")
    files = [str(folder / name / version / name) for name in names]
    plain = {key: np.asarray(value).tolist() for key, value in request.items()}
    result = subprocess.run(
        [sys.executable, "-c", _WITHOUT_TRAINING_STACK],
        input=json.dumps([files, plain]),
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    scores = np.array(json.loads(result.stdout.strip().splitlines()[-1]), dtype=np.float32)
    np.testing.assert_allclose(scores, scorers["bst"].score(**request), rtol=0, atol=1e-6)
