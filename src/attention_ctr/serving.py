"""Score candidate items for one user's history, given in RAW ids, with an exported ONNX model.

The export pipeline writes one bundle per model and run, all files with the same version:
`request_model.onnx` (the request graph: one history `[1, L]`, K candidates; see
`attention_ctr.onnx_export`), `metadata.json` (inputs, max_history, time-gap edges, sizes, the
graphs' sha256), `items.parquet` (raw id -> row of the item table, category, cold flag) and
`categories.parquet` (raw id -> category, the row of its cold-start vector); `model.onnx`, the
batch graph, is for batch scoring elsewhere.

How raw ids become graph inputs (vectorised, no per-item Python):

- A known item scores with its own trained row and the category it was trained with (the
  category of its first logged behaviour; a category the caller passes is then ignored).
- An unknown item whose category is known (pass `candidate_categories` /
  `history_categories`) maps to row `n_items + c` of the exported item table: category c's
  frequency-weighted average of its warm items' embeddings, the same vector training gave the
  category's cold items, plus category c's own embedding. The graph takes ids, not vectors, so
  export appended one such row per category (`add_cold_start_rows`); nothing is approximated.
- An unknown item of an unknown (or missing) category has no information at all. As a
  candidate it falls back to the padding ids (item 0, category 0: zero vectors), so its score
  comes from the history alone, and `resolve` reports it as `unknown`; rank such items by
  other means if that matters. In the history such a behaviour is dropped.

Histories are sorted by timestamp when timestamps are given (else taken oldest first), cut to
the most recent `max_history` behaviours, and shared by all candidates: a request is ONE
call of the request graph (split in chunks of `max_batch` candidates). Models with a
time-gap position (BST) need `history_timestamps` and the request time `now`: the gaps are
bucketised with the project's `time_gap_bucket`, as in feature engineering. A history with no
usable behaviour is scored as an empty (fully padded) history. Repeated requests (the same
encoded history and candidates: page reloads, hot items re-ranked for a returning user) are
served from a small LRU cache of scores; raw-id lookups need no cache, they are a binary search
over the sorted id tables.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from attention_ctr.runtime import onnx_session, sigmoid, time_gap_buckets

KNOWN, COLD_START, UNKNOWN = "known", "cold_start_category", "unknown"
SOURCES = np.array([KNOWN, COLD_START, UNKNOWN])  # Request.source holds indices into this


class _IdIndex:
    """Raw ids -> codes by binary search over the sorted raw ids (0 where unknown)."""

    def __init__(self, raw: pd.Series, codes: pd.Series, what: str):
        raw_values = raw.to_numpy()
        self.numeric = raw_values.dtype.kind in "iu"
        raw_values = raw_values.astype(np.int64 if self.numeric else str)
        order = np.argsort(raw_values, kind="stable")
        self.raw = raw_values[order]
        self.codes = codes.to_numpy(np.int64)[order]
        self.what = what

    def _values(self, values: object, argument: str) -> np.ndarray:
        array = np.asarray(values)
        if array.ndim != 1:
            raise ValueError(f"{argument} must be a 1-D sequence of raw {self.what} ids")
        if self.numeric:
            if len(array) and array.dtype.kind not in "iu":
                raise ValueError(
                    f"{argument} must hold integer raw {self.what} ids like the training log's, "
                    f"got dtype {array.dtype}"
                )
            return array.astype(np.int64)
        if len(array) and array.dtype.kind not in "UO":
            raise ValueError(
                f"{argument} must hold string raw {self.what} ids like the training log's, "
                f"got dtype {array.dtype}"
            )
        return array.astype(str)

    def encode(self, values: object, argument: str) -> np.ndarray:
        array = self._values(values, argument)
        if not len(self.raw):
            return np.zeros(len(array), dtype=np.int64)
        position = np.minimum(np.searchsorted(self.raw, array), len(self.raw) - 1)
        return np.where(self.raw[position] == array, self.codes[position], 0)


@dataclass(frozen=True)
class Request:
    """One request encoded for the graph: a history `[L]` shared by `K` candidates."""

    hist_item: np.ndarray
    hist_category: np.ndarray
    time_gap: np.ndarray
    hist_behavior: np.ndarray
    target_item: np.ndarray
    target_category: np.ndarray
    source: np.ndarray  # per candidate: 0 known, 1 cold start (category), 2 unknown (SOURCES)

    def key(self) -> tuple:
        arrays = (self.hist_item, self.hist_category, self.time_gap, self.hist_behavior)
        history = b"|".join(array.tobytes() for array in arrays)
        return history, self.target_item.tobytes(), self.target_category.tobytes()


def _promoted_version(catalog, model: str, project_path: Path) -> str:
    pointer = catalog.load("promoted_models")
    if model not in pointer:
        promoted = ", ".join(sorted(pointer)) or "none"
        raise FileNotFoundError(
            f"No promoted version of {model} in {project_path} (promoted: {promoted}): run "
            "`kedro run --pipeline retraining` (its promotion_report says why a model was kept out)"
        )
    return pointer[model]["version"]


class Scorer:
    """Scores candidates for a user's raw-id history with an exported model (see module doc).

    Build it with `Scorer.from_project(path, "din")` (the newest export of a Kedro project, or
    `version=`) or `Scorer.from_files(...)` (explicit paths). `score(...)` returns click
    probabilities; `resolve(...)` says how each candidate id was mapped.
    """

    def __init__(
        self,
        graph: bytes,
        metadata: dict,
        items: pd.DataFrame,
        categories: pd.DataFrame,
        *,
        threads: int = 2,
        cache_size: int = 1024,
        max_batch: int = 4096,
    ) -> None:
        name = metadata.get("model", "?")
        digest = hashlib.sha256(graph).hexdigest()
        if digest != metadata.get("request_onnx_sha256"):
            raise ValueError(
                f"The request graph of {name} does not match its serving metadata (sha256 "
                f"{digest} vs {metadata.get('request_onnx_sha256')}): the files come from "
                "different export runs"
            )
        self.metadata = metadata
        self.model = name
        self.n_items = int(metadata["n_items"])
        self.max_history = int(metadata["max_history"])
        if len(items) != self.n_items or len(categories) != int(metadata["n_categories"]):
            raise ValueError(
                f"The serving tables of {name} hold {len(items)} items and {len(categories)} "
                f"categories, the graph {self.n_items} and {metadata['n_categories']}: "
                "the files come from different export runs"
            )
        try:
            self._session = onnx_session(graph, threads)
        except Exception as error:  # onnxruntime raises its own Fail, InvalidGraph, ...
            raise ValueError(
                f"The request graph of {name} is not a valid ONNX model: {error}"
            ) from error
        self._inputs = [item.name for item in self._session.get_inputs()]
        self._output = metadata["output"]
        self._items = _IdIndex(items["raw_id"], items["item"], "item")
        self._categories = _IdIndex(categories["raw_id"], categories["category"], "category")
        self._item_category = np.zeros(self.n_items + 1, dtype=np.int64)
        self._item_category[items["item"].to_numpy(np.int64)] = items["category"].to_numpy()
        self._edges = np.asarray(metadata["time_gap_edges"], dtype=np.int64)
        self._names = [str(name) for name in metadata["behaviors"]]  # code = position + 1
        self._behavior_codes = _IdIndex(
            pd.Series(self._names, dtype=object),
            pd.Series(np.arange(1, len(self._names) + 1)),
            "behaviour",
        )
        self.max_batch = int(max_batch)
        self.cache_size = int(cache_size)
        self._cache: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self.cache_hits = self.cache_misses = 0

    # -- loading ----------------------------------------------------------------------------
    @classmethod
    def from_files(
        cls,
        request_onnx_path: str | Path,
        metadata_path: str | Path,
        items_path: str | Path,
        categories_path: str | Path,
        **options,
    ) -> Scorer:
        """From explicit paths of the files of one export run (the request graph's first).

        Needs only the serving dependencies: the graph is checked against the metadata's
        sha256 and by onnxruntime when the session is built.
        """
        graph = Path(request_onnx_path).read_bytes()
        metadata = json.loads(Path(metadata_path).read_text())
        items, categories = pd.read_parquet(items_path), pd.read_parquet(categories_path)
        return cls(graph, metadata, items, categories, **options)

    @classmethod
    def from_project(
        cls,
        project_path: str | Path,
        model: str,
        *,
        version: str | None = None,
        env: str | None = None,
        **options,
    ) -> Scorer:
        """From a Kedro project's catalog: the newest complete export of `model` or `version`.

        The newest version of `{model}.serving_metadata` is the anchor: it is written only when
        the run's parity gate passed, and the other files are loaded at its version.
        `version="promoted"` loads the version the promotion gate let serve (`promoted_models`).
        Reading a Kedro catalog needs Kedro (the `pipelines` extra); a server that has only the
        `serving` dependencies uses `from_files`.
        """
        from kedro.framework.session import KedroSession
        from kedro.framework.startup import bootstrap_project
        from kedro.io.core import DatasetError

        project_path = Path(project_path).resolve()
        bootstrap_project(project_path)
        with KedroSession.create(project_path=project_path, env=env) as session:
            catalog = session.load_context().catalog
            anchor = f"{model}.serving_metadata"
            if anchor not in catalog:
                raise ValueError(f"{project_path} has no catalog entry {anchor}")
            if version == "promoted":
                version = _promoted_version(catalog, model, project_path)
            try:
                version = version or catalog.get(anchor).resolve_load_version()
            except DatasetError as error:
                raise FileNotFoundError(
                    f"No export of {model} in {project_path}: run `kedro run --pipeline export`"
                ) from error
            parts = (
                "onnx_request_model",
                "serving_metadata",
                "serving_items",
                "serving_categories",
            )
            loaded = []
            for part in parts:
                try:
                    loaded.append(catalog.load(f"{model}.{part}", version=version))
                except DatasetError as error:
                    raise FileNotFoundError(
                        f"Export {version} of {model} is incomplete: {model}.{part} is missing "
                        f"or unreadable ({error})"
                    ) from error
        return cls(*loaded, **options)

    # -- encoding ---------------------------------------------------------------------------
    def _lengths(self, arrays: dict[str, object | None], reference: str) -> int:
        size = len(np.asarray(arrays[reference]))
        for argument, values in arrays.items():
            if values is not None and len(np.asarray(values)) != size:
                raise ValueError(
                    f"{argument} has {len(np.asarray(values))} entries but {reference} has {size}"
                )
        return size

    def _rows(
        self, items: object, categories: object | None, argument: str
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Item-table rows, encoded categories and sources (indices into SOURCES)."""
        item = self._items.encode(items, argument)
        category = self._item_category[item]
        known = item > 0
        if categories is None:
            given = np.zeros(len(item), dtype=np.int64)
        else:
            given = self._categories.encode(categories, argument.replace("items", "categories"))
        cold = ~known & (given > 0)
        item = np.where(cold, self.n_items + given, item)
        category = np.where(cold, given, category)
        source = np.where(known, 0, np.where(cold, 1, 2))
        return item, category, source

    def resolve(self, candidate_items: object, candidate_categories: object = None) -> pd.DataFrame:
        """How each candidate maps into the graph: item row, category and source."""
        size = self._lengths(
            {"candidate_items": candidate_items, "candidate_categories": candidate_categories},
            "candidate_items",
        )
        item, category, source = self._rows(
            candidate_items, candidate_categories, "candidate_items"
        )
        return pd.DataFrame(
            {"raw_id": np.asarray(candidate_items)[:size], "item": item, "category": category}
        ).assign(source=SOURCES[source])

    def encode(
        self,
        history_items: object,
        candidate_items: object,
        *,
        history_categories: object = None,
        candidate_categories: object = None,
        history_timestamps: object = None,
        now: int | None = None,
        history_behaviors: object = None,
    ) -> Request:
        """The request as graph ids (see `score` for the arguments)."""
        self._lengths(
            {
                "history_items": history_items,
                "history_categories": history_categories,
                "history_timestamps": history_timestamps,
                "history_behaviors": history_behaviors,
            },
            "history_items",
        )
        candidates = self._lengths(
            {"candidate_items": candidate_items, "candidate_categories": candidate_categories},
            "candidate_items",
        )
        if not candidates:
            raise ValueError("candidate_items is empty: there is nothing to score")
        uses_time_gap = "time_gap" in self._inputs
        uses_behavior = "hist_behavior" in self._inputs
        if uses_time_gap and history_timestamps is None:
            raise ValueError(
                f"{self.model} uses the time gap of each behaviour to the request: pass "
                "history_timestamps (seconds, like the training log) and now"
            )
        if uses_behavior and history_behaviors is None:
            raise ValueError(f"{self.model} uses behaviour types: pass history_behaviors")

        item, category, source = self._rows(history_items, history_categories, "history_items")
        keep = source != 2  # a behaviour with no known item or category tells nothing
        gap = np.zeros(len(item), dtype=np.int64)
        behavior = np.zeros(len(item), dtype=np.int64)
        if history_timestamps is not None:
            stamps = np.asarray(history_timestamps)
            if len(stamps) and stamps.dtype.kind not in "iu":
                raise ValueError(
                    f"history_timestamps must be integer seconds, got dtype {stamps.dtype}"
                )
            stamps = stamps.astype(np.int64)
            now = int(time.time()) if now is None else int(now)
            if len(stamps) and stamps.max() > now:
                raise ValueError(
                    f"history_timestamps has a behaviour at {stamps.max()}, after now ({now})"
                )
            gap = time_gap_buckets(now - stamps, self._edges)
            order = np.argsort(stamps, kind="stable")  # oldest first
            keep = keep[order]
            item, category, gap = item[order], category[order], gap[order]
        else:
            order = np.arange(len(item))
        if history_behaviors is not None:
            behavior = self._behavior_codes.encode(
                np.asarray(history_behaviors).astype(str)[order], "history_behaviors"
            )
            if not behavior.all():
                given = np.asarray(history_behaviors).astype(str).tolist()
                unknown = sorted(set(given) - set(self._names))
                raise ValueError(
                    f"history_behaviors holds {unknown}; expected some of {self._names}"
                )
        kept = np.flatnonzero(keep)[-self.max_history :]  # the most recent known behaviours
        target_item, target_category, target_source = self._rows(
            candidate_items, candidate_categories, "candidate_items"
        )
        return Request(
            hist_item=item[kept],
            hist_category=category[kept],
            time_gap=gap[kept],
            hist_behavior=behavior[kept],
            target_item=target_item,
            target_category=target_category,
            source=target_source,
        )

    # -- scoring ----------------------------------------------------------------------------
    def score(
        self,
        history_items: object,
        candidate_items: object,
        *,
        history_categories: object = None,
        candidate_categories: object = None,
        history_timestamps: object = None,
        now: int | None = None,
        history_behaviors: object = None,
    ) -> np.ndarray:
        """Click probabilities `[K]` of `candidate_items` (raw ids) for one user's history.

        `history_items` (raw ids, oldest first unless `history_timestamps` orders them) with
        optional `history_categories` (raw; needed only for items the model never saw),
        `history_timestamps` (integer seconds; with `now`, the request time, by default the
        wall clock; required by time-gap models) and
        `history_behaviors` (names such as "pv", for models trained with behaviour types).
        `candidate_categories` (raw) lets unknown candidates use their category's cold-start
        vector.
        """
        request = self.encode(
            history_items,
            candidate_items,
            history_categories=history_categories,
            candidate_categories=candidate_categories,
            history_timestamps=history_timestamps,
            now=now,
            history_behaviors=history_behaviors,
        )
        return self.score_request(request)

    def score_request(self, request: Request) -> np.ndarray:
        """Probabilities for an encoded request, from the cache or one graph call per chunk."""
        key = request.key() if self.cache_size else None
        if key is not None:
            with self._lock:
                cached = self._cache.get(key)
                if cached is not None:
                    self._cache.move_to_end(key)
                    self.cache_hits += 1
                    return cached.copy()
                self.cache_misses += 1
        logits = np.concatenate(
            [
                self._run(request, start, min(start + self.max_batch, len(request.target_item)))
                for start in range(0, len(request.target_item), self.max_batch)
            ]
        )
        probabilities = sigmoid(logits)
        if key is not None:
            with self._lock:
                self._cache[key] = probabilities
                if len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
        return probabilities.copy()

    def _run(self, request: Request, start: int, stop: int) -> np.ndarray:
        """One call of the request graph: the history `[1, L]` against candidates `start:stop`."""
        if len(request.hist_item):
            mask = np.ones((1, len(request.hist_item)), dtype=bool)
        else:  # no usable history: one padded position (the graph needs L >= 1)
            mask = np.zeros((1, 1), dtype=bool)

        def row(values: np.ndarray) -> np.ndarray:
            return (values if len(values) else np.zeros(1, dtype=np.int64))[None, :]

        feed = {
            "target_item": request.target_item[start:stop],
            "target_category": request.target_category[start:stop],
            "hist_item": row(request.hist_item),
            "hist_category": row(request.hist_category),
            "time_gap": row(request.time_gap),
            "hist_behavior": row(request.hist_behavior),
            "mask": mask,
        }
        (logits,) = self._session.run([self._output], {name: feed[name] for name in self._inputs})
        return logits
