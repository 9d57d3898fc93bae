"""Benchmark: this project's DIN, DIEN and BST against DeepCTR-Torch and torch-rechub, ranked.

    pip install -e ".[bench]"       # deepctr-torch and torch-rechub
    python benchmarks/peers.py      # MovieLens latest-small and the Taobao sample, every model
    python benchmarks/peers.py --datasets taobao --epochs 1   # a quicker look

Why ranking: a held-out AUC on one sampled negative per positive says little about what a user
sees. Every library is therefore measured with the project's ranking protocol
(`attention_ctr.pipelines.evaluation.nodes.draw_ranking_candidates`, parameters
`evaluation.ranking`): each test user's held-out last behaviour against 100 items the user never
had, drawn uniformly and by training popularity, all scored for the moment of the user's test
sample. Per distribution: pooled AUC, GAUC, HR@10, NDCG@10, MRR (`attention_ctr.ranking`), and
the history-shuffled AUC, the same lists scored with every user's history swapped for another
user's (a seeded derangement): a model that loses nothing there does not use the history.

Real logs, real pipelines: per dataset a temporary project copy runs ingestion and
feature_engineering in that dataset's Kedro environment (`movielens`: every rating of
../shared/data/movielens-latest-small; `taobao`: ../shared/data/taobao-userbehavior-sample;
`synthetic`: the generator) with the environment's own parameters (`--max-history` and
`--param KEY=VALUE` override them), so every library trains on the same train / validation
samples, negatives and DIEN negative histories, and ranks the same candidate lists with the
same histories.
- This project (`pooling`, `din`, `dien`, `bst`): the real `training` pipeline of that copy
  (its parameters, early stopping and cold-start blend), then `rank_test_users`: the request
  graph exported as the export pipeline does, scored behind `attention_ctr.serving.Scorer` in
  raw ids, one request per user.
- The peers, at our models' sizes (embedding, MLP, DIN's attention unit from the environment's
  parameters), learning rate and batch size, without L2, get our samples as padded arrays
  (oldest first, 0 after the last behaviour), run every epoch and keep the best validation
  AUC's; their own predict scores the candidate rows in batches. DeepCTR-Torch through
  `SparseFeat` / `VarLenSparseFeat` columns, `compile`, `fit` (a `ModelCheckpoint` on val_auc)
  and `predict` (DIEN with `gru_type="AUGRU"`, `use_negsampling=True`); torch-rechub through
  `SparseFeature` / `SequenceFeature` (shared tables, padding_idx 0), `DataGenerator`,
  `CTRTrainer.fit` and `CTRTrainer.predict`. Other options are each library's defaults.
- `popularity`: the candidate's training count, no history (its shuffled AUC is its AUC).

Epochs: ours the environment's `training.epochs` with its early stopping (patience); the
peers `--epochs`: by default 2, as many as ours may run (`ours`) on Taobao's small sample, and
1 for torch-rechub's BST on MovieLens (its slowest).

Each model trains in its own subprocess (2 torch threads, `OMP_WAIT_POLICY=PASSIVE` so idle
OpenMP threads sleep on a shared host). Training samples/s: ours from the training history
(epochs' training loops), the peers' training samples x epochs / wall time of their fit call
(which also runs a validation pass per epoch, under 1% of the samples here). The figures are
written to benchmarks/results/peers.md with the date, machine, versions, wall time and command.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml
from _common import PROJECT_ROOT, cpu_model, quiet_kedro_logging

OURS, DEEPCTR, RECHUB, COUNTS = "attention_ctr", "deepctr-torch", "torch-rechub", "train counts"
# (model, library) rows of each table; torch-rechub is the only peer with a BST.
ROWS = (
    ("popularity", COUNTS),
    ("pooling", OURS),
    ("din", OURS),
    ("din", DEEPCTR),
    ("din", RECHUB),
    ("dien", OURS),
    ("dien", DEEPCTR),
    ("dien", RECHUB),
    ("bst", OURS),
    ("bst", RECHUB),
)
MODELS = ("pooling", "din", "dien", "bst")
LIBRARIES = (OURS, DEEPCTR, RECHUB, COUNTS)
PEER_SPLITS = ("train", "validation")
SEQUENCES = ("hist_item", "hist_category", "neg_item", "neg_category")
POINTERS = ["hist_end", "hist_len", "timestamp"]  # what a history swap replaces
INFERENCE_BATCH = 1024
SHARED_DATA = PROJECT_ROOT.parent / "shared" / "data"
DATASETS = {
    # name: (Kedro environment, {path under the copy's data/01_raw/: source file})
    "synthetic": (None, {}),
    "movielens": (
        "movielens",
        {
            f"movielens/{name}": SHARED_DATA / "movielens-latest-small" / name
            for name in ("ratings.csv", "movies.csv")
        },
    ),
    "taobao": (
        "taobao",
        {
            "taobao/UserBehavior.csv": SHARED_DATA
            / "taobao-userbehavior-sample"
            / "UserBehavior.csv"
        },
    ),
}
DEFAULT_OUTPUT = PROJECT_ROOT / "benchmarks" / "results" / "peers.md"
# The peers' epochs (`ours`: the environment's training.epochs). Taobao's sample is small:
# as many as ours may run. MovieLens: 2, and 1 for torch-rechub's BST, its slowest model.
DEFAULT_EPOCHS = ("2", "taobao=ours", "movielens:bst/torch-rechub=1")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--datasets", nargs="+", default=["movielens", "taobao"], choices=list(DATASETS)
    )
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--libraries", nargs="+", default=list(LIBRARIES), choices=LIBRARIES)
    parser.add_argument("--users", type=int, default=500, help="synthetic users")
    parser.add_argument("--events", type=int, default=10_000, help="synthetic events")
    parser.add_argument(
        "--max-history",
        type=int,
        default=None,
        help="feature_engineering.max_history (default: the environment's)",
    )
    parser.add_argument(
        "--param",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="other project parameters for every dataset, as `kedro run --params` takes them "
        "(YAML values), e.g. training.epochs=4; default: none, the environments' own",
    )
    parser.add_argument(
        "--epochs",
        nargs="+",
        default=list(DEFAULT_EPOCHS),
        metavar="SPEC",
        help="the peers' epochs: N, DATASET=N, DATASET:MODEL/LIBRARY=N (the most specific "
        "applies; N `ours`: the environment's training.epochs); ours: the environment's "
        "training.epochs and patience",
    )
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads per model")
    parser.add_argument("--seed", type=int, default=2024, help="peers' torch seed")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per model")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--one", nargs=4, metavar=("DIR", "MODEL", "LIBRARY", "RESULT"))
    args = parser.parse_args()
    if args.one:
        return run_one(args)

    started = time.perf_counter()
    load_at_start = os.getloadavg()[0]
    command = shlex.join(["python", *sys.argv])
    machine = _machine(args)
    print(machine)
    sections = []
    workdir = Path(tempfile.mkdtemp(prefix="peers-bench-"))
    try:
        for dataset in args.datasets:
            directory = workdir / dataset
            description = prepare(dataset, directory, args)
            print(f"\n## {dataset}: {description}", flush=True)
            rows = [
                (m, lib)
                for m, lib in ROWS
                if lib in args.libraries and (m in args.models or m == "popularity")
            ]
            results = {}
            for row in rows:
                row_started = time.perf_counter()
                results[row] = run_row(directory, *row, args)
                elapsed = time.perf_counter() - row_started
                print(f"   {row[0]} / {row[1]}: {_progress(results[row])} ({elapsed:.0f} s)")
                sys.stdout.flush()
            spec = json.loads((directory / "spec.json").read_text())
            section = f"## {dataset}\n\n{description}\n\n" + tables(results, spec)
            print("\n" + section, flush=True)
            sections.append(section)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    wall = time.perf_counter() - started
    print(f"\ntotal wall time {wall:.0f} s")
    report = (
        "# This project against DeepCTR-Torch and torch-rechub: the ranking protocol\n\n"
        f"Command: `{command}` (wall time {wall / 60:.1f} min; 1-minute load average "
        f"{load_at_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end)\n\n"
        f"{machine}\n\n" + "\n\n".join(sections) + "\n"
    )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(report)
    print(f"written to {args.output}")
    return 0


def _progress(result: dict) -> str:
    if "failed" in result:
        return f"failed: {result['failed']}"
    if "fit_seconds" in result:
        return f"fit {result['fit_seconds']:.0f} s, ranking {result['predict_seconds']:.0f} s"
    return "done"


# ---------------------------------------------------------------- data, once per dataset
def prepare(dataset: str, directory: Path, args: argparse.Namespace) -> str:
    """Features of one dataset through our pipelines in a project copy kept for the
    per-model subprocesses; candidate lists and the peers' arrays saved beside it."""
    quiet_kedro_logging()
    from sandbox import make_project_copy, run_pipeline

    from attention_ctr.pipelines.evaluation.nodes import draw_ranking_candidates

    env, raw_files = DATASETS[dataset]
    params: dict = {}
    if dataset == "synthetic":
        params["ingestion.synthetic.users"] = args.users
        params["ingestion.synthetic.events"] = args.events
    if args.max_history is not None:
        params["feature_engineering.max_history"] = args.max_history
    for assignment in args.param:
        key, _, value = assignment.partition("=")
        params[key] = yaml.safe_load(value)
    project = make_project_copy(directory / "project", source=PROJECT_ROOT)
    for relative, source in raw_files.items():
        if not source.is_file():
            raise SystemExit(f"{dataset}: no {source}")
        destination = project / "data" / "01_raw" / relative
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, destination)
    catalog = run_pipeline(
        project, params=params, env=env, pipelines=["ingestion", "feature_engineering"]
    )
    spec, events = catalog.load("feature_spec"), catalog.load("events@pandas")
    samples = {split: catalog.load(f"{split}_samples@pandas") for split in (*PEER_SPLITS, "test")}
    item_frequency = catalog.load("item_frequency")
    parameters = catalog.load("parameters")
    ranking = parameters["evaluation"]["ranking"]
    candidates = grouped(draw_ranking_candidates(samples["test"], events, item_frequency, ranking))
    shuffled = swap_histories(candidates, int(ranking["seed"]))

    training = parameters["training"]
    options = {m: parameters[m]["model"]["options"] for m in ("din", "dien", "bst")}
    peer = {
        "embedding_dim": options["din"]["embedding_dim"],
        "mlp_hidden": {m: list(options[m]["mlp_hidden"]) for m in options},
        "attention_hidden": list(options["din"]["attention_hidden"]),
        "learning_rate": float(training["learning_rate"]),
        "batch_size": int(training["batch_size"]),
    }
    if any(options[m]["embedding_dim"] != peer["embedding_dim"] for m in options):
        raise SystemExit("the peers need one embedding size: our models' differ")
    # The peers take fixed-width sequences: as wide as the longest history, as a user of theirs
    # would set it (our batches are as wide as their own longest history).
    width = max(int(frame["hist_len"].max()) for frame in (*samples.values(), candidates))
    width = min(max(width, 1), spec["max_history"])
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "spec.json").write_text(
        json.dumps(
            {
                **spec,
                "env": env,
                "params": params,
                "peer": peer,
                "peer_history": width,
                "training": {key: training[key] for key in ("epochs", "patience")},
                "ranking": ranking,
            }
        )
    )
    candidates.to_parquet(directory / "candidates.parquet")
    for split in PEER_SPLITS:
        np.savez(directory / f"{split}.npz", **peer_arrays(samples[split], events, spec, width))
    np.savez(directory / "candidates.npz", **peer_arrays(candidates, events, spec, width))
    np.savez(directory / "shuffled.npz", **peer_arrays(shuffled, events, spec, width))
    counts = {
        d: int(rows["label"].sum()) for d, rows in candidates.groupby("distribution", sort=False)
    }
    return (
        f"{len(events):,} behaviours, {spec['n_users']:,} users, {spec['n_items']:,} items, "
        f"{spec['n_categories']:,} categories (Kedro environment `{env or 'base'}`"
        f"{', overrides ' + json.dumps(params) if params else ''}); train / validation samples "
        f"{len(samples['train']):,} / {len(samples['validation']):,}; history <= "
        f"{spec['max_history']} (longest {width}); ranked: "
        + ", ".join(f"{n:,} test users x {ranking['candidates']} {d}" for d, n in counts.items())
        + " candidates"
    )


def grouped(candidates: pd.DataFrame) -> pd.DataFrame:
    """The candidate rows as `rank_test_users` walks them: per distribution, lists in order."""
    return pd.concat(
        [rows for _, rows in candidates.groupby("distribution", sort=False)], ignore_index=True
    )


def swap_histories(candidates: pd.DataFrame, seed: int) -> pd.DataFrame:
    """The candidate rows with user i's history pointers taken from user `donor[i]`, the
    derangement `rank_test_users` draws per distribution (over the positives, in list order)."""
    from attention_ctr.ranking import derangement

    frames = []
    for _, rows in candidates.groupby("distribution", sort=False):
        rows = rows.reset_index(drop=True)
        user = rows["user"].to_numpy()
        list_index = np.cumsum(np.r_[True, user[1:] != user[:-1]]) - 1
        positives = rows[rows["label"] == 1]
        if len(positives) != list_index[-1] + 1:
            raise ValueError("every candidate list must start with its one positive")
        donor = derangement(len(positives), np.random.default_rng(seed))
        rows[POINTERS] = positives[POINTERS].to_numpy()[donor[list_index]]
        frames.append(rows)
    return pd.concat(frames, ignore_index=True)


def peer_arrays(samples: pd.DataFrame, events: pd.DataFrame, spec: dict, width: int) -> dict:
    """Our samples as the padded arrays the peers take: `[N, width]` sequences (oldest first,
    0 after the last behaviour), targets, history lengths, labels, users."""
    from attention_ctr.sequences import SampleTensors

    tensors = SampleTensors(samples, events, spec)
    size = len(tensors)
    arrays = {key: np.zeros((size, width), np.int32) for key in SEQUENCES}
    for start in range(0, size, 65_536):
        index = torch.arange(start, min(start + 65_536, size))
        batch = tensors.batch(index)
        for key in SEQUENCES:
            arrays[key][start : start + len(index), : batch[key].shape[1]] = batch[key].numpy()
    arrays["target_item"] = tensors.target_item.numpy().astype(np.int32)
    arrays["target_category"] = tensors.target_category.numpy().astype(np.int32)
    arrays["hist_len"] = tensors.hist_len.numpy().astype(np.int32)
    arrays["label"] = tensors.label.numpy()
    arrays["user"] = tensors.user.numpy()
    return arrays


# ---------------------------------------------------------------- one model per subprocess
def run_row(directory: Path, model: str, library: str, args: argparse.Namespace) -> dict:
    """One row of the tables: the popularity baseline here, a model in its own subprocess."""
    if library == COUNTS:
        return rank_popularity(directory)
    result = directory / f"{model}-{library}.json"
    command = [sys.executable, __file__, "--one", str(directory), model, library, str(result)]
    ours = json.loads((directory / "spec.json").read_text())["training"]["epochs"]
    epochs = peer_epochs(directory.name, model, library, args.epochs, int(ours))
    command += ["--epochs", str(epochs)]
    command += ["--threads", str(args.threads), "--seed", str(args.seed)]
    # On a shared host, OpenMP threads that spin while waiting for a busy core make every
    # library several times slower and the timings meaningless: let them sleep.
    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    try:
        finished = subprocess.run(
            command, capture_output=True, text=True, timeout=args.timeout, env=env
        )
    except subprocess.TimeoutExpired:
        return {"failed": f"timed out after {args.timeout} s"}
    if result.is_file():
        outcome = json.loads(result.read_text())
    else:
        outcome = {"failed": f"subprocess exited with {finished.returncode}"}
    if "failed" in outcome:
        outcome["log"] = (finished.stdout + finished.stderr).strip().splitlines()[-8:]
    return outcome


def peer_epochs(dataset: str, model: str, library: str, specs: list[str], ours: int) -> int:
    """The epochs `--epochs` gives one peer model on one dataset (the most specific spec;
    `ours`: as many as our models may run)."""
    found = {}
    for spec in specs:
        key, _, value = spec.rpartition("=")
        scope, _, row = key.rpartition(":") if "/" in key else (key, "", "")
        if scope not in ("", dataset) or row not in ("", f"{model}/{library}"):
            continue
        found[(bool(row), bool(scope))] = ours if value == "ours" else int(value)
    if not found:
        raise SystemExit(f"--epochs gives no epochs for {dataset} {model}/{library}: {specs}")
    return found[max(found)]


def rank_popularity(directory: Path) -> dict:
    """The candidate's training count as its score: no model, no history."""
    from attention_ctr.ranking import ranking_quality

    candidates = pd.read_parquet(directory / "candidates.parquet")
    project = directory / "project"
    frequency = pd.read_parquet(project / "data" / "04_feature" / "item_frequency.parquet")
    counts = np.zeros(int(frequency["item"].max()) + 1, dtype=np.float64)
    counts[frequency["item"].to_numpy()] = frequency["train_count"].to_numpy()
    scores = counts[candidates["item"].to_numpy()]
    result = {}
    for distribution, rows in candidates.groupby("distribution", sort=False):
        quality = ranking_quality(rows["user"], rows["label"], scores[rows.index.to_numpy()])
        result[str(distribution)] = {**quality, "shuffled_auc": quality["auc"]}
    return result


@dataclass
class Trained:
    """What a peer's training hands back: fit wall time, epochs run, the best epoch (when the
    library tells), and its predict over an array split."""

    seconds: float
    epochs: int
    best_epoch: int | None
    predict: Callable[[dict], np.ndarray]


def run_one(args: argparse.Namespace) -> int:
    """Subprocess: train one model of one library, rank the candidates, write JSON."""
    directory, model, library, result_path = args.one
    args.epochs = int(args.epochs[0])  # the parent passes this model's own
    directory = Path(directory)
    torch.set_num_threads(args.threads)
    # A process's first torch optimizer imports torch._dynamo (seconds). The peers build theirs
    # before their fit call (DeepCTR's compile, CTRTrainer's constructor): import it before
    # any timer starts.
    importlib.import_module("torch._dynamo")
    spec = json.loads((directory / "spec.json").read_text())
    try:
        if library == OURS:
            result = run_ours(model, directory, spec)
        else:
            result = run_peer(model, library, directory, spec, args)
    except Exception as error:  # a peer that cannot run is a row of the table, not a crash
        traceback.print_exc()
        result = {"failed": f"{type(error).__name__}: {error}".splitlines()[0][:100]}
    Path(result_path).write_text(json.dumps(result))
    return 0


def run_ours(model: str, directory: Path, spec: dict) -> dict:
    """This project: its `training` pipeline for one model in the project copy (parameters of
    the environment, early stopping, cold-start blend), then `rank_test_users`."""
    quiet_kedro_logging()
    from sandbox import run_pipeline

    from attention_ctr.pipelines.evaluation.nodes import rank_test_users

    project = directory / "project"
    started = time.perf_counter()
    catalog = run_pipeline(
        project, "training", params=spec["params"], env=spec["env"], namespaces=[model]
    )
    training_seconds = time.perf_counter() - started
    history = catalog.load(f"{model}.training_history")
    seconds = history["train_seconds"].to_numpy()
    samples = (history["train_samples_per_second"].to_numpy() * seconds).sum()
    ranking = rank_test_users(
        catalog.load(f"{model}.model"),
        catalog.load(f"{model}.trained_model"),
        pd.read_parquet(directory / "candidates.parquet"),
        *(
            catalog.load(name)
            for name in (
                "events@pandas",
                "item_ids",
                "category_ids",
                "behavior_ids",
                "item_frequency",
                "cold_start_items",
                "cold_start_weights",
                "feature_spec",
            )
        ),
        spec["ranking"],
    )
    result = {
        "fit_seconds": training_seconds,  # the whole training pipeline, cold-start step included
        "predict_seconds": time.perf_counter() - started - training_seconds,
        "train_rate": float(samples / seconds.sum()),
        "epochs": len(history),
        "best_epoch": int(history["validation_auc"].to_numpy().argmax()) + 1,
    }
    for distribution in spec["ranking"]["distributions"]:
        quality = ranking[distribution]
        result[distribution] = {**quality, "shuffled_auc": quality["history_shuffled_auc"]}
    return result


def run_peer(model: str, library: str, directory: Path, spec: dict, args) -> dict:
    """A peer: train on our samples' arrays, predict the candidate rows (own histories and
    swapped ones), score them with the project's ranking metrics."""
    from attention_ctr.ranking import ranking_quality

    data = {split: dict(np.load(directory / f"{split}.npz")) for split in PEER_SPLITS}
    trainers = {DEEPCTR: train_deepctr, RECHUB: train_rechub}
    trained = trainers[library](model, directory, spec, data, args)
    candidates = pd.read_parquet(directory / "candidates.parquet")
    started = time.perf_counter()
    own = trained.predict(dict(np.load(directory / "candidates.npz")))
    swapped = trained.predict(dict(np.load(directory / "shuffled.npz")))
    result = {
        "fit_seconds": trained.seconds,
        "predict_seconds": time.perf_counter() - started,
        "train_rate": len(data["train"]["label"]) * trained.epochs / trained.seconds,
        "epochs": trained.epochs,
        "best_epoch": trained.best_epoch,
        "distinct_scores": int(len(np.unique(own))),
        "score_std": float(np.std(own)),
    }
    for distribution, rows in candidates.groupby("distribution", sort=False):
        index = rows.index.to_numpy()
        quality = ranking_quality(rows["user"], rows["label"], own[index])
        shuffled = ranking_quality(rows["user"], rows["label"], swapped[index])
        result[str(distribution)] = {**quality, "shuffled_auc": shuffled["auc"]}
    return result


def train_deepctr(model_name, directory, spec, data, args) -> Trained:
    """DeepCTR-Torch: feature columns, `compile`, `fit`, `predict` (as its DIN/DIEN examples)."""
    from deepctr_torch.callbacks import ModelCheckpoint
    from deepctr_torch.inputs import SparseFeat, VarLenSparseFeat
    from deepctr_torch.models import DIEN, DIN

    if model_name not in ("din", "dien"):
        raise ValueError(f"DeepCTR-Torch has no {model_name}")
    peer = spec["peer"]
    dim = peer["embedding_dim"]
    item = SparseFeat("item", spec["n_items"] + 1, embedding_dim=dim)
    category = SparseFeat("category", spec["n_categories"] + 1, embedding_dim=dim)

    def sequence(name: str, table: SparseFeat) -> VarLenSparseFeat:
        feature = SparseFeat(name, table.vocabulary_size, dim, embedding_name=table.name)
        return VarLenSparseFeat(feature, maxlen=spec["peer_history"], length_name="hist_len")

    columns = [item, category, sequence("hist_item", item), sequence("hist_category", category)]
    # l2_reg_embedding=0: the other libraries train without L2 (DeepCTR's default is 1e-6)
    common = {
        "dnn_hidden_units": tuple(peer["mlp_hidden"][model_name]),
        "l2_reg_embedding": 0.0,
        "seed": args.seed,
    }
    torch.manual_seed(args.seed)
    attention = tuple(peer["attention_hidden"])
    if model_name == "din":
        model = DIN(columns, ["item", "category"], att_hidden_size=attention, **common)
    else:
        columns += [sequence("neg_hist_item", item), sequence("neg_hist_category", category)]
        model = DIEN(
            columns,
            ["item", "category"],
            gru_type="AUGRU",
            use_negsampling=True,
            att_hidden_units=attention,
            **common,
        )
    # torch's Adam at our learning rate ("adam" alone would take DeepCTR's default, 1e-3)
    model.compile(
        torch.optim.Adam(model.parameters(), lr=peer["learning_rate"]),
        "binary_crossentropy",
        metrics=["auc"],
    )

    def inputs(split: dict) -> dict:
        return {
            "item": split["target_item"],
            "category": split["target_category"],
            "hist_item": split["hist_item"],
            "hist_category": split["hist_category"],
            "neg_hist_item": split["neg_item"],
            "neg_hist_category": split["neg_category"],
            "hist_len": split["hist_len"],
        }

    best = directory / f"deepctr-{model_name}.pt"
    checkpoint = ModelCheckpoint(
        str(best), monitor="val_auc", save_best_only=True, save_weights_only=True, mode="max"
    )
    validation = data["validation"]
    started = time.perf_counter()
    # verbose=0: with verbose=1 fit also computes a training AUC on every batch
    history = model.fit(
        inputs(data["train"]),
        data["train"]["label"],
        batch_size=peer["batch_size"],
        epochs=args.epochs,
        verbose=0,
        validation_data=(inputs(validation), validation["label"]),
        callbacks=[checkpoint],
    )
    seconds = time.perf_counter() - started
    model.load_state_dict(torch.load(best, weights_only=True))
    return Trained(
        seconds,
        len(history.epoch),
        int(np.argmax(history.history["val_auc"])) + 1,
        lambda split: np.asarray(
            model.predict(inputs(split), batch_size=INFERENCE_BATCH), np.float64
        ).reshape(-1),
    )


def train_rechub(model_name, directory, spec, data, args) -> Trained:
    """torch-rechub: features, `DataGenerator`, `CTRTrainer` (as its DIN/DIEN examples)."""
    from torch.utils.data import DataLoader
    from torch_rechub.basic.features import SequenceFeature, SparseFeature
    from torch_rechub.models.ranking import BST, DIEN, DIN
    from torch_rechub.trainers import CTRTrainer
    from torch_rechub.utils.data import DataGenerator, TorchDataset

    peer = spec["peer"]
    dim = peer["embedding_dim"]
    vocabulary = {"item": spec["n_items"] + 1, "category": spec["n_categories"] + 1}
    targets = [
        SparseFeature(f"target_{name}", size, embed_dim=dim, padding_idx=0)
        for name, size in vocabulary.items()
    ]

    def sequences(prefix: str) -> list:
        return [
            SequenceFeature(
                f"{prefix}hist_{name}",
                size,
                embed_dim=dim,
                pooling="concat",
                shared_with=f"target_{name}",
                padding_idx=0,
            )
            for name, size in vocabulary.items()
        ]

    # `features` (the MLP's other inputs) may not be empty: the targets, as in its DIN example
    torch.manual_seed(args.seed)
    mlp = {"dims": list(peer["mlp_hidden"][model_name])}
    history = sequences("")
    if model_name == "din":
        attention = {"dims": list(peer["attention_hidden"])}
        model = DIN(targets, history, targets, mlp_params=mlp, attention_mlp_params=attention)
    elif model_name == "dien":
        model = DIEN(targets, history, sequences("neg_"), targets, mlp_params=mlp)
    else:
        model = BST(targets, history, targets, mlp_params=mlp, max_seq_len=spec["peer_history"] + 1)

    def inputs(split: dict) -> dict:
        x = {
            "target_item": split["target_item"],
            "target_category": split["target_category"],
            "hist_item": split["hist_item"],
            "hist_category": split["hist_category"],
        }
        if model_name == "dien":
            x.update(neg_hist_item=split["neg_item"], neg_hist_category=split["neg_category"])
        return x

    train, validation = data["train"], data["validation"]
    train_loader, validation_loader, _ = DataGenerator(
        inputs(train), train["label"]
    ).generate_dataloader(
        x_val=inputs(validation),
        y_val=validation["label"],
        x_test=inputs(validation),
        y_test=validation["label"],
        batch_size=peer["batch_size"],
    )
    trainer = CTRTrainer(
        model,
        optimizer_params={"lr": peer["learning_rate"], "weight_decay": 0.0},
        n_epoch=args.epochs,
        earlystop_patience=args.epochs,
        device="cpu",
        model_path=str(directory),
        loss_mode=model_name != "dien",  # its DIEN returns (prediction, auxiliary loss)
    )
    validation_aucs = []
    evaluate = trainer.evaluate

    def recorded(*a, **k):  # its fit prints the validation AUCs; keep them for the table
        validation_aucs.append(evaluate(*a, **k))
        return validation_aucs[-1]

    trainer.evaluate = recorded
    started = time.perf_counter()
    trainer.fit(train_loader, validation_loader)
    seconds = time.perf_counter() - started
    # CTRTrainer restores the best epoch only when it stops early: do it for it
    if trainer.early_stopper.best_weights is not None:
        model.load_state_dict(trainer.early_stopper.best_weights)

    def predict(split: dict) -> np.ndarray:
        loader = DataLoader(TorchDataset(inputs(split), split["label"]), batch_size=INFERENCE_BATCH)
        return np.asarray(trainer.predict(model, loader), np.float64).reshape(-1)

    best = int(np.argmax(validation_aucs)) + 1 if validation_aucs else None
    return Trained(seconds, args.epochs, best, predict)


# ---------------------------------------------------------------- report
COLUMNS = ("auc", "gauc", "hr@10", "ndcg@10", "mrr", "shuffled_auc")
NEAR_CONSTANT = 1e-4  # a peer whose scores spread less than this has learnt nothing


def tables(results: dict[tuple[str, str], dict], spec: dict) -> str:
    """One markdown table per candidate distribution."""
    text = []
    for distribution in spec["ranking"]["distributions"]:
        header = (
            "| model | library | AUC | GAUC | HR@10 | NDCG@10 | MRR | shuffled AUC "
            "| train samples/s | epochs (best) | ours vs this row (AUC) |"
        )
        lines = [
            f"### {distribution} candidates ({spec['ranking']['candidates']} per test user)",
            "",
            header,
            "|" + "---|" * header.count(" | ") + "---|",
        ]
        notes = []
        for (model, library), result in results.items():
            if "failed" in result:
                lines.append(f"| {model} | {library} | failed: {result['failed']} |")
                if result.get("log"):
                    notes.append(f"{model} / {library} failed; end of its output:")
                    notes.extend(f"    {line}" for line in result["log"])
                continue
            quality = result[distribution]
            cells = [f"{quality[c]:.4f}" if quality[c] is not None else "-" for c in COLUMNS]
            rate = f"{result['train_rate']:,.0f}" if "train_rate" in result else "-"
            epochs = (
                f"{result['epochs']} ({result['best_epoch'] or '?'})" if "epochs" in result else "-"
            )
            # ours vs this row: our same model's AUC minus this row's (baselines: our DIN's)
            reference = model if model in ("din", "dien", "bst") else "din"
            ours = results.get((reference, OURS), {})
            comparison = ""
            if library != OURS and ours and "failed" not in ours:
                difference = ours[distribution]["auc"] - quality["auc"]
                comparison = f"{difference:+.4f}" + ("" if reference == model else " (our din)")
            elif library == OURS and model == "pooling" and ours and "failed" not in ours:
                difference = ours[distribution]["auc"] - quality["auc"]
                comparison = f"{difference:+.4f} (our din)"
            lines.append(
                f"| {model} | {library} | {' | '.join(cells)} | {rate} | {epochs} | {comparison} |"
            )
            if result.get("score_std", 1.0) < NEAR_CONSTANT:
                notes.append(
                    f"{model} / {library} predicts a near-constant: {result['distinct_scores']:,} "
                    f"distinct scores, standard deviation {result['score_std']:.1e} over all "
                    "candidate rows (its ranking is by rounding noise)"
                )
        text.append("\n".join(lines + ([""] + notes if notes else [])))
    return "\n\n".join(text)


def _machine(args: argparse.Namespace) -> str:
    versions = []
    for package in ("attention_ctr", "torch", "deepctr-torch", "torch-rechub", "onnxruntime"):
        try:
            versions.append(f"{package} {metadata.version(package)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{package} not installed")
    cpu = cpu_model()
    reduced = [spec for spec in args.epochs if "/" in spec]
    note = f" ({', '.join(reduced)}: fewer for the slowest peer, for the time budget)"
    return (
        f"{time.strftime('%Y-%m-%d')}, {cpu}, {os.cpu_count()} CPUs, no GPU used; "
        f"{', '.join(versions)}; {args.threads} torch threads per model, "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'PASSIVE')}.\n"
        "Ours: the environment's training parameters (epochs with early stopping, cold-start "
        "blend), scored through the exported request graph (`rank_test_users`). Peers: our "
        "sizes (embedding, MLP, DIN attention unit), learning rate and batch size, no L2 or "
        "weight decay (ours: the environment's l2_weight), every epoch run and the best "
        f"validation AUC's kept; epochs `--epochs {' '.join(args.epochs)}`"
        f"{note if reduced else ''}.\n"
        "AUC: pooled over every (user, candidate) pair; GAUC, HR@10, NDCG@10, MRR: per test "
        "user, averaged; shuffled AUC: the same lists with each user's history swapped for "
        "another user's. train samples/s: ours the training loops of the training history, the "
        "peers' training samples x epochs / fit wall time (a validation pass per epoch "
        "included); noisy on a shared 2-core host. epochs (best): run (kept); where ours ran "
        "more epochs than a peer, the AUC difference includes those epochs. "
        "ours vs this row: our same model's AUC minus this row's (pooling, popularity: our DIN's)."
    )


if __name__ == "__main__":
    sys.exit(main())
