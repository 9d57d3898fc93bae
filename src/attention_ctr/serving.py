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
bucketised with the project's `time_gap_bucket`, as in feature engineering. Timestamps are
integer seconds: a timestamp (or `now`) above 1e11 looks like milliseconds and is refused, and
a `now` left to default to the wall clock is refused for such a model when the newest behaviour
is more than 365 days older (a replayed or offline log: pass `now` on the log's clock). A
history with no usable behaviour is scored as an empty (fully padded) history. Repeated requests
(the same encoded history and candidates: page reloads, hot items re-ranked for a returning
user) are served from a small LRU cache of scores; raw-id lookups need no cache, they are a
binary search over the sorted id tables.

Bundle integrity. Export seals each bundle with digests, and `Scorer` verifies every one before
it scores, so an altered or mixed-up file is a one-line `ValueError` naming the file and both
digests, never a silently different score:

- `metadata.json` records `request_onnx_sha256` and `onnx_sha256` (sha256 of the request and
  batch graphs' bytes) and `items_sha256` / `categories_sha256` (`table_sha256`: sha256 of the
  tables' content, column names, kinds and values in order; not of the parquet bytes, which
  another writer may lay out differently for the same table, and it is the content that scores).
- `metadata_sha256` is `metadata_sha256(metadata)`: sha256 of the canonical JSON (sorted keys)
  of every other field of the metadata, so the fields that change scores without touching a
  graph or a table (`max_history`, `time_gap_edges`, `behaviors`, `inputs`, ...) and the file
  digests above are covered too. A hand edit (`max_history: 2`) no longer matches it.
- The promotion gate copies the digests, `metadata_sha256` included, into the pointer
  (`promoted_models.json`), and `Scorer.from_project(..., version="promoted")` checks them against
  what it loaded. The metadata's own digest catches corruption, hand edits and files of different
  runs; the pointer, written by another step, is the independent record that also catches a
  bundle edited and re-sealed (digests recomputed) after its promotion. The chain is
  pointer -> metadata -> graphs and tables.

Bundles written before these digests (no `metadata_sha256`) are refused with a message saying to
export again: they cannot show that their tables and metadata are the ones their graph was
checked with, which is how the silently wrong scores happened.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import os
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

# Each file of a bundle and the metadata (and promotion pointer) field holding its digest.
DIGESTS = {
    "request_model.onnx": "request_onnx_sha256",
    "model.onnx": "onnx_sha256",
    "items.parquet": "items_sha256",
    "categories.parquet": "categories_sha256",
    "metadata.json": "metadata_sha256",
}
# Seconds since 1970 stay below 1e11 until the year 5138; milliseconds pass it in 1973.
MAX_TIMESTAMP = 10**11
# A `now` left to the wall clock must be within this of the newest behaviour (else: pass now).
MAX_DEFAULT_NOW_GAP = 365 * 86400


def table_sha256(table: pd.DataFrame) -> str:
    """sha256 of a table's content: each column's name, kind and values, in column order.

    Independent of the file format and of pandas' dtype flavours (a string column digests the
    same whether pandas holds it as `object` or `str`); the index is ignored. Integers digest
    as little-endian int64 (uint64), floats as float64, booleans as bytes, anything else as
    length-prefixed UTF-8 strings.
    """
    digest = hashlib.sha256()
    for name in table.columns:
        values = table[name].to_numpy()
        kind = values.dtype.kind
        if kind == "b":
            tag, data = "bool", values.astype(np.uint8).tobytes()
        elif kind == "i":
            tag, data = "int", values.astype("<i8").tobytes()
        elif kind == "u":
            tag, data = "uint", values.astype("<u8").tobytes()
        elif kind == "f":
            tag, data = "float", values.astype("<f8").tobytes()
        else:
            encoded = [str(value).encode() for value in values]
            lengths = np.fromiter(map(len, encoded), dtype="<i8", count=len(encoded))
            tag, data = "str", lengths.tobytes() + b"".join(encoded)
        digest.update(json.dumps([str(name), tag, len(values)]).encode())
        digest.update(data)
    return digest.hexdigest()


def metadata_sha256(metadata: dict) -> str:
    """sha256 of the metadata's canonical JSON (sorted keys, compact), without the digest itself
    and the catalog `version` it is loaded with: what `seal` records as `metadata_sha256`."""
    fields = {
        key: value for key, value in metadata.items() if key not in ("metadata_sha256", "version")
    }
    text = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def seal(metadata: dict) -> dict:
    """The metadata with `metadata_sha256` added (call it last: any later change breaks it)."""
    return {**metadata, "metadata_sha256": metadata_sha256(metadata)}


def _sequence(values: object, argument: str) -> np.ndarray:
    """`values` as a 1-D array; a scalar, a string or a nested sequence is a ValueError."""
    if isinstance(values, str | bytes) or not hasattr(values, "__len__"):
        raise ValueError(
            f"{argument} must be a 1-D sequence (a list or an array), got a "
            f"{type(values).__name__}: {values!r:.60}"
        )
    try:
        array = np.asarray(values)
    except ValueError as error:  # ragged nested lists
        raise ValueError(f"{argument} must be a 1-D sequence: {error}") from None
    if array.ndim != 1:
        raise ValueError(
            f"{argument} must be a 1-D sequence (a list or an array), got shape {array.shape}"
        )
    return array


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


def _promoted_entry(catalog, model: str, project_path: Path) -> dict:
    """The pointer's entry for `model`: its version and the digests the promotion recorded."""
    pointer = catalog.load("promoted_models")
    if model not in pointer:
        promoted = ", ".join(sorted(pointer)) or "none"
        raise FileNotFoundError(
            f"No promoted version of {model} in {project_path} (promoted: {promoted}): run "
            "`kedro run --pipeline retraining` (its promotion_report says why a model was kept out)"
        )
    entry = pointer[model]
    if not isinstance(entry, dict) or not isinstance(entry.get("version"), str):
        raise ValueError(
            f"promoted_models.json has a malformed entry {model!r} (no 'version' string): "
            "restore it or run `kedro run --pipeline retraining`"
        )
    if not entry.get("metadata_sha256"):
        raise ValueError(
            f"promoted_models.json's entry for {model} (version {entry['version']}) records no "
            "metadata_sha256: it was promoted before bundles were sealed; export and promote "
            "again (`kedro run --pipeline retraining`)"
        )
    return entry


def _environment(project_path: Path, env: str | None) -> str | None:
    """`env` (or KEDRO_ENV) if it names an environment folder of the project's conf, else a
    ValueError: a path (`..`, absolute) cannot point the catalog outside the project."""
    from kedro.framework.project import settings

    source = "env"
    if env is None and os.environ.get("KEDRO_ENV"):
        source, env = "KEDRO_ENV", os.environ["KEDRO_ENV"]
    if env is None:
        return None
    conf = project_path / settings.CONF_SOURCE
    names = sorted(path.name for path in conf.iterdir() if path.is_dir()) if conf.is_dir() else []
    if not isinstance(env, str) or env not in names:
        raise ValueError(
            f"{source} must be the name of an environment in {conf}, one of {names}; got {env!r}"
        )
    return env


def _mismatch(file: str, model: str, version: object, actual: str, recorded: object) -> str:
    """The one-line message of a file that does not match the digest its metadata recorded."""
    where = model if version is None else f"{model} (version {version})"
    what = "content sha256" if file.endswith(".parquet") else "sha256"
    return (
        f"{file} of {where} does not match its bundle: {what} {actual} != {recorded} recorded "
        f"as {DIGESTS[file]} in metadata.json; the files come from different export runs or one "
        "was altered after export: export again (`kedro run --pipeline export`)"
    )


def _seconds(now: object) -> int:
    """`now` as integer seconds since 1970; anything else is a ValueError naming `now`."""
    if isinstance(now, bool) or not isinstance(now, numbers.Real) or not math.isfinite(now):
        raise ValueError(f"now must be a number of seconds since 1970, got {now!r:.60}")
    if now > MAX_TIMESTAMP:
        raise ValueError(
            f"now is {now}, which looks like milliseconds (seconds since 1970 stay below "
            f"{MAX_TIMESTAMP:.0e} until the year 5138): pass integer seconds like the training "
            "log's"
        )
    return int(now)


def _file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, read in 1 MiB chunks (a batch graph may be large)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


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
        self.model = name
        self.version = metadata.get("version")
        if not metadata.get("metadata_sha256"):
            raise ValueError(
                f"metadata.json of {name} has no metadata_sha256: the bundle was exported before "
                "bundles were sealed with the digests of all their files, so its tables and "
                "metadata cannot be verified; export it again (`kedro run --pipeline export`)"
            )
        # What was loaded, digested as export digested it (see "Bundle integrity" above).
        self.digests = {
            "metadata.json": metadata_sha256(metadata),
            "request_model.onnx": hashlib.sha256(graph).hexdigest(),
            "items.parquet": table_sha256(items),
            "categories.parquet": table_sha256(categories),
        }
        for file, digest in self.digests.items():
            self._verify(file, digest, metadata.get(DIGESTS[file]))
        self.metadata = metadata
        self.n_items = int(metadata["n_items"])
        self.max_history = int(metadata["max_history"])
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
    def _verify(self, file: str, actual: str, recorded: object) -> None:
        """A one-line ValueError naming `file` and both digests unless they are equal."""
        if actual != recorded:
            raise ValueError(_mismatch(file, self.model, self.version, actual, recorded))

    def verify_promotion(self, entry: dict) -> None:
        """Check the promotion pointer's `entry` (its recorded digests) against what was loaded:
        each digest it records must be the loaded file's (`metadata_sha256` is required)."""
        for file, key in DIGESTS.items():
            actual = self.digests.get(file)  # None: the batch graph, when it was not loaded
            if (key in entry or key == "metadata_sha256") and actual is not None:
                if actual != entry.get(key):
                    raise ValueError(
                        f"{file} of {self.model} (version {self.version}) does not match the "
                        f"promotion pointer promoted_models.json: sha256 {actual} != "
                        f"{entry.get(key)} recorded as {key}; the bundle or the pointer was "
                        "altered after promotion: export and promote again "
                        "(`kedro run --pipeline retraining`)"
                    )

    def verify_batch_graph(self, graph_sha256: str) -> None:
        """Check the batch graph `model.onnx` (its sha256) against the bundle's metadata."""
        self._verify("model.onnx", graph_sha256, self.metadata.get(DIGESTS["model.onnx"]))
        self.digests["model.onnx"] = graph_sha256

    @classmethod
    def from_files(
        cls,
        request_onnx_path: str | Path,
        metadata_path: str | Path,
        items_path: str | Path,
        categories_path: str | Path,
        *,
        onnx_path: str | Path | None = None,
        **options,
    ) -> Scorer:
        """From explicit paths of the files of one export run (the request graph's first).

        Needs only the serving dependencies. Every file is checked against the digests the
        metadata records (see "Bundle integrity" in the module doc); `onnx_path`, the batch
        graph `model.onnx`, is checked too when given. The graph is then checked by
        onnxruntime when the session is built.
        """
        graph = Path(request_onnx_path).read_bytes()
        try:
            metadata = json.loads(Path(metadata_path).read_text())
        except ValueError as error:
            raise ValueError(f"{metadata_path} is not valid JSON: {error}") from None
        if not isinstance(metadata, dict):
            raise ValueError(f"{metadata_path} must hold a JSON object (the bundle's metadata)")
        items, categories = pd.read_parquet(items_path), pd.read_parquet(categories_path)
        scorer = cls(graph, metadata, items, categories, **options)
        if onnx_path is not None:
            scorer.verify_batch_graph(_file_sha256(Path(onnx_path)))
        return scorer

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
        the run's parity gate passed, and the other files are loaded at its version. Every file
        of the bundle, the batch graph `model.onnx` included, is checked against the digests of
        its metadata. `version="promoted"` loads the version the promotion gate let serve
        (`promoted_models`) and checks the digests the pointer recorded against the files loaded.
        `model` must be one of the project's models; `env` (or KEDRO_ENV) the name of an
        environment folder of the project's `conf/`. Reading a Kedro catalog needs Kedro (the
        `pipelines` extra); a server that has only the `serving` dependencies uses `from_files`.
        """
        from kedro.framework.session import KedroSession
        from kedro.framework.startup import bootstrap_project
        from kedro.io.core import DatasetError, Version

        from attention_ctr.models import MODELS

        if model not in MODELS:
            raise ValueError(f"unknown model {model!r}; expected one of {sorted(MODELS)}")
        project_path = Path(project_path).resolve()
        bootstrap_project(project_path)
        env = _environment(project_path, env)
        entry = None
        with KedroSession.create(project_path=project_path, env=env) as session:
            catalog = session.load_context().catalog
            anchor = f"{model}.serving_metadata"
            if anchor not in catalog:
                raise ValueError(f"{project_path} has no catalog entry {anchor}")
            if version == "promoted":
                entry = _promoted_entry(catalog, model, project_path)
                version = entry["version"]
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
                "onnx_model",
            )
            loaded = []
            for part in parts:
                name = f"{model}.{part}"
                try:
                    if part == "onnx_model":  # only its digest: no need to parse the batch graph
                        dataset = catalog.get(name, version=Version(version, None))
                        if hasattr(dataset, "file_sha256"):
                            loaded.append(dataset.file_sha256())
                        else:
                            graph = catalog.load(name, version=version)
                            loaded.append(hashlib.sha256(graph).hexdigest())
                    else:
                        loaded.append(catalog.load(name, version=version))
                except (DatasetError, FileNotFoundError) as error:
                    raise FileNotFoundError(
                        f"Export {version} of {model} is incomplete: {name} is missing "
                        f"or unreadable ({error})"
                    ) from error
        *bundle, batch_graph_sha256 = loaded
        scorer = cls(*bundle, **options)
        scorer.verify_batch_graph(batch_graph_sha256)
        if entry is not None:
            scorer.verify_promotion(entry)
        return scorer

    # -- encoding ---------------------------------------------------------------------------
    def _lengths(self, arrays: dict[str, object | None], reference: str) -> int:
        """The length of `reference`, after checking that every given argument is a 1-D
        sequence of that length (a scalar or a string is a ValueError naming the argument)."""
        sizes = {
            argument: len(_sequence(values, argument))
            for argument, values in arrays.items()
            if values is not None or argument == reference
        }
        for argument, size in sizes.items():
            if size != sizes[reference]:
                raise ValueError(
                    f"{argument} has {size} entries but {reference} has {sizes[reference]}"
                )
        return sizes[reference]

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
        if now is not None:
            now = _seconds(now)
        if history_timestamps is not None:
            stamps = np.asarray(history_timestamps)
            if len(stamps) and stamps.dtype.kind not in "iu":
                raise ValueError(
                    f"history_timestamps must be integer seconds, got dtype {stamps.dtype}"
                )
            stamps = stamps.astype(np.int64)
            if len(stamps) and stamps.max() > MAX_TIMESTAMP:
                raise ValueError(
                    f"history_timestamps holds {stamps.max()}, which looks like milliseconds "
                    f"(seconds since 1970 stay below {MAX_TIMESTAMP:.0e} until the year 5138): "
                    "pass integer seconds like the training log's"
                )
            if now is None:  # the wall clock: only plausible for a history on the same clock
                now = int(time.time())
                late = now - int(stamps.max()) if len(stamps) else 0
                if uses_time_gap and late > MAX_DEFAULT_NOW_GAP:
                    raise ValueError(
                        f"history_timestamps end at {stamps.max()}, {late // 86400} days before "
                        f"the wall clock ({now}) that now defaults to (at most "
                        f"{MAX_DEFAULT_NOW_GAP // 86400} days): pass now, the request time on "
                        "the log's clock"
                    )
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
        vector. Every list argument is a list or 1-D array (a scalar or a string is a
        ValueError naming it); timestamps above 1e11 (milliseconds) are refused, and so is a
        defaulted `now` more than 365 days after the newest behaviour for time-gap models.
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
