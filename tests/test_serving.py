"""attention_ctr.serving end to end: raw ids in, probabilities out, from exported files."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from attention_ctr.models import MODELS
from attention_ctr.sequences import SampleTensors
from attention_ctr.serving import COLD_START, KNOWN, UNKNOWN, Scorer


@pytest.fixture(scope="module")
def served(exported_run):
    project, catalog = exported_run
    data = {
        name: catalog.load(name)
        for name in (
            "test_samples",
            "events",
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
    with pytest.raises(FileNotFoundError, match="No export of wide_and_deep"):
        Scorer.from_project(project, "wide_and_deep")


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
