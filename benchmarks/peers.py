"""Benchmark: this project's DIN, DIEN and BST against DeepCTR-Torch and torch-rechub.

    pip install -e ".[bench]"       # deepctr-torch and torch-rechub
    python benchmarks/peers.py      # synthetic and MovieLens latest-small, every model
    python benchmarks/peers.py --datasets synthetic --epochs 1   # a quicker look

One feature_engineering output per dataset (the real pipelines in a temporary project copy:
the synthetic generator, and MovieLens latest-small through the `movielens` environment) gives
every library the same train / validation / test samples, the same negatives and the same DIEN
negative histories; the peers get them as padded arrays gathered from our samples (oldest
first, 0 after the last behaviour, as wide as the longest history). Every model has the same
size (embedding 32 for items and for categories, history <= 50, DIN's attention unit 80-40,
MLP 200-80), optimiser (Adam, learning rate 1e-3, no weight decay, no L2), batch size and
number of epochs, keeps the epoch with the best validation AUC, and is scored on the test
samples with this project's metrics (AUC, GAUC, logloss). Other options are each library's
defaults (ours: conf/base/parameters_training.yml).

The peers are driven through their public APIs, as their documentation and examples do:
DeepCTR-Torch with `SparseFeat`/`VarLenSparseFeat` columns (`hist_`/`neg_hist_` sequences,
DIEN with `gru_type="AUGRU"` and `use_negsampling=True`), `compile`, `fit` (a `ModelCheckpoint`
on val_auc keeps the best epoch) and `predict`; torch-rechub with `SparseFeature` /
`SequenceFeature` (shared tables, padding_idx 0), `DataGenerator` dataloaders, `CTRTrainer.fit`
(the best epoch's weights from its early stopper) and `CTRTrainer.predict`.

Each model trains in its own subprocess (2 torch threads; OpenMP threads sleep rather than
spin while waiting, `OMP_WAIT_POLICY=PASSIVE`, which a shared host needs), so one model's
memory does not count for the next:
- training samples/s: training samples x epochs / wall time of the library's fit call, which
  in every library also runs one validation pass per epoch (one sample in 13 to 17);
- inference samples/s: the library's predict over the test samples at batch 1024 (no grad);
- peak RSS: the subprocess's maximum resident set: Python, torch, the library, its own copy
  of the samples and the model.

The default sizes (500 synthetic users, 10,000 events; each MovieLens user's 16 most recent
ratings; 2 epochs) keep the whole run under 20 minutes on 2 busy cores: torch-rechub's BST
alone trains at ~200 samples/s there.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import resource
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
from _common import HISTORY, PROJECT_ROOT, build_features, fixed_size

OURS, DEEPCTR, RECHUB = "attention_ctr", "deepctr-torch", "torch-rechub"
# (model, library) rows of the table; torch-rechub is the only peer with a BST.
ROWS = (
    ("din", OURS),
    ("din", DEEPCTR),
    ("din", RECHUB),
    ("dien", OURS),
    ("dien", DEEPCTR),
    ("dien", RECHUB),
    ("bst", OURS),
    ("bst", RECHUB),
)
MODELS = ("din", "dien", "bst")
SPLITS = ("train", "validation", "test")
SEQUENCES = ("hist_item", "hist_category", "neg_item", "neg_category")
SIZES = ("n_items", "n_categories", "n_behaviors", "n_time_gap_buckets", "max_history")
EMBEDDING_DIM = fixed_size("din")["embedding_dim"]
MLP_HIDDEN = tuple(fixed_size("din")["mlp_hidden"])
ATTENTION_HIDDEN = tuple(fixed_size("din")["attention_hidden"])
LEARNING_RATE = 1e-3
INFERENCE_BATCH = 1024
MOVIELENS = next(
    (
        path
        for path in (
            PROJECT_ROOT / "data" / "01_raw" / "movielens",
            PROJECT_ROOT.parent / "shared" / "data" / "movielens-latest-small",
        )
        if (path / "ratings.csv").is_file()
    ),
    None,
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["synthetic", "movielens"])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--libraries", nargs="+", default=[OURS, DEEPCTR, RECHUB])
    parser.add_argument("--users", type=int, default=500, help="synthetic users")
    parser.add_argument("--events", type=int, default=10_000, help="synthetic events")
    parser.add_argument(
        "--movielens", type=Path, default=MOVIELENS, help="folder with ratings.csv, movies.csv"
    )
    parser.add_argument(
        "--movielens-recent",
        type=int,
        default=16,
        help="keep each MovieLens user's most recent N ratings (0: all)",
    )
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads per model")
    parser.add_argument("--seed", type=int, default=2024)
    parser.add_argument("--timeout", type=int, default=600, help="seconds per model")
    parser.add_argument("--one", nargs=4, metavar=("DIR", "MODEL", "LIBRARY", "RESULT"))
    args = parser.parse_args()
    if args.one:
        return run_one(args)

    started = time.perf_counter()
    print(_machine(args))
    with tempfile.TemporaryDirectory(prefix="peers-bench-") as workdir:
        for dataset in args.datasets:
            directory = Path(workdir) / dataset
            description = prepare(dataset, directory, args)
            if description is None:
                continue
            print(f"\n## {dataset}: {description}")
            rows = [(m, lib) for m, lib in ROWS if m in args.models and lib in args.libraries]
            results = {row: run_child(directory, *row, args) for row in rows}
            print_table(results)
    print(f"\ntotal wall time {time.perf_counter() - started:.0f} s")
    return 0


# ---------------------------------------------------------------- data, once per dataset
def prepare(dataset: str, directory: Path, args: argparse.Namespace) -> str | None:
    """Features of one dataset through our pipelines, saved for the per-model subprocesses."""
    params: dict = {"feature_engineering.max_history": HISTORY}
    env, raw_files = None, None
    if dataset == "synthetic":
        params["ingestion.synthetic.users"] = args.users
        params["ingestion.synthetic.events"] = args.events
    elif dataset == "movielens":
        if args.movielens is None or not (args.movielens / "ratings.csv").is_file():
            print(f"\n## movielens: skipped, no ratings.csv in {args.movielens} (--movielens)")
            return None
        env = "movielens"
        raw_files = _movielens_files(args.movielens, args.movielens_recent, directory)
    else:
        raise SystemExit(f"Unknown dataset {dataset!r}; expected synthetic or movielens")
    names = ("feature_spec", "events", *(f"{split}_samples" for split in SPLITS))
    tables = build_features(params, (*names, *(f"params:{m}" for m in MODELS)), env, raw_files)
    spec, events = tables["feature_spec"], tables["events"]
    directory.mkdir(parents=True, exist_ok=True)
    options = {m: {**tables[f"params:{m}"]["model"]["options"], **fixed_size(m)} for m in MODELS}
    # The peers take fixed-width sequences: as wide as the longest history, as a user of theirs
    # would set it (our batches are as wide as their own longest history).
    width = max(int(tables[f"{split}_samples"]["hist_len"].max()) for split in SPLITS)
    width = min(max(width, 1), spec["max_history"])
    (directory / "spec.json").write_text(
        json.dumps({**spec, "options": options, "peer_history": width})
    )
    events.to_parquet(directory / "events.parquet")
    counts = []
    for split in SPLITS:
        samples = tables[f"{split}_samples"]
        samples.to_parquet(directory / f"{split}_samples.parquet")
        np.savez(directory / f"{split}.npz", **peer_arrays(samples, events, spec, width))
        counts.append(f"{len(samples):,}")
    return (
        f"{len(events):,} behaviours, {spec['n_users']:,} users, {spec['n_items']:,} items, "
        f"{spec['n_categories']:,} categories; train / validation / test samples "
        f"{' / '.join(counts)}; history <= {spec['max_history']} (longest {width})"
    )


def _movielens_files(source: Path, recent: int, directory: Path) -> dict[str, Path]:
    """The movies and every user's `recent` most recent ratings (all with 0), for the adapter."""
    ratings = source / "ratings.csv"
    if recent:
        frame = pd.read_csv(ratings).sort_values(["userId", "timestamp"], kind="stable")
        ratings = directory / "ratings.csv"
        directory.mkdir(parents=True, exist_ok=True)
        frame.groupby("userId").tail(recent).to_csv(ratings, index=False)
    return {"movielens/ratings.csv": ratings, "movielens/movies.csv": source / "movies.csv"}


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
def run_child(directory: Path, model: str, library: str, args: argparse.Namespace) -> dict:
    result = directory / f"{model}-{library}.json"
    command = [sys.executable, __file__, "--one", str(directory), model, library, str(result)]
    command += ["--epochs", str(args.epochs), "--batch-size", str(args.batch_size)]
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


@dataclass
class Trained:
    """What a library's training hands back: fit wall time, epochs run, and its predict."""

    seconds: float
    epochs: int
    predict: Callable[[], np.ndarray]
    parameters: int


def run_one(args: argparse.Namespace) -> int:
    """Subprocess: train one model of one library, score it, write the result as JSON."""
    directory, model, library, result_path = args.one
    directory = Path(directory)
    torch.set_num_threads(args.threads)
    # A process's first torch optimizer imports torch._dynamo (~2 s). The peers build theirs
    # before their fit call (DeepCTR's compile, CTRTrainer's constructor), our fit inside it:
    # import it before any timer starts.
    importlib.import_module("torch._dynamo")

    spec = json.loads((directory / "spec.json").read_text())
    data = {split: dict(np.load(directory / f"{split}.npz")) for split in SPLITS}
    test = data["test"]
    trainers = {OURS: train_ours, DEEPCTR: train_deepctr, RECHUB: train_rechub}
    try:
        trained = trainers[library](model, directory, spec, data, args)
        probabilities, inference_rate = _time_inference(trained.predict, len(test["label"]))
        from attention_ctr.pipelines.evaluation.nodes import ranking_metrics

        metrics = ranking_metrics(test["user"], test["label"], probabilities)
        result = {
            "auc": metrics["auc"],
            "gauc": metrics["gauc"],
            "logloss": metrics["logloss"],
            "epochs": trained.epochs,
            "train_rate": len(data["train"]["label"]) * trained.epochs / trained.seconds,
            "inference_rate": inference_rate,
            "parameters": trained.parameters,
        }
    except Exception as error:  # a peer that cannot run is a row of the table, not a crash
        traceback.print_exc()
        result = {"failed": f"{type(error).__name__}: {error}".splitlines()[0][:100]}
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    Path(result_path).write_text(json.dumps(result))
    return 0


def _time_inference(predict: Callable[[], np.ndarray], samples: int) -> tuple[np.ndarray, float]:
    """(probabilities of the first, warm-up call; samples/s over >= 3 calls and >= 1 s)."""
    probabilities = np.asarray(predict(), dtype=np.float64).reshape(-1)
    calls, started = 0, time.perf_counter()
    while calls < 3 or time.perf_counter() - started < 1.0:
        predict()
        calls += 1
    return probabilities, samples * calls / (time.perf_counter() - started)


def _parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def train_ours(model_name, directory, spec, data, args) -> Trained:
    """This project: `build_model` with its configured options at the fixed size, `fit`."""
    from attention_ctr.models import build_model
    from attention_ctr.sequences import SampleTensors
    from attention_ctr.training import TrainingConfig, fit, predict, seed_everything

    events = pd.read_parquet(directory / "events.parquet")
    train, validation, test = (
        SampleTensors(pd.read_parquet(directory / f"{split}_samples.parquet"), events, spec)
        for split in SPLITS
    )
    seed_everything(args.seed)
    sizes = {key: spec[key] for key in SIZES}
    model = build_model(model_name, **sizes, **spec["options"][model_name])
    # patience = epochs: every model runs all epochs and keeps its best validation epoch
    config = TrainingConfig(
        device="cpu",
        seed=args.seed,
        epochs=args.epochs,
        patience=args.epochs,
        batch_size=args.batch_size,
        learning_rate=LEARNING_RATE,
        progress_bar=False,
    )
    started = time.perf_counter()
    model, history = fit(model, train, validation, config)
    seconds = time.perf_counter() - started
    return Trained(
        seconds, len(history), lambda: predict(model, test, INFERENCE_BATCH), _parameters(model)
    )


def train_deepctr(model_name, directory, spec, data, args) -> Trained:
    """DeepCTR-Torch: feature columns, `compile`, `fit`, `predict` (as its DIN/DIEN examples)."""
    from deepctr_torch.callbacks import ModelCheckpoint
    from deepctr_torch.inputs import SparseFeat, VarLenSparseFeat
    from deepctr_torch.models import DIEN, DIN

    if model_name not in ("din", "dien"):
        raise ValueError(f"DeepCTR-Torch has no {model_name}")
    item = SparseFeat("item", spec["n_items"] + 1, embedding_dim=EMBEDDING_DIM)
    category = SparseFeat("category", spec["n_categories"] + 1, embedding_dim=EMBEDDING_DIM)

    def sequence(name: str, table: SparseFeat) -> VarLenSparseFeat:
        feature = SparseFeat(name, table.vocabulary_size, EMBEDDING_DIM, embedding_name=table.name)
        return VarLenSparseFeat(feature, maxlen=spec["peer_history"], length_name="hist_len")

    columns = [item, category, sequence("hist_item", item), sequence("hist_category", category)]
    # l2_reg_embedding=0: the other libraries train without L2 (DeepCTR's default is 1e-6)
    common = {"dnn_hidden_units": MLP_HIDDEN, "l2_reg_embedding": 0.0, "seed": args.seed}
    torch.manual_seed(args.seed)
    if model_name == "din":
        model = DIN(columns, ["item", "category"], att_hidden_size=ATTENTION_HIDDEN, **common)
    else:
        columns += [sequence("neg_hist_item", item), sequence("neg_hist_category", category)]
        model = DIEN(
            columns,
            ["item", "category"],
            gru_type="AUGRU",
            use_negsampling=True,
            att_hidden_units=ATTENTION_HIDDEN,
            **common,
        )
    model.compile("adam", "binary_crossentropy", metrics=["auc"])  # torch's Adam, lr 1e-3

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

    train, validation, test = (inputs(data[split]) for split in SPLITS)
    best = directory / f"deepctr-{model_name}.pt"
    checkpoint = ModelCheckpoint(
        str(best), monitor="val_auc", save_best_only=True, save_weights_only=True, mode="max"
    )
    started = time.perf_counter()
    # verbose=0: with verbose=1 fit also computes a training AUC on every batch
    history = model.fit(
        train,
        data["train"]["label"],
        batch_size=args.batch_size,
        epochs=args.epochs,
        verbose=0,
        validation_data=(validation, data["validation"]["label"]),
        callbacks=[checkpoint],
    )
    seconds = time.perf_counter() - started
    model.load_state_dict(torch.load(best, weights_only=True))
    return Trained(
        seconds,
        len(history.epoch),
        lambda: model.predict(test, batch_size=INFERENCE_BATCH)[:, 0],
        _parameters(model),
    )


def train_rechub(model_name, directory, spec, data, args) -> Trained:
    """torch-rechub: features, `DataGenerator`, `CTRTrainer` (as its DIN/DIEN examples)."""
    from torch.utils.data import DataLoader
    from torch_rechub.basic.features import SequenceFeature, SparseFeature
    from torch_rechub.models.ranking import BST, DIEN, DIN
    from torch_rechub.trainers import CTRTrainer
    from torch_rechub.utils.data import DataGenerator, TorchDataset

    vocabulary = {"item": spec["n_items"] + 1, "category": spec["n_categories"] + 1}
    targets = [
        SparseFeature(f"target_{name}", size, embed_dim=EMBEDDING_DIM, padding_idx=0)
        for name, size in vocabulary.items()
    ]

    def sequences(prefix: str) -> list:
        return [
            SequenceFeature(
                f"{prefix}hist_{name}",
                size,
                embed_dim=EMBEDDING_DIM,
                pooling="concat",
                shared_with=f"target_{name}",
                padding_idx=0,
            )
            for name, size in vocabulary.items()
        ]

    # `features` (the MLP's other inputs) may not be empty: the targets, as in its DIN example
    torch.manual_seed(args.seed)
    mlp = {"dims": list(MLP_HIDDEN)}
    history = sequences("")
    if model_name == "din":
        attention = {"dims": list(ATTENTION_HIDDEN)}
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

    train, validation, test = (inputs(data[split]) for split in SPLITS)
    labels = {split: data[split]["label"] for split in SPLITS}
    train_loader, validation_loader, _ = DataGenerator(train, labels["train"]).generate_dataloader(
        x_val=validation,
        y_val=labels["validation"],
        x_test=test,
        y_test=labels["test"],
        batch_size=args.batch_size,
    )
    trainer = CTRTrainer(
        model,
        optimizer_params={"lr": LEARNING_RATE, "weight_decay": 0.0},
        n_epoch=args.epochs,
        earlystop_patience=args.epochs,
        device="cpu",
        model_path=str(directory),
        loss_mode=model_name != "dien",  # its DIEN returns (prediction, auxiliary loss)
    )
    started = time.perf_counter()
    trainer.fit(train_loader, validation_loader)
    seconds = time.perf_counter() - started
    # CTRTrainer restores the best epoch only when it stops early: do it for it
    if trainer.early_stopper.best_weights is not None:
        model.load_state_dict(trainer.early_stopper.best_weights)
    test_loader = DataLoader(TorchDataset(test, labels["test"]), batch_size=INFERENCE_BATCH)
    return Trained(
        seconds,
        args.epochs,
        lambda: np.asarray(trainer.predict(model, test_loader)),
        _parameters(model),
    )


# ---------------------------------------------------------------- report
def print_table(results: dict[tuple[str, str], dict]) -> None:
    header = (
        f"{'model':5s} {'library':14s} {'AUC':>7s} {'GAUC':>7s} {'logloss':>8s} "
        f"{'train/s':>9s} {'infer/s':>9s} {'RSS MB':>7s}  ours vs this row"
    )
    print(header)
    print("-" * len(header))
    for (model, library), result in results.items():
        rss = f"{result.get('peak_rss_mb', float('nan')):7.0f}"
        if "failed" in result:
            print(f"{model:5s} {library:14s} failed: {result['failed']} (RSS {rss.strip()} MB)")
            continue
        ours = results.get((model, OURS), {})
        comparison = ""
        if library != OURS and "failed" not in ours and ours:
            comparison = (
                f"  {ours['train_rate'] / result['train_rate']:.1f}x training, "
                f"{ours['auc'] - result['auc']:+.4f} AUC"
            )
        print(
            f"{model:5s} {library:14s} {result['auc']:7.4f} {result['gauc']:7.4f} "
            f"{result['logloss']:8.4f} {result['train_rate']:9,.0f} "
            f"{result['inference_rate']:9,.0f} {rss}{comparison}"
        )
    for (model, library), result in results.items():
        if "failed" in result and result.get("log"):
            print(f"\n{model} / {library} failed; end of its output:")
            print("\n".join(f"    {line}" for line in result["log"]))


def _machine(args: argparse.Namespace) -> str:
    versions = []
    for package in ("torch", "deepctr-torch", "torch-rechub"):
        try:
            versions.append(f"{package} {metadata.version(package)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{package} not installed")
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{time.strftime('%Y-%m-%d')}, {cpu}, {os.cpu_count()} CPUs, no GPU used; "
        f"{', '.join(versions)}; {args.threads} torch threads per model, "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'PASSIVE')}\n"
        f"every model: embedding {EMBEDDING_DIM} (items and categories), history {HISTORY}, "
        f"MLP {'-'.join(map(str, MLP_HIDDEN))}, DIN attention "
        f"{'-'.join(map(str, ATTENTION_HIDDEN))}, batch {args.batch_size}, {args.epochs} "
        f"epochs (best validation AUC kept), Adam lr {LEARNING_RATE}\n"
        "train/s: training samples x epochs / fit wall time (one validation pass per epoch "
        f"included); infer/s: predict on the test samples at batch {INFERENCE_BATCH}; "
        "RSS: peak of the model's own process"
    )


if __name__ == "__main__":
    sys.exit(main())
